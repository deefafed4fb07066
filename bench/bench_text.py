"""Text generation through the Envoy front door vs straight to the model server.

Starts a real mesh (`aimesh up --only text`), then alternates the same greedy
streaming request against both addresses and prints first-token latency and
tokens/s for each, with the front door as a ratio of direct (same run, same server).

    .venv/bin/python bench/bench_text.py [--runs 10] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aimesh  # noqa: E402
from tests.mesh.conftest import Mesh  # noqa: E402

PROMPT = [("user", "Write a short paragraph about the history of Paris.")]


def measure(target: str, max_tokens: int) -> tuple[float, float]:
    with aimesh.Client(target, max_attempts=1) as client:
        start = time.perf_counter()
        first = None
        tokens = 0
        for piece in client.text.stream_generate("smollm2-135m", PROMPT, max_tokens=max_tokens):
            if first is None:
                first = time.perf_counter() - start
            if piece.usage.completion_tokens:
                tokens = piece.usage.completion_tokens
        total = time.perf_counter() - start
    return first or total, tokens / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp), only=["text"])
        try:
            mesh.wait_ready()
            registration = json.loads(next((Path(tmp) / "registrations").glob("*.json")).read_text())
            direct = f"{registration['address']}:{registration['port']}"
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "envoy": []}
            measure(direct, 8)  # warm-up
            for _ in range(args.runs):
                results["direct"].append(measure(direct, args.max_tokens))
                results["envoy"].append(measure(mesh.front, args.max_tokens))
        finally:
            mesh.stop()
    print(f"SmolLM2-135M, greedy, {args.max_tokens} new tokens, {args.runs} runs each, alternating")
    summary = {}
    for name, rows in results.items():
        ttft = statistics.median(r[0] for r in rows) * 1000
        tps = statistics.median(r[1] for r in rows)
        summary[name] = (ttft, tps)
        print(f"  {name:6s}  first token p50 {ttft:7.1f} ms   tokens/s p50 {tps:6.1f}")
    (d_ttft, d_tps), (e_ttft, e_tps) = summary["direct"], summary["envoy"]
    print(f"  envoy/direct: first-token latency x{e_ttft / d_ttft:.3f} (+{e_ttft - d_ttft:.1f} ms), "
          f"tokens/s x{e_tps / d_tps:.3f}")


if __name__ == "__main__":
    main()

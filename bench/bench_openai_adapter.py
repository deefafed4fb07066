"""The cloud-provider adapter vs calling the provider directly.

Two providers, each with `aimesh serve openai` in front of it:
- `transformers serve` with SmolLM2-135M: a real model, as slow as this CPU makes it;
- an instant provider (a small HTTP server that streams N tokens with no model behind
  them, as fast as it can): here the adapter's own cost per call and per token shows,
  as it would in front of a cloud provider streaming hundreds of tokens a second.
For each, the same greedy streaming request alternates between the provider (httpx,
SSE) and the adapter (aimesh SDK, gRPC); first-token latency and tokens/s are printed,
the adapter as a ratio of direct (same run, same provider). Token counts are the
provider's own usage in both cases.

The model provider runs one torch thread by default, leaving the second core to the
adapter, as if they ran on different machines (they would).

    .venv/bin/python bench/bench_openai_adapter.py [--runs 10] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aimesh  # noqa: E402
from aimesh_servers.models import builtin  # noqa: E402
from tests.servers import server_process  # noqa: E402
from tests.service.test_openai_adapter import chunk, transformers_serve  # noqa: E402

PROMPT = [("user", "Write a short paragraph about the history of Paris.")]


class _Instant(BaseHTTPRequestHandler):
    """Streams max_tokens one-token chunks at once, then finish and usage."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [chunk(), *(chunk(" token") for _ in range(n)), chunk(finish="length"),
                  chunk(usage={"prompt_tokens": 12, "completion_tokens": n})]
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


def direct(http: httpx.Client, model: str, max_tokens: int) -> Iterator[tuple[str, int]]:
    """(text, completion tokens so far) from the provider's own SSE stream."""
    body = {"model": model, "messages": [{"role": r, "content": c} for r, c in PROMPT],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:") and not line.endswith("[DONE]"):
                event = json.loads(line[5:])
                text = "".join(c["delta"].get("content") or "" for c in event.get("choices", ()))
                yield text, (event.get("usage") or {}).get("completion_tokens", 0)


def adapted(client: aimesh.Client, max_tokens: int) -> Iterator[tuple[str, int]]:
    """The same through the adapter, over gRPC with the SDK."""
    for piece in client.text.stream_generate("smollm2-135m", PROMPT, max_tokens=max_tokens):
        yield piece.text_delta, piece.usage.completion_tokens


def timed(stream: Iterator[tuple[str, int]]) -> tuple[float, float]:
    """Seconds to the first text, and tokens/s over the whole call (provider's count)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    for text, completion_tokens in stream:
        if first is None and text:
            first = time.perf_counter() - start
        tokens = completion_tokens or tokens
    total = time.perf_counter() - start
    return first or total, tokens / total


def compare(title: str, base: str, model: str, runs: int, max_tokens: int) -> None:
    # Both sides keep their connections between calls, as the adapter does upstream.
    with (
        server_process("serve", "openai", "--model", "smollm2-135m", "--source", model,
                       env={"AIMESH_OPENAI_BASE_URL": base}) as adapter,
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        adapter.wait_serving(timeout=60)
        with aimesh.Client(f"127.0.0.1:{adapter.port}", max_attempts=1) as client:
            timed(direct(http, model, 8))  # warm-up both paths
            timed(adapted(client, 8))
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "adapter": []}
            for _ in range(runs):
                results["direct"].append(timed(direct(http, model, max_tokens)))
                results["adapter"].append(timed(adapted(client, max_tokens)))
    print(f"{title}: {max_tokens} new tokens, {runs} runs each, alternating")
    stats = {name: percentiles(rows) for name, rows in results.items()}
    for name, (ttft, tps) in stats.items():
        print(f"  {name:8s} first token p50/p90 {ttft[0]:7.1f}/{ttft[1]:7.1f} ms   "
              f"tokens/s p50/p10 {tps[0]:8.1f}/{tps[1]:8.1f}")
    (base_ttft, base_tps), (ttft, tps) = stats["direct"], stats["adapter"]
    print(f"  adapter/direct: first-token latency p50 x{ttft[0] / base_ttft[0]:.3f} "
          f"({ttft[0] - base_ttft[0]:+.1f} ms), tokens/s p50 x{tps[0] / base_tps[0]:.3f}")


def percentiles(rows: list[tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """(first-token ms p50, p90), (tokens/s p50, p10: the slow tail of a rate)."""
    ttft = statistics.quantiles([r[0] * 1000 for r in rows], n=10, method="inclusive")
    tps = statistics.quantiles([r[1] for r in rows], n=10, method="inclusive")
    return (ttft[4], ttft[8]), (tps[4], tps[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--instant-tokens", type=int, default=512)
    parser.add_argument("--provider-threads", type=int, default=1)
    args = parser.parse_args()
    instant = ThreadingHTTPServer(("127.0.0.1", 0), _Instant)
    instant.daemon_threads = True
    threading.Thread(target=instant.serve_forever, daemon=True).start()
    try:
        compare("instant provider (no model)", f"http://127.0.0.1:{instant.server_address[1]}/v1",
                "instant", args.runs * 3, args.instant_tokens)
    finally:
        instant.shutdown()
    folder = builtin.resolve("builtin:smollm2-135m-instruct")
    with (
        tempfile.TemporaryDirectory() as tmp,
        transformers_serve(folder, Path(tmp) / "provider.log", args.provider_threads) as base,
    ):
        compare(f"SmolLM2-135M via transformers serve ({args.provider_threads} torch thread), "
                "greedy", base, folder, args.runs, args.max_tokens)


if __name__ == "__main__":
    main()

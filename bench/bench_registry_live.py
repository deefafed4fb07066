"""What the registry's live figures cost a look (GetModel/ListModels): status.LiveFigures,
which reads only the access log lines Envoy appended since the last look and keeps each
model's and pool's window with running counts, against the baseline of re-reading the
window from the log at every look the way `aimesh status` does (status.recent_calls +
add_call_stats). The same log in both: N calls in the window (two models, two pools
each), then, before each look, the lines of one more second at the same rate.

Goal: a look costs at most a tenth of the re-read (>= 10x cheaper).

    .venv/bin/python bench/bench_registry_live.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import common  # bench/common.py
from aimesh_servers.mesh.envoy_config import ACCESS_LOG_FORMAT
from aimesh_servers.mesh.status import (
    WINDOW_S,
    LiveFigures,
    ModelStatus,
    PoolStatus,
    add_call_stats,
    recent_calls,
)
from aimesh_servers.registry.schema import load_registry

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: chat
    capability: text_generation
    versions: [{version: "1", source: "builtin:smollm2-135m-instruct"}]
    pools: [{id: primary, serve: text}, {id: secondary, serve: text}]
  - id: emb
    capability: embedding
    versions: [{version: "1", source: "builtin:all-minilm-l6-v2"}]
    pools: [{id: primary, serve: embedding}, {id: secondary, serve: embedding}]
"""


def lines(count: int, start: float, span_s: float, seed: int) -> str:
    out = []
    for i in range(count):
        n = seed + i
        call = dict.fromkeys(ACCESS_LOG_FORMAT, "-")
        call.update(start_ms=str(int((start + i * span_s / count) * 1000)), duration_ms=5 + n % 200,
                    pool="secondary" if n % 20 == 0 else "primary", grpc_status="OK" if n % 50 else "Unavailable",
                    http_status=200, cluster="model_chat" if n % 2 else "model_emb", attempts=1)
        out.append(json.dumps(call) + "\n")
    return "".join(out)


def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-live-"))
    (folder / "registry.yaml").write_text(REGISTRY)
    registry = load_registry(folder / "registry.yaml")
    log = folder / "access.log"
    rate = args.calls / WINDOW_S  # calls per second
    now = time.time()
    log.write_text(lines(args.calls, now - WINDOW_S, WINDOW_S, 0))
    live = LiveFigures(registry, log, window_s=WINDOW_S, cache_s=0)
    live.snapshot()  # the first look reads the whole window once
    baseline_ms, live_ms = [], []
    for look in range(args.looks):
        with open(log, "a") as out:  # one more second of calls
            out.write(lines(int(rate), time.time() - 1, 1.0, args.calls + look * int(rate)))
        # The two take turns going first, so neither always meets a warmer page cache.
        for which in ((0, 1) if look % 2 else (1, 0)):
            started = time.perf_counter()
            if which == 0:
                calls = recent_calls(log, time.time())
                for model in registry.models:
                    add_call_stats(ModelStatus(model.id, [PoolStatus(p.id, i) for i, p in enumerate(model.pools)]),
                                   [c for c in calls if c.get("cluster") == model.cluster])
                baseline_ms.append((time.perf_counter() - started) * 1000)
            else:
                figures = live.snapshot()
                live_ms.append((time.perf_counter() - started) * 1000)
    assert figures["chat"].total.calls > 0
    base, ours = statistics.median(baseline_ms), statistics.median(live_ms)
    ratio = base / ours if ours else float("inf")
    print(f"{args.calls} calls in a {WINDOW_S:.0f} s window, {int(rate)} new calls before each of {args.looks} looks")
    print(f"  re-read the window per look (aimesh status's way): p50 {base:.2f} ms")
    print(f"  LiveFigures (incremental):                        p50 {ours:.3f} ms   ({ratio:.0f}x cheaper)")
    goals = [common.Goal("registry live figures: re-read p50 / incremental p50 per look", round(ratio, 1),
                         ">= 10x", ratio >= 10)]
    common.report("registry_live", args.json, goals, {
        "calls_in_window": args.calls, "looks": args.looks, "reread_p50_ms": round(base, 3),
        "incremental_p50_ms": round(ours, 4)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller window and fewer looks")
    parser.add_argument("--json", help="write the results and goals here")
    parsed = parser.parse_args()
    parsed.calls, parsed.looks = (6_000, 10) if parsed.quick else (30_000, 20)
    main(parsed)

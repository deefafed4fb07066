"""Embedding calls/s with dynamic batching against one-at-a-time, in the same run.

Starts embedding servers (`aimesh serve embedding`, all-MiniLM-L6-v2) as subprocesses:
one with batching off (AIMESH_BATCH_MAX_ITEMS=1: each call its own forward pass, in
turn) as the baseline, one with the default batch settings (and, with --sweep, a few
other settings), and, for scale, one-at-a-time on 2 torch threads (how it served before
batching). 1 and 16 closed-loop gRPC callers send one short text per call; the
variants take turns, round after round, so that load from elsewhere hits them alike.
The raw library (transformers, one text per forward pass, in this process) is printed
for reference. Goal: batched >= 3x the calls/s of one-at-a-time at 16 callers.

    .venv/bin/python bench/bench_embedding.py [--quick] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import common  # bench/common.py
import grpc
import torch
from aimesh.embedding.v1 import embedding_pb2 as pb
from aimesh.embedding.v1 import embedding_pb2_grpc as pb_grpc
from aimesh_servers.embedding import DEFAULT_MODEL
from aimesh_servers.embedding.engine import EmbeddingEngine
from aimesh_servers.runtime.batching import BatchSettings

WORDS = ["the", "a", "mesh", "model", "server", "routes", "every", "request", "to", "a", "pool", "of", "replicas", "while", "tenants", "pay", "for", "tokens", "images", "and", "seconds", "of", "audio", "under", "limits"]
BASELINE = "one at a time"
PREVIOUS = "one at a time, 2 torch threads"
CALLERS = (1, 16)


def short_texts(count: int, seed: int = 0) -> list[str]:
    """Short texts (6-16 words), as a search query or a chat message is."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 16))) for _ in range(count)]


def variants(sweep: bool) -> dict[str, dict[str, str]]:
    """Name -> server environment. The first is the baseline."""
    defaults = BatchSettings()
    out = {
        BASELINE: {"AIMESH_BATCH_MAX_ITEMS": "1", "AIMESH_BATCH_MAX_WAIT_MS": "0", "AIMESH_BATCH_CAPACITY": "64"},
        f"batched (defaults: {defaults.max_items} items, {defaults.max_wait_ms:g} ms)": {},
    }
    # How the server ran before batching (2 torch threads per forward pass), for scale.
    out[PREVIOUS] = {**out[BASELINE], "AIMESH_BATCH_TORCH_THREADS": "2"}
    if sweep:
        for items, wait in ((8, 0), (16, 0), (16, 2), (32, 2), (32, 5)):
            out[f"batched ({items} items, {wait} ms)"] = {
                "AIMESH_BATCH_MAX_ITEMS": str(items), "AIMESH_BATCH_MAX_WAIT_MS": str(wait)}
        out["batched (defaults), 2 torch threads"] = {"AIMESH_BATCH_TORCH_THREADS": "2"}
    return out


def raw_library(texts: list[str], seconds: float) -> float:
    """Embeddings/s of transformers alone: one text per forward pass, mean pooling."""
    engine = EmbeddingEngine(DEFAULT_MODEL.source)
    engine.load()
    engine.batcher.close()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        enc = engine.tokenizer([texts[done % len(texts)]], return_tensors="pt")
        with torch.inference_mode():
            states = engine.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
        done += 1
    return done / (time.perf_counter() - start)


async def measure(servers: dict[str, common.ServerProcess], texts: list[str], seconds: float,
                  rounds: int) -> dict[str, dict[int, list[common.LoadResult]]]:
    results: dict[str, dict[int, list[common.LoadResult]]] = {n: {c: [] for c in CALLERS} for n in servers}
    channels = {name: grpc.aio.insecure_channel(s.address) for name, s in servers.items()}
    try:
        for round_ in range(rounds + 1):  # round 0 warms up every server
            for callers in CALLERS:
                for name, channel in channels.items():
                    stub = pb_grpc.EmbeddingServiceStub(channel)
                    counter = [0]

                    async def call(index: int, stub: pb_grpc.EmbeddingServiceStub = stub,
                                   counter: list[int] = counter) -> None:
                        counter[0] += 1
                        text = texts[(counter[0] * 7 + index) % len(texts)]
                        await stub.Embed(pb.EmbedRequest(model=DEFAULT_MODEL.id, texts=[text], normalize=True),
                                         timeout=30)

                    run = await common.closed_loop(call, callers, seconds=seconds if round_ else seconds / 4)
                    if round_:
                        results[name][callers].append(run)
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def best(runs: list[common.LoadResult]) -> common.LoadResult:
    """The round with the median calls/s."""
    return sorted(runs, key=lambda r: r.calls_per_s)[len(runs) // 2]


async def main(args: argparse.Namespace) -> None:
    seconds, rounds = (2.0, 2) if args.quick else (4.0, 3)
    texts = short_texts(512)
    servers = {name: common.ServerProcess("embedding", env) for name, env in variants(args.sweep).items()}
    try:
        for server in servers.values():
            server.wait_serving()
        results = await measure(servers, texts, seconds, rounds)
    finally:
        for server in servers.values():
            server.stop()
    raw = raw_library(texts, seconds)

    print(f"all-MiniLM-L6-v2, one short text (6-16 words) per call, closed loop, {seconds:g} s per run, "
          f"median of {rounds} rounds; ratios to '{BASELINE}' at the same callers")
    print(f"  {'server':44s} {'callers':>7s} {'calls/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'x base':>7s}  errors")
    table: dict[str, Any] = {}
    for name, by_callers in results.items():
        table[name] = {}
        for callers, runs in by_callers.items():
            run = best(runs)
            ratio = run.calls_per_s / best(results[BASELINE][callers]).calls_per_s
            table[name][callers] = {**run.summary(), "x_baseline": round(ratio, 3),
                                    "rounds_calls_per_s": [round(r.calls_per_s, 1) for r in runs]}
            print(f"  {name:44s} {callers:7d} {run.calls_per_s:9.1f} {run.p50_ms:8.2f} {run.p99_ms:8.2f} "
                  f"{ratio:7.2f}  {sum(run.errors.values()) or ''}")
    print(f"  raw transformers, one text per forward pass, 1 thread, in-process: {raw:.1f} embeddings/s")
    batched = next(name for name in results if name.startswith("batched (defaults"))
    ratio = table[batched][16]["x_baseline"]
    errors = sum(sum(best(runs).errors.values()) for by in results.values() for runs in by.values())
    previous = table[batched][16]["calls_per_s"] / table[PREVIOUS][16]["calls_per_s"]
    print(f"  batched (defaults) at 16 callers: x{ratio:.2f} of one-at-a-time on the same threads, "
          f"x{previous:.2f} of '{PREVIOUS}'")
    goals = [
        common.Goal("embeddings, 16 callers: batched calls/s over one-at-a-time", ratio, ">= 3x", ratio >= 3,
                    f"x{previous:.2f} over one-at-a-time on 2 torch threads (the serving before batching)"),
        common.Goal("embeddings: failed calls", errors, "0", errors == 0),
    ]
    common.report("embedding", args.json, goals, {
        "rows": table, "x_previous_serving_16_callers": round(previous, 3), "raw_transformers_per_s": round(raw, 1), "seconds_per_run": seconds, "rounds": rounds,
        "batch_defaults": BatchSettings().model_dump()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer rounds")
    parser.add_argument("--sweep", action="store_true", help="also try other batch sizes and waits")
    parser.add_argument("--json", help="write the results and goals here")
    asyncio.run(main(parser.parse_args()))

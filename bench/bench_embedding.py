"""Embeddings/s: EmbeddingEngine called directly (the baseline) against the same engine
through a real in-process gRPC server and the SDK, and against a plain transformers
loop (one padded batch, mean pooling) on the same weights; all in the same run,
printed as ratios to the engine. Runs are interleaved.

    .venv/bin/python bench/bench_embedding.py --batch 32 --batches 8 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable

import torch

import aimesh
from aimesh_servers import embedding
from aimesh_servers.embedding.engine import EmbedRequest
from aimesh_servers.runtime.runner import ModelServer
from aimesh_servers.runtime.settings import ServerSettings

WORDS = ("the a mesh model server routes every request to a pool of replicas while "
         "tenants pay for tokens images and seconds of audio under limits").split()


def corpus(batches: int, batch: int, seed: int = 0) -> list[list[str]]:
    """Texts of 4 to 120 words (mixed lengths, as real traffic has)."""
    rng = random.Random(seed)
    return [[" ".join(rng.choices(WORDS, k=rng.randint(4, 120))) for _ in range(batch)]
            for _ in range(batches)]


async def timed_round_robin(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per run: one warm-up each, then the runs in turn, `repeats` times
    (interleaved, so that load from elsewhere on the machine hits all of them alike)."""
    async def once(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        result = run()
        if asyncio.iscoroutine(result):
            await result
        return time.perf_counter() - start

    for run in runs.values():
        await once(run)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(await once(run))
    return {name: statistics.median(t) for name, t in times.items()}


async def main(args: argparse.Namespace) -> None:
    settings = ServerSettings(port=0, drain_delay_s=0, drain_grace_s=1, torch_threads=args.threads)
    servicer = embedding.build(embedding.DEFAULT_MODEL, settings)
    server = ModelServer(settings, [servicer])
    await server.start()  # loads the model
    engine = servicer.engine
    batches = corpus(args.batches, args.batch)
    total = args.batches * args.batch

    def direct() -> None:
        for texts in batches:
            engine.embed(EmbedRequest(texts, normalize=True))

    def plain_transformers() -> None:
        for texts in batches:
            enc = engine.tokenizer(texts, padding=True, return_tensors="pt")
            with torch.inference_mode():
                states = engine.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    async with aimesh.AsyncClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        async def through_server() -> None:
            for texts in batches:
                await client.embedding.embed(embedding.DEFAULT_MODEL.id, texts, normalize=True)

        results = await timed_round_robin({
            "engine, direct (baseline)": direct,
            "gRPC server + SDK": through_server,
            "plain transformers, padded batch": plain_transformers,
        }, args.repeats)
    await server.drain()
    base = results["engine, direct (baseline)"]
    print(f"all-MiniLM-L6-v2, {args.batches} batches of {args.batch} texts (4-120 words), "
          f"{args.threads} torch threads, median of {args.repeats}")
    for name, seconds in results.items():
        print(f"  {name:34s} {total / seconds:8.1f} embeddings/s   x{base / seconds:.2f} of the engine")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(main(parser.parse_args()))

"""Does a model server keep its memory? RSS of an embedding server (`aimesh serve
embedding`, default batching) after a warm-up of 3,000 calls, then after each quarter of
20,000 more calls from 16 callers: short texts, with every 50th call a bad one (refused) and every 50th a call
cancelled by its deadline, so that error and cancel paths are exercised too.
Goal: RSS grows by less than 5%.

    .venv/bin/python bench/bench_memory.py [--calls 20000] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import random

import common  # bench/common.py
import grpc
from aimesh.embedding.v1 import embedding_pb2 as pb
from aimesh.embedding.v1 import embedding_pb2_grpc as pb_grpc

WORDS = ["mesh", "model", "server", "routes", "every", "request", "to", "a", "pool", "of", "replicas", "under", "tenant", "limits"]
CALLERS = 16
WARM_UP = 3_000


async def load(address: str, calls: int, seed: int) -> common.LoadResult:
    rng = random.Random(seed)
    counter = [0]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def call(_: int) -> None:
            counter[0] += 1
            n = counter[0]
            if n % 50 == 0:  # refused: an empty text
                texts, timeout = [""], 30.0
            elif n % 50 == 25:  # cancelled while it waits or runs
                texts, timeout = [" ".join(rng.choices(WORDS, k=40))] * 8, 0.02
            else:
                texts, timeout = [" ".join(rng.choices(WORDS, k=rng.randint(4, 24)))], 30.0
            await stub.Embed(pb.EmbedRequest(texts=texts), timeout=timeout)

        return await common.closed_loop(call, CALLERS, calls=calls)


async def main(args: argparse.Namespace) -> None:
    calls = args.calls or (5_000 if args.quick else 20_000)
    server = common.ServerProcess("embedding").wait_serving()
    quarters: list[int] = []  # RSS after each quarter of the calls: growth that levels off is no leak
    runs: list[common.LoadResult] = []
    try:
        # Warm-up: the allocator's pools grow to the batch shapes the mix makes (measured: with 1,000
        # calls the first quarter still grew 5%, the next three 0.3%).
        await load(server.address, WARM_UP, seed=0)
        before = server.rss_bytes()
        for quarter in range(4):
            runs.append(await load(server.address, calls // 4, seed=1 + quarter))
            quarters.append(server.rss_bytes())
    finally:
        server.stop()
    after = quarters[-1]
    growth = (after - before) / before * 100
    errors: dict[str, int] = {}
    for run in runs:
        for code, n in run.errors.items():
            errors[code] = errors.get(code, 0) + n
    rate = sum(len(r.latencies_s) for r in runs) / sum(r.seconds for r in runs)
    print(f"embedding server RSS: {before / 2**20:.1f} MiB after {WARM_UP} warm-up calls, then after each "
          f"{calls // 4} calls: {', '.join(f'{q / 2**20:.1f}' for q in quarters)} MiB ({growth:+.2f}% in all); "
          f"{rate:.0f} answered calls/s; refused/cancelled by status: {errors}")
    expected = {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED"}
    unexpected = sum(n for code, n in errors.items() if code not in expected)
    goals = [
        common.Goal(f"embedding server RSS growth over {calls} calls", growth, "< 5%", growth < 5, "percent"),
        common.Goal("embedding memory run: failures other than the bad and cancelled calls sent", unexpected, "0",
                    unexpected == 0),
    ]
    common.report("memory", args.json, goals, {
        "calls": calls, "warm_up_calls": WARM_UP, "rss_before_bytes": before, "rss_after_quarters_bytes": quarters,
        "growth_percent": round(growth, 3), "answered_calls_per_s": round(rate, 1), "errors": errors})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, help="calls after the warm-up (default 20,000; --quick 5,000)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results and goals here")
    asyncio.run(main(parser.parse_args()))

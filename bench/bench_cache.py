"""Response cache: hit latency vs miss latency (p50), embeddings and text, in one run.

Model servers run as `aimesh serve` subprocesses with the cache on (AIMESH_CACHE_ENABLED),
called directly over gRPC by one caller. A miss is a request never seen before (a new
text or prompt each call); a hit repeats one already answered. Misses and hits alternate,
so load from elsewhere on the machine hits both alike. Also measured: embeddings with the
cache off (what a miss costs over no cache at all) and with the entries in a real
redis-server (a hit shared by replicas). Goal: a hit at least 5x faster than a miss (p50),
for embeddings and for text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import common  # bench/common.py
import grpc
from aimesh.embedding.v1 import embedding_pb2
from aimesh.text.v1 import text_generation_pb2 as text_pb

EMBED = "/aimesh.embedding.v1.EmbeddingService/Embed"
GENERATE = "/aimesh.text.v1.TextGenerationService/Generate"
STREAM = "/aimesh.text.v1.TextGenerationService/StreamGenerate"
TEXT_TOKENS = 16
CACHE_ON = {"AIMESH_CACHE_ENABLED": "true"}


def fresh_embed() -> bytes:
    return embedding_pb2.EmbedRequest(texts=[f"A short sentence number {uuid.uuid4().hex[:8]}."]).SerializeToString()


def fresh_text(kind: type) -> Callable[[], bytes]:
    """New prompts of one shape; temperature unset: greedy."""
    def make() -> bytes:
        prompt = f"Write one sentence about the colour {uuid.uuid4().hex[:6]}."
        return kind(messages=[text_pb.ChatMessage(role=text_pb.ROLE_USER, content=prompt)],
                    max_tokens=TEXT_TOKENS).SerializeToString()
    return make


async def measure(call: Callable[[bytes], Awaitable[str]], fresh: Callable[[], bytes], calls: int,
                  cached: bool = True) -> dict[str, Any]:
    """Alternating misses (fresh requests) and hits (one repeated request): p50s and their ratio."""
    expected = {"miss": "miss", "hit": "hit"} if cached else {"miss": "", "hit": ""}
    repeated = fresh()
    assert await call(repeated) == expected["miss"]  # stored now (when the cache is on)
    times: dict[str, list[float]] = {"miss": [], "hit": []}
    for _ in range(calls):
        for kind, request in (("miss", fresh()), ("hit", repeated)):
            started = time.perf_counter()
            state = await call(request)
            times[kind].append(time.perf_counter() - started)
            assert state == expected[kind], f"a {kind} call said x-aimesh-cache: {state!r}"
    miss, hit = (statistics.median(times[k]) * 1000 for k in ("miss", "hit"))
    return {"miss_p50_ms": round(miss, 3), "hit_p50_ms": round(hit, 3), "x_faster": round(miss / hit, 2),
            "calls_each": calls}


def unary(channel: grpc.aio.Channel, method: str) -> Callable[[bytes], Awaitable[str]]:
    stub = channel.unary_unary(method)

    async def call(request: bytes) -> str:
        rpc = stub(request, timeout=120)
        await rpc
        return dict(await rpc.initial_metadata()).get("x-aimesh-cache", "")
    return call


def streaming(channel: grpc.aio.Channel, method: str) -> Callable[[bytes], Awaitable[str]]:
    stub = channel.unary_stream(method)

    async def call(request: bytes) -> str:
        rpc = stub(request, timeout=120)
        count = 0
        async for _ in rpc:
            count += 1
        assert count > 1
        return dict(await rpc.initial_metadata()).get("x-aimesh-cache", "")
    return call


async def main(args: argparse.Namespace) -> None:
    from tests.infra import redis_server

    embed_calls, text_calls = (60, 6) if args.quick else (300, 20)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server())
        variants = {
            "embeddings, cache off": ("embedding", {}),
            "embeddings, memory cache": ("embedding", CACHE_ON),
            "embeddings, redis cache": ("embedding", {**CACHE_ON, "AIMESH_CACHE_URL": redis_url}),
            "text, memory cache": ("text", CACHE_ON),
        }
        servers = {name: common.ServerProcess(kind, env) for name, (kind, env) in variants.items()}
        for server in servers.values():
            stack.callback(server.stop)
        for server in servers.values():
            server.wait_serving()
        for name, server in servers.items():
            async with grpc.aio.insecure_channel(server.address) as channel:
                if name.startswith("embeddings"):
                    results[name] = await measure(unary(channel, EMBED), fresh_embed, embed_calls,
                                                  cached=not name.endswith("cache off"))
                else:
                    results["text Generate, memory cache"] = await measure(
                        unary(channel, GENERATE), fresh_text(text_pb.GenerateRequest), text_calls)
                    results["text StreamGenerate, memory cache"] = await measure(
                        streaming(channel, STREAM), fresh_text(text_pb.StreamGenerateRequest), text_calls)

    off = results["embeddings, cache off"]["miss_p50_ms"]
    print(f"one caller, direct gRPC to the model server; text: {TEXT_TOKENS} greedy tokens; "
          "'miss' = a request never seen, 'hit' = a repeated one")
    print(f"  {'server':36s} {'miss p50 ms':>12s} {'hit p50 ms':>11s} {'x faster':>9s}  calls each")
    for name, row in results.items():
        hit = "-" if name.endswith("cache off") else f"{row['hit_p50_ms']:.2f}"
        ratio = "-" if name.endswith("cache off") else f"{row['x_faster']:.1f}"
        print(f"  {name:36s} {row['miss_p50_ms']:12.2f} {hit:>11s} {ratio:>9s}  {row['calls_each']}")
    miss_overhead = results["embeddings, memory cache"]["miss_p50_ms"] / off
    print(f"  an embeddings miss with the memory cache on costs x{miss_overhead:.2f} of the call with it off")
    embed_ratio = results["embeddings, memory cache"]["x_faster"]
    text_ratio = results["text Generate, memory cache"]["x_faster"]
    goals = [
        common.Goal("embeddings: miss p50 / hit p50 (memory cache)", embed_ratio, ">= 5x", embed_ratio >= 5),
        common.Goal("text Generate: miss p50 / hit p50 (memory cache)", text_ratio, ">= 5x", text_ratio >= 5),
    ]
    common.report("cache", args.json, goals, {"rows": results, "miss_over_cache_off": round(miss_overhead, 3)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--json", help="write the results and goals here")
    asyncio.run(main(parser.parse_args()))

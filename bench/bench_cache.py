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
from dataclasses import dataclass
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


@dataclass
class Target:
    """One way to call: a server and method, new requests of one shape, whether it caches."""

    call: Callable[[bytes], Awaitable[str]]
    fresh: Callable[[], bytes]
    cached: bool = True


async def measure(targets: dict[str, Target], rounds: int) -> dict[str, dict[str, Any]]:
    """Per target, a miss (a fresh request) then a hit (its one repeated request), every
    target in turn each round, so that load from elsewhere hits them all alike."""
    repeated = {name: target.fresh() for name, target in targets.items()}
    for name, target in targets.items():  # stored now (when the cache is on)
        assert await target.call(repeated[name]) == ("miss" if target.cached else "")
    times: dict[str, dict[str, list[float]]] = {name: {"miss": [], "hit": []} for name in targets}
    for _ in range(rounds):
        for name, target in targets.items():
            for kind, request in (("miss", target.fresh()), ("hit", repeated[name])):
                started = time.perf_counter()
                state = await target.call(request)
                times[name][kind].append(time.perf_counter() - started)
                expected = kind if target.cached else ""
                assert state == expected, f"{name}: a {kind} call said x-aimesh-cache: {state!r}"
    results = {}
    for name, by_kind in times.items():
        miss, hit = (statistics.median(by_kind[k]) * 1000 for k in ("miss", "hit"))
        results[name] = {"miss_p50_ms": round(miss, 3), "hit_p50_ms": round(hit, 3),
                         "x_faster": round(miss / hit, 2), "calls_each": rounds}
    return results


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
        channels = {name: grpc.aio.insecure_channel(server.address) for name, server in servers.items()}
        embeddings = {name: Target(unary(channels[name], EMBED), fresh_embed, not name.endswith("cache off"))
                      for name in variants if name.startswith("embeddings")}
        text_channel = channels["text, memory cache"]
        texts = {
            "text Generate, memory cache": Target(unary(text_channel, GENERATE), fresh_text(text_pb.GenerateRequest)),
            "text StreamGenerate, memory cache": Target(
                streaming(text_channel, STREAM), fresh_text(text_pb.StreamGenerateRequest)),
        }
        try:
            results = {**await measure(embeddings, embed_calls), **await measure(texts, text_calls)}
        finally:
            for channel in channels.values():
                await channel.close()

    off = results["embeddings, cache off"]["miss_p50_ms"]
    print(f"one caller, direct gRPC to the model server; text: {TEXT_TOKENS} greedy tokens; "
          "'miss' = a request never seen, 'repeat' = one already answered")
    print(f"  {'server':36s} {'miss p50 ms':>12s} {'repeat p50 ms':>14s} {'x faster':>9s}  calls each")
    for name, row in results.items():  # a repeat is a hit when the cache is on
        print(f"  {name:36s} {row['miss_p50_ms']:12.2f} {row['hit_p50_ms']:14.2f} {row['x_faster']:9.1f}"
              f"  {row['calls_each']}")
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

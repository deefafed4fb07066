"""What tenancy costs at the front door: the same embedding call through two Envoys built
from the generated config, one with tenancy (jwt_authn + admission Lua, with 1,000 tenants
in the admission state and request counters running for the caller) and one without
(the baseline), at 1 and 16 callers; plus the upstream called directly, for scale.
Rounds alternate between the variants; the figures are medians over rounds, and the
ratios compare variants of the same run.

    .venv/bin/python bench/bench_front_door.py --calls 400 --rounds 3
    .venv/bin/python bench/bench_front_door.py --upstream embedding   # a real embedding server

`--upstream trivial` (default) answers Embed at once, so the difference is Envoy's filter
chain alone; `--upstream embedding` runs `aimesh serve embedding` (the real model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import jwt
from aimesh.embedding.v1 import embedding_pb2
from aimesh_servers.mesh import envoy_process
from aimesh_servers.mesh.controller import EndpointController
from aimesh_servers.mesh.envoy_config import MeshSpec
from aimesh_servers.mesh.tenancy_envoy import JwtProvider, write_jwt_config, write_routes
from aimesh_servers.registry.discovery import Instance
from aimesh_servers.registry.schema import load_registry
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

MODEL = "all-minilm-l6-v2"
EMBEDDING = "aimesh.embedding.v1.EmbeddingService"
REGISTRY = f"""
kind: aimesh/registry/v1
models:
  - id: {MODEL}
    capability: embedding
    versions: [{{version: "1", source: "builtin:all-minilm-l6-v2"}}]
    pools: [{{id: local, serve: embedding}}]
"""
REQUEST = embedding_pb2.EmbedRequest(model=MODEL, texts=["A man is eating food."]).SerializeToString()


async def serve_trivial_upstream() -> None:
    """An Embed that answers at once (and gRPC health), on a port it prints."""
    server = grpc.aio.server()
    reply = embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=[0.5] * 384)])

    async def embed(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply.SerializeToString()

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        EMBEDDING, {"Embed": grpc.unary_unary_rpc_method_handler(embed)})])
    checks = health.aio.HealthServicer()
    await checks.set(EMBEDDING, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


@contextmanager
def upstream(kind: str, state: Path) -> Iterator[int]:
    if kind == "trivial":
        args = [sys.executable, __file__, "--serve-trivial-upstream"]
        ready = r"listening on [\d.]+:(\d+)"
    else:
        args = [sys.executable, "-m", "aimesh_servers.cli", "serve", "embedding", "--model", MODEL]
        ready = r"serving .* on port (\d+)"
    env = {**os.environ, "AIMESH_REGISTRY_DIR": str(state / "registrations")}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"upstream exited with {proc.returncode}")
            if match := re.search(ready, line):
                yield int(match.group(1))
                break
        else:
            raise RuntimeError("upstream did not start")
    finally:
        proc.terminate()
        proc.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admission(tenants: int) -> dict:
    """A realistic state: many tenants, and for the caller request windows that count
    every call (limits it never reaches) and a block on another model."""
    others = {f"tenant-{i}": {"disabled": False, "capabilities": ["text", "embedding"], "models": None,
                              "requests": {"*": {"*": [1000, 60]}}, "blocked": {}}
              for i in range(tenants)}
    far = int(time.time()) + 3600
    bench = {"disabled": False, "capabilities": None, "models": None,
             "requests": {"embedding": {"*": [1e12, 60]}, "*": {"*": [1e12, 3600]}},
             "blocked": {"text": {"*": {"reason": "RATE_LIMITED", "until": far, "message": "blocked",
                                        "subject": "tokens per 60 s"}}}}
    return {"version": 1, "enforce": True, "revoked": [uuid.uuid4().hex for _ in range(100)],
            "tenants": {**others, "bench": bench}}


@contextmanager
def front_door(state: Path, upstream_port: int, tenancy: bool, key: ec.EllipticCurvePrivateKey,
               tenants: int) -> Iterator[tuple[str, int]]:
    state.mkdir(parents=True)
    (state / "registry.yaml").write_text(REGISTRY)
    spec = MeshSpec(registry=load_registry(state / "registry.yaml"), state_dir=state,
                    control_port=upstream_port, port=free_port(), admin_port=free_port(), tenancy=tenancy)
    controller = EndpointController(spec, spec.registry)
    controller.instances = [Instance(id="bench", address="127.0.0.1", port=upstream_port, model=MODEL,
                                     pool="local", version="1", grpc_service=EMBEDDING)]
    config = envoy_process.write_config(spec, controller)
    if tenancy:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        write_jwt_config(spec, [JwtProvider("aimesh", "aimesh", ("aimesh",), json.dumps(
            {"keys": [{**public, "kid": "bench", "alg": "ES256", "use": "sig"}]}))])
        write_routes(spec, admission(tenants))
    proc = envoy_process.start(config, state / "envoy.log")
    try:
        envoy_process.wait_ready(spec.admin_port, proc)
        yield f"127.0.0.1:{spec.port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def token(key: ec.EllipticCurvePrivateKey) -> str:
    now = int(time.time())
    return jwt.encode({"iss": "aimesh", "aud": "aimesh", "tenant": "bench", "scope": "embedding",
                       "jti": uuid.uuid4().hex, "iat": now, "exp": now + 3600},
                      key, algorithm="ES256", headers={"kid": "bench"})


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 for none)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(target: str, bearer: str | None, callers: int, calls: int,
              envoy_pid: int | None = None) -> tuple[float, float, float]:
    """(p50 ms, calls/s, Envoy CPU ms per call) of `calls` Embed calls shared by `callers`
    concurrent callers. Envoy's CPU per call is the figure least disturbed by whatever else
    runs on the machine."""
    metadata = [("x-aimesh-model", MODEL)] + ([("authorization", f"Bearer {bearer}")] if bearer else [])
    async with grpc.aio.insecure_channel(target) as channel:
        embed = channel.unary_unary(f"/{EMBEDDING}/Embed")
        await embed(REQUEST, metadata=metadata, timeout=30)  # connection and route warm
        latencies: list[float] = []
        per_caller = max(1, calls // callers)

        async def caller() -> None:
            for _ in range(per_caller):
                start = time.perf_counter()
                await embed(REQUEST, metadata=metadata, timeout=30)
                latencies.append(time.perf_counter() - start)

        cpu_before, start = cpu_seconds(envoy_pid), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(envoy_pid) - cpu_before
    return (statistics.median(latencies) * 1000, len(latencies) / elapsed,
            cpu * 1000 / len(latencies))


async def main(args: argparse.Namespace) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    bearer = token(key)
    with tempfile.TemporaryDirectory() as tmp, upstream(args.upstream, Path(tmp)) as port, \
            front_door(Path(tmp) / "on", port, True, key, args.tenants) as on, \
            front_door(Path(tmp) / "off", port, False, key, args.tenants) as off:
        variants = {"tenancy off": (*off, None), "tenancy on": (*on, bearer),
                    "direct": (f"127.0.0.1:{port}", None, None)}
        for target, _, auth in variants.values():  # until Envoy's health checks route to the upstream
            deadline = time.monotonic() + 30
            while True:
                try:
                    await run(target, auth, 1, 1)
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        names = list(variants)
        for round_ in range(args.rounds):
            for callers in (1, 16):
                for name in names[round_ % 3:] + names[:round_ % 3]:  # no variant always goes first
                    target, pid, auth = variants[name]
                    results.setdefault((name, callers), []).append(
                        await run(target, auth, callers, args.calls, pid))

    def median(name: str, callers: int) -> tuple[float, float, float]:
        rounds = results[(name, callers)]
        return tuple(statistics.median(r[i] for r in rounds) for i in range(3))  # type: ignore[return-value]

    print(f"upstream: {args.upstream}; {args.calls} calls x {args.rounds} rounds per cell; "
          f"{args.tenants} other tenants in the admission state; Envoy --concurrency 1")
    print(f"{'variant':<12} {'callers':>7} {'p50 ms':>8} {'calls/s':>9} {'p50 vs off':>11} "
          f"{'calls/s vs off':>15} {'Envoy CPU ms/call':>18}")
    for callers in (1, 16):
        base_p50, base_rate, _ = median("tenancy off", callers)
        for name in variants:
            p50, rate, cpu = median(name, callers)
            envoy_cpu = f"{cpu:.3f}" if variants[name][1] else "-"
            print(f"{name:<12} {callers:>7} {p50:>8.3f} {rate:>9.0f} {p50 - base_p50:>+10.3f}ms "
                  f"{rate / base_rate:>14.2f}x {envoy_cpu:>18}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-trivial-upstream"]:
        asyncio.run(serve_trivial_upstream())
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", choices=["trivial", "embedding"], default="trivial")
    parser.add_argument("--calls", type=int, default=400, help="calls per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=1000)
    asyncio.run(main(parser.parse_args()))

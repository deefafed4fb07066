"""What the front door costs: the same cheap unary call (an embedding of one short
text) straight to the model server, through a bare Envoy with one plain route to that
server, and through aimesh's Envoy (`aimesh up --only embedding`), at 1 and 16 callers.
Targets take turns, round after round; figures are the median round. CPU time per call
of Envoy, the model server and `aimesh up` (control server, usage collector) is counted
too: on a busy machine it varies far less than latency does.

Goals: aimesh's Envoy adds at most 1.5x the p50 latency the bare Envoy adds (1 caller),
and keeps >= 0.8x the direct calls/s at 16 callers.

--dissect also runs copies of aimesh's generated Envoy config with one part taken out
each (Lua, transcoder, header mutation, access log, retry policy, ...), all routing to
the same server, to show where the route's cost goes.

    .venv/bin/python bench/bench_overhead.py [--quick] [--dissect] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common  # bench/common.py
import grpc
import yaml
from aimesh.embedding.v1 import embedding_pb2 as pb
from aimesh.embedding.v1 import embedding_pb2_grpc as pb_grpc
from aimesh_servers.mesh import envoy_process

from tests.mesh.conftest import Mesh, free_port

MODEL = "all-minilm-l6-v2"
TEXT = "How far is the lighthouse from the harbour?"
CALLERS = (1, 16)


@dataclass(frozen=True)
class MeshVariant:
    """One `aimesh up` to measure. Each brings its own server, measured direct as well."""

    name: str
    tenancy: bool = False  # on: calls carry the local tenant's token
    up_args: tuple[str, ...] = ()  # extra `aimesh up` arguments


# Adding a way to run the mesh is one entry here. The first is the one the goals are about
# with no tenancy, as the bare Envoy has none; the tenancy row shows what tokens and limits add.
MESH_VARIANTS = [
    MeshVariant("aimesh envoy"),
    MeshVariant("aimesh envoy, tenancy on", tenancy=True),
]

def bench_tenant(mesh: Mesh) -> str:
    """A tenant whose limits are enforced on every call (the Lua counts each request, units
    are charged) but set far above what the benchmark sends, so none is refused."""
    import aimesh

    with aimesh.Client(mesh.front, token=mesh.admin_token, timeout=30) as admin:
        admin.tenants.create("bench")
        admin.tenants.set_limit("bench", "embedding", "requests", 1e9, 60)
        admin.tenants.set_limit("bench", "embedding", "units", 1e12, 60)
        return admin.tenants.issue_token("bench", ["embedding"]).token


@dataclass
class Target:
    name: str
    address: str
    direct: str  # the name of the target that calls the same server straight
    metadata: tuple[tuple[str, str], ...] = ()
    pids: dict[str, int] = field(default_factory=dict)  # "envoy", "server": CPU time is counted per call


def bare_envoy_config(server: str, port: int, admin_port: int) -> dict[str, Any]:
    """A plain gRPC route: listener -> HTTP connection manager (router only) -> the server."""
    host, server_port = server.rsplit(":", 1)
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "bare", "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "server", "timeout": "60s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "bare", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [{
                "name": "server", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "server", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": host, "port_value": int(server_port)}}}}]}]},
            }],
        },
    }


# --dissect: aimesh's own config with one part removed. Each edits the bootstrap dict in place.
def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _without_filter(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        hcm = _hcm(config)
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != name]
    return edit


def _router_only(config: dict[str, Any]) -> None:
    hcm = _hcm(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]


def _pop_hcm(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda config: _hcm(config).pop(key, None)


def _no_retry_policy(config: dict[str, Any]) -> None:
    """Routes come from an RDS file: point this copy at an edited copy of it."""
    source = _hcm(config)["rds"]["config_source"]["path_config_source"]
    routes = yaml.safe_load(Path(source["path"]).read_text())
    for resource in routes["resources"]:
        for vhost in resource["virtual_hosts"]:
            for route in vhost["routes"]:
                route.get("route", {}).pop("retry_policy", None)
    folder = Path(source["path"]).parent.parent / "rds-no-retries"
    folder.mkdir(exist_ok=True)
    (folder / "routes.yaml").write_text(yaml.safe_dump(routes, sort_keys=False))
    source.update(path=str(folder / "routes.yaml"), watched_directory={"path": str(folder)})


def _no_cluster_extras(config: dict[str, Any]) -> None:
    for cluster in config["static_resources"]["clusters"]:
        for key in ("health_checks", "outlier_detection", "circuit_breakers"):
            cluster.pop(key, None)


DISSECT: dict[str, Callable[[dict[str, Any]], None]] = {
    "aimesh config, as generated": lambda config: None,
    "- lua (routing by model from the HTTP path)": _without_filter("envoy.filters.http.lua"),
    "- grpc_json_transcoder": _without_filter("envoy.filters.http.grpc_json_transcoder"),
    "- header_mutation": _without_filter("envoy.filters.http.header_mutation"),
    "router only (no lua, transcoder, mutation)": _router_only,
    "- access log": _pop_hcm("access_log"),
    "- local reply mappers": _pop_hcm("local_reply_config"),
    "- retry policy": _no_retry_policy,
    "- health checks, outlier detection, breakers": _no_cluster_extras,
}


class Envoy:
    def __init__(self, config: dict[str, Any], folder: Path, name: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        config = copy.deepcopy(config)
        config["admin"]["address"]["socket_address"]["port_value"] = self.admin_port
        config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = self.port
        for log in _hcm(config).get("access_log", []):
            log["typed_config"]["path"] = str(folder / f"{name}.access.log")
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc = envoy_process.start(path, folder / f"{name}.log")  # the flags aimesh up runs Envoy with
        envoy_process.wait_ready(self.admin_port, self.proc)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def server_address(state_dir: Path) -> str:
    registration = json.loads(next((state_dir / "registrations").glob("*.json")).read_text())
    return f"{registration['address']}:{registration['port']}"


async def wait_routable(address: str, metadata: tuple[tuple[str, str], ...], timeout: float = 60) -> None:
    """Until a call through `address` succeeds (Envoy's health checks admit the server)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        while True:
            try:
                await stub.Embed(pb.EmbedRequest(model=MODEL, texts=[TEXT]), metadata=metadata, timeout=10)
                return
            except grpc.aio.AioRpcError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)


Results = dict[str, dict[int, list[common.LoadResult]]]
CpuSeconds = dict[str, dict[int, dict[str, float]]]  # target -> callers -> process role -> CPU s


async def measure(targets: list[Target], seconds: float, rounds: int) -> tuple[Results, CpuSeconds]:
    """Closed-loop runs, targets taking turns; and the CPU time each target's processes spent in them."""
    results: Results = {t.name: {c: [] for c in CALLERS} for t in targets}
    cpu: CpuSeconds = {t.name: {c: dict.fromkeys(t.pids, 0.0) for c in CALLERS} for t in targets}
    channels = {t.name: grpc.aio.insecure_channel(t.address) for t in targets}
    request = pb.EmbedRequest(model=MODEL, texts=[TEXT], normalize=True)
    try:
        for round_ in range(rounds + 1):  # round 0 warms every path up
            for callers in CALLERS:
                for target in targets:
                    stub = pb_grpc.EmbeddingServiceStub(channels[target.name])

                    async def call(_: int, stub: pb_grpc.EmbeddingServiceStub = stub,
                                   metadata: tuple[tuple[str, str], ...] = target.metadata) -> None:
                        await stub.Embed(request, metadata=metadata, timeout=30)

                    before = {role: common.cpu_seconds(pid) for role, pid in target.pids.items()}
                    run = await common.closed_loop(call, callers, seconds=seconds if round_ else seconds / 4)
                    if round_:
                        results[target.name][callers].append(run)
                        for role, pid in target.pids.items():
                            cpu[target.name][callers][role] += common.cpu_seconds(pid) - before[role]
    finally:
        for channel in channels.values():
            await channel.close()
    return results, cpu


def median_round(runs: list[common.LoadResult], key: Callable[[common.LoadResult], float]) -> float:
    values = sorted(key(r) for r in runs)
    return values[len(values) // 2]


async def main(args: argparse.Namespace) -> None:
    seconds, rounds = (1.5, 3) if args.quick else (3.0, 5)
    targets: list[Target] = []
    meshes: list[Mesh] = []
    envoys: list[Envoy] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            for n, variant in enumerate(MESH_VARIANTS):
                mesh = Mesh(folder / f"mesh{n}", only=["embedding"], extra_args=variant.up_args,
                            tenancy=variant.tenancy)
                meshes.append(mesh)
                mesh.wait_ready()
                server = server_address(mesh.state_dir)
                server_pid = json.loads((mesh.state_dir / "servers.json").read_text())[0]["pid"]
                envoy_pid = int(mesh.wait_line(r"envoy listening on .* \(pid (\d+)\)").group(1))
                token = (("authorization", f"Bearer {bench_tenant(mesh)}"),) if variant.tenancy else ()
                direct = "direct" if n == 0 else f"direct ({variant.name}'s server)"
                # `aimesh up` itself (control server, usage collector) works per call too, on either route.
                targets.append(Target(direct, server, direct, pids={"server": server_pid, "mesh": mesh.proc.pid}))
                if n == 0:
                    first_server_pid = server_pid
                    bare = Envoy(bare_envoy_config(server, 0, 0), folder, "bare")
                    envoys.append(bare)
                    targets.append(Target("bare envoy", bare.address, direct,
                                          pids={"envoy": bare.proc.pid, "server": server_pid, "mesh": mesh.proc.pid}))
                targets.append(Target(variant.name, mesh.front, direct, token,
                                      pids={"envoy": envoy_pid, "server": server_pid, "mesh": mesh.proc.pid}))
            if args.dissect:
                generated = yaml.safe_load((meshes[0].state_dir / "envoy.yaml").read_text())
                for k, (name, edit) in enumerate(DISSECT.items()):
                    config = copy.deepcopy(generated)
                    edit(config)
                    envoy = Envoy(config, folder, f"dissect{k}")
                    envoys.append(envoy)
                    targets.append(Target(f"dissect: {name}", envoy.address, "direct",
                                          pids={"envoy": envoy.proc.pid, "server": first_server_pid,
                                                "mesh": meshes[0].proc.pid}))
            for target in targets:
                await wait_routable(target.address, target.metadata)
            results, cpu = await measure(targets, seconds, rounds)
        finally:
            for envoy in envoys:
                envoy.stop()
            for mesh in meshes:
                mesh.stop()

    rows: dict[str, Any] = {}
    print(f"embedding of one short text, unary gRPC, closed loop, {seconds:g} s a run, median of {rounds} rounds "
          f"(targets take turns)")
    print(f"  {'target':48s} {'callers':>7s} {'p50 ms':>8s} {'added ms':>9s} {'calls/s':>9s} {'x direct':>9s} "
          f"{'CPU us/call: envoy':>18s} {'server':>7s} {'aimesh up':>9s}  errors")
    for target in targets:
        rows[target.name] = {}
        for callers in CALLERS:
            runs = results[target.name][callers]
            base = results[target.direct][callers]
            p50 = median_round(runs, lambda r: r.p50_ms)
            added = p50 - median_round(base, lambda r: r.p50_ms)
            rate = median_round(runs, lambda r: r.calls_per_s)
            ratio = rate / median_round(base, lambda r: r.calls_per_s)
            errors = sum(sum(r.errors.values()) for r in runs)
            calls = sum(len(r.latencies_s) for r in runs)
            cpu_us = {role: round(used / max(calls, 1) * 1e6, 1) for role, used in cpu[target.name][callers].items()}
            rows[target.name][callers] = {"p50_ms": round(p50, 3), "added_p50_ms": round(added, 3),
                                          "calls_per_s": round(rate, 1), "x_direct_calls_per_s": round(ratio, 3),
                                          "cpu_us_per_call": cpu_us, "errors": errors,
                                          "rounds": [r.summary() for r in runs]}
            envoy_cpu = f"{cpu_us['envoy']:.0f}" if "envoy" in cpu_us else "-"
            print(f"  {target.name:48s} {callers:7d} {p50:8.2f} {added:9.2f} {rate:9.1f} {ratio:9.2f} "
                  f"{envoy_cpu:>18s} {cpu_us.get('server', 0):7.0f} {cpu_us.get('mesh', 0):9.0f}  {errors or ''}")

    bare_added = rows["bare envoy"][1]["added_p50_ms"]
    goals = []
    for variant in MESH_VARIANTS:
        added = rows[variant.name][1]["added_p50_ms"]
        # A bare route's cost is a fraction of a millisecond: floor it, so noise cannot make the ratio explode
        # (and a negative difference, noise too, counts as nothing added).
        ratio = max(added, 0.0) / max(bare_added, 0.05)
        envoy_cpu, bare_cpu = (rows[name][1]["cpu_us_per_call"]["envoy"] for name in (variant.name, "bare envoy"))
        goals.append(common.Goal(f"{variant.name}: added p50 over the bare Envoy's (1 caller)", ratio, "<= 1.5x",
                                 ratio <= 1.5, f"+{added:.2f} ms vs +{bare_added:.2f} ms; Envoy CPU per call "
                                               f"{envoy_cpu:.0f} us vs {bare_cpu:.0f} us"))
        kept = rows[variant.name][16]["x_direct_calls_per_s"]
        goals.append(common.Goal(f"{variant.name}: calls/s of direct at 16 callers", kept, ">= 0.8x", kept >= 0.8))
    common.report("overhead", args.json, goals, {"rows": rows, "seconds_per_run": seconds, "rounds": rounds})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer rounds")
    parser.add_argument("--dissect", action="store_true",
                        help="also measure aimesh's config with one part taken out at a time")
    parser.add_argument("--json", help="write the results and goals here")
    asyncio.run(main(parser.parse_args()))

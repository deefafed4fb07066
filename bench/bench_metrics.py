"""What /metrics costs a model server: the cheap embedding call (one short text) against
two `aimesh serve embedding` servers, metrics off (the baseline) and on
(AIMESH_METRICS_PORT), while a scraper reads the second one's /metrics every second as
Prometheus would. 1 and 16 closed-loop gRPC callers; the servers take turns (which one
goes first alternates), round after round, and the figures are the median round; each
server's CPU time per call too. Also the metrics sink's own cost per call, in this
process (ServerMetrics.submit of a closed CallAccount).

Goal: metrics on keeps >= 0.95x the calls/s of metrics off at 16 callers (and, as
load from elsewhere sways calls/s, costs <= 1.05x the server CPU time per call).

Through Envoy too, in the same rounds: an Envoy with one plain gRPC route to the
metrics-off server, tracing off (the baseline), against an Envoy with its OpenTelemetry
tracer (100% sampling, a span per upstream attempt) routing to a third server with
metrics on (scraped) and tracing on, both exporting to an OTLP/gRPC receiver in a process
of its own (tests/otlp_receiver.py). Goal: tracing + metrics on keep >= 0.95x the calls/s
(16 callers) and add <= 0.3 ms to the p50 (1 caller).

    .venv/bin/python bench/bench_metrics.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # bench/common.py
import grpc
import httpx
from aimesh.embedding.v1 import embedding_pb2 as pb
from aimesh.embedding.v1 import embedding_pb2_grpc as pb_grpc
from aimesh_servers.mesh.envoy_config import MeshSpec, otlp_cluster, tracing
from aimesh_servers.registry.schema import load_registry
from aimesh_servers.runtime.accounting import CallAccount
from aimesh_servers.runtime.admission import Admission
from aimesh_servers.runtime.metrics import ServerMetrics
from bench_overhead import Envoy, bare_envoy_config

MODEL = "all-minilm-l6-v2"
TEXT = "How far is the lighthouse from the harbour?"
CALLERS = (1, 16)
OFF, ON = "metrics off", "metrics on (scraped every 1 s)"
ENVOY_OFF, ENVOY_ON = "envoy: tracing+metrics off", "envoy: tracing 100%+metrics on"


def sink_cost_us(calls: int = 50_000) -> float:
    """Microseconds ServerMetrics.submit takes for one closed call."""
    sink = ServerMetrics(Admission(4, 32, 2.0), default_pool="local")
    account = CallAccount(method="/aimesh.embedding.v1.EmbeddingService/Embed", request_id="r",
                          tenant="t", requested_model=MODEL, served_model=MODEL, pool="local",
                          unit="tokens", input_units=12, duration_s=0.011, first_output_s=0.011)
    start = time.perf_counter()
    for _ in range(calls):
        sink.submit(account)
    return (time.perf_counter() - start) / calls * 1e6


class Receiver:
    """The OTLP/gRPC receiver in a process of its own, as a collector would be."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver"], cwd=common.ROOT,
                                     stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.endpoint = self.proc.stdout.readline().split()[-1]  # "otlp receiver on HOST:PORT"

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out.strip()


def traced_envoy(server: str, endpoint: str, folder: Path) -> Envoy:
    """The bare route with aimesh's tracer block and OTLP cluster (envoy_config.tracing)."""
    config = bare_envoy_config(server, 0, 0)
    spec = MeshSpec(registry=load_registry(), state_dir=folder, control_port=0, otlp_endpoint=endpoint)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"] = tracing(spec)
    config["static_resources"]["clusters"].append(otlp_cluster(spec))
    return Envoy(config, folder, "traced")


class Routed:
    """A server as reached through an Envoy (CPU per call is still the server's)."""

    def __init__(self, envoy: Envoy, server: common.ServerProcess) -> None:
        self.address = envoy.address
        self.proc = server.proc


class Scraper:
    """GET /metrics every second in a thread, as Prometheus does, while the bench runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(1.0):
                http.get(self.url).raise_for_status()
                self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


Results = dict[str, dict[int, list[common.LoadResult]]]


async def measure(servers: dict[str, common.ServerProcess | Routed], seconds: float, rounds: int
                  ) -> tuple[Results, dict[str, dict[int, float]]]:
    """The load runs, and each server's CPU microseconds per call (less sensitive than calls/s
    to load from elsewhere on the machine). The order of the servers rotates every round."""
    results: Results = {n: {c: [] for c in CALLERS} for n in servers}
    cpu_s = {n: dict.fromkeys(CALLERS, 0.0) for n in servers}
    request = pb.EmbedRequest(model=MODEL, texts=[TEXT], normalize=True)
    channels = {n: grpc.aio.insecure_channel(s.address) for n, s in servers.items()}
    names = list(servers)
    try:
        for round_ in range(rounds + 1):  # round 0 warms both up
            for callers in CALLERS:
                for name in names[round_ % 2:] + names[:round_ % 2]:
                    stub = pb_grpc.EmbeddingServiceStub(channels[name])

                    async def call(_: int, stub: pb_grpc.EmbeddingServiceStub = stub) -> None:
                        await stub.Embed(request, timeout=30)

                    before = common.cpu_seconds(servers[name].proc.pid)
                    run = await common.closed_loop(call, callers, seconds=seconds if round_ else seconds / 4)
                    if round_:
                        results[name][callers].append(run)
                        cpu_s[name][callers] += common.cpu_seconds(servers[name].proc.pid) - before
    finally:
        for channel in channels.values():
            await channel.close()
    calls = {n: {c: sum(len(r.latencies_s) for r in results[n][c]) for c in CALLERS} for n in servers}
    cpu_us = {n: {c: cpu_s[n][c] / max(1, calls[n][c]) * 1e6 for c in CALLERS} for n in servers}
    return results, cpu_us


def median(runs: list[common.LoadResult]) -> float:
    values = sorted(r.calls_per_s for r in runs)
    return values[len(values) // 2]


async def main(args: argparse.Namespace) -> None:
    seconds, rounds = (2.0, 5) if args.quick else (3.0, 11)  # many short rounds: the median resists load from elsewhere
    per_call_us = sink_cost_us()
    receiver = Receiver()
    folder = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    off = common.ServerProcess("embedding").wait_serving()
    on = common.ServerProcess("embedding", env={"AIMESH_METRICS_PORT": "0"}).wait_serving()
    traced = common.ServerProcess("embedding", env={
        "AIMESH_METRICS_PORT": "0", "AIMESH_OTLP_ENDPOINT": receiver.endpoint}).wait_serving()
    scrapers = [Scraper(f"http://127.0.0.1:{metrics_port(server)}/metrics") for server in (on, traced)]
    plain_envoy = Envoy(bare_envoy_config(off.address, 0, 0), folder, "plain")
    envoy = traced_envoy(traced.address, receiver.endpoint, folder)
    try:
        results, cpu_us = await measure({OFF: off, ON: on, ENVOY_OFF: Routed(plain_envoy, off),
                                         ENVOY_ON: Routed(envoy, traced)}, seconds, rounds)
    finally:
        for scraper in scrapers:
            scraper.stop()
        for process in (plain_envoy, envoy, off, on, traced):
            process.stop()
        received = receiver.stop()
    scrapes = sum(scraper.scrapes for scraper in scrapers)
    print(f"metrics sink: {per_call_us:.1f} us per call (in-process); {scrapes} scrapes during the run; "
          f"the OTLP receiver {received}")
    print(f"{'variant':32s} {'callers':>7s} {'calls/s':>8s} {'p50 ms':>7s}  vs off  server CPU us/call")
    summary: dict[str, dict[int, float]] = {}
    p50s: dict[str, dict[int, float]] = {}
    for name, baseline in ((OFF, OFF), (ON, OFF), (ENVOY_OFF, ENVOY_OFF), (ENVOY_ON, ENVOY_OFF)):
        for callers in CALLERS:
            runs = results[name][callers]
            rate = median(runs)
            summary.setdefault(name, {})[callers] = rate
            p50 = sorted(r.p50_ms for r in runs)[len(runs) // 2]
            p50s.setdefault(name, {})[callers] = p50
            ratio = rate / summary[baseline][callers]
            print(f"{name:32s} {callers:7d} {rate:8.1f} {p50:7.2f}  {ratio:.3f}x  {cpu_us[name][callers]:8.0f}")
    ratio16 = summary[ON][16] / summary[OFF][16]
    cpu_ratio16 = cpu_us[ON][16] / cpu_us[OFF][16]
    traced16 = summary[ENVOY_ON][16] / summary[ENVOY_OFF][16]
    added_p50 = p50s[ENVOY_ON][1] - p50s[ENVOY_OFF][1]
    common.report("metrics", args.json, [
        common.Goal("metrics on: calls/s vs off at 16 callers", ratio16, ">= 0.95x", ratio16 >= 0.95,
                    f"{summary[ON][16]:.0f} vs {summary[OFF][16]:.0f} calls/s; sink {per_call_us:.1f} us/call"),
        # The same cost as CPU time, which load from elsewhere on the machine sways far less.
        common.Goal("metrics on: server CPU per call vs off at 16 callers", cpu_ratio16, "<= 1.05x",
                    cpu_ratio16 <= 1.05, f"{cpu_us[ON][16]:.0f} vs {cpu_us[OFF][16]:.0f} us/call"),
        common.Goal("tracing 100% + metrics on via Envoy: calls/s vs both off at 16 callers", traced16,
                    ">= 0.95x", traced16 >= 0.95,
                    f"{summary[ENVOY_ON][16]:.0f} vs {summary[ENVOY_OFF][16]:.0f} calls/s"),
        common.Goal("tracing 100% + metrics on via Envoy: p50 added at 1 caller (ms)", added_p50,
                    "<= 0.3 ms", added_p50 <= 0.3,
                    f"{p50s[ENVOY_ON][1]:.2f} vs {p50s[ENVOY_OFF][1]:.2f} ms"),
    ],
        {"calls_per_s": summary, "p50_ms": p50s, "server_cpu_us_per_call": cpu_us,
         "sink_us_per_call": per_call_us, "scrapes": scrapes, "otlp_receiver": received})


def metrics_port(server: common.ServerProcess) -> int:
    return next(int(m.group(1)) for line in server.lines if (m := re.search(r"metrics on :(\d+)", line)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--json", help="write the results here")
    asyncio.run(main(parser.parse_args()))

"""Observability of a real mesh (tenancy on): a real Prometheus scrapes the servers'
/metrics and Envoy's stats from the config `aimesh up` writes; /healthz and /readyz
answer load balancers without a token; `aimesh status` sees an endpoint up, not up once
its server is SIGKILLed (and /readyz turns 503), and up again once `aimesh up` restarted
it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aimesh
import httpx
import pytest
import yaml

from tests import polling
from tests.mesh.conftest import Mesh, free_port

MODEL = "all-minilm-l6-v2"


def poll(probe: Callable[[], Any], what: str, timeout: float = 90, every: float = 0.3) -> Any:
    """Like tests.polling.poll; a front door or Prometheus not answering yet is "not yet"."""
    return polling.poll(probe, what, timeout, every, ignore=(httpx.HTTPError, ValueError, KeyError))

@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(tmp_path_factory.mktemp("observability"), only=["embedding"], tenancy=True)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture
def prometheus(mesh: Mesh, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on the generated scrape config, scraping every second."""
    config = yaml.safe_load((mesh.state_dir / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--web.listen-address={address}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        poll(lambda: httpx.get(f"http://{address}/-/ready", timeout=2).status_code == 200,
             "Prometheus ready")
        yield f"http://{address}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def scalar(prometheus: str, promql: str) -> float | None:
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


def status(mesh: Mesh) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "aimesh_servers.cli", "status", "--json", "--front", mesh.front,
         "--admin-port", str(mesh.admin_port), "--state-dir", str(mesh.state_dir)],
        capture_output=True, text=True, timeout=60, check=True)
    (model,) = [m for m in json.loads(out.stdout)["models"] if m["id"] == MODEL]
    return model


def endpoints(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for pool in model["pools"] for e in pool["endpoints"]]


def test_prometheus_counts_the_calls_by_model_and_pool(mesh: Mesh, prometheus: str):
    calls = 7
    with aimesh.Client(mesh.front, token=mesh.token, timeout=30) as client:
        for i in range(calls):
            client.embedding.embed(MODEL, [f"sentence number {i}"])
    selector = f'model="{MODEL}",pool="local"'
    poll(lambda: scalar(prometheus, f'sum(aimesh_server_calls_total{{{selector},code="OK"}})') == calls,
         f"Prometheus counts {calls} OK calls")
    assert scalar(prometheus, f"sum(aimesh_server_errors_total{{{selector}}})") is None
    assert scalar(prometheus, f"sum(aimesh_server_call_duration_seconds_count{{{selector}}})") == calls
    assert scalar(prometheus, f'sum(aimesh_server_input_units_total{{{selector},unit="tokens"}})') > 0
    # Envoy's own stats come from its admin /stats/prometheus.
    poll(lambda: scalar(prometheus, 'up{job="envoy"}') == 1, "Envoy scraped")
    assert query(prometheus, f'envoy_cluster_upstream_rq_total{{envoy_cluster_name="model_{MODEL}"}}')


class StatusWatch:
    """`aimesh status --json --watch` as a subprocess: every snapshot it prints, kept."""

    def __init__(self, mesh: Mesh) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aimesh_servers.cli", "status", "--json", "--watch", "--front",
             mesh.front, "--admin-port", str(mesh.admin_port), "--state-dir", str(mesh.state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        self.snapshots: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):  # an error line: the next refresh tries again
                (model,) = [m for m in json.loads(line)["models"] if m["id"] == MODEL]
                self.snapshots.append(model)

    def first_since(self, start: int, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        return poll(lambda: next((m for m in self.snapshots[start:] if condition(m)), None), what)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def states(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["state"], e["envoy"]) for e in endpoints(model)]


def test_probes_and_status_follow_a_killed_server(mesh: Mesh):
    front = f"http://{mesh.front}"
    # No token on either probe, with tenancy on.
    healthz = httpx.get(f"{front}/healthz", timeout=10)
    assert healthz.status_code == 200, healthz.text
    poll(lambda: httpx.get(f"{front}/readyz", timeout=10).status_code == 200, "readyz 200")
    with aimesh.Client(mesh.front, token=mesh.token, timeout=30) as client:
        client.embedding.embed(MODEL, ["one call for the last minute's figures"])

    def up_and_counted() -> dict[str, Any] | None:
        model = status(mesh)
        return model if states(model) == [("up", "healthy")] and model["calls"] >= 1 else None

    model = poll(up_and_counted, "status: the endpoint up and healthy, the call counted")
    assert [p["id"] for p in model["pools"]] == ["local"]
    assert model["error_rate"] == 0 and model["fallback_rate"] == 0 and model["p95_ms"] is not None

    watch = StatusWatch(mesh)
    try:
        watch.first_since(0, lambda m: states(m) == [("up", "healthy")], "watch: the endpoint up")
        killed_at = len(watch.snapshots)
        (server,) = json.loads((mesh.state_dir / "servers.json").read_text())
        os.kill(server["pid"], signal.SIGKILL)

        def not_ready() -> dict[str, Any] | None:
            reply = httpx.get(f"{front}/readyz", timeout=10)
            return reply.json() if reply.status_code == 503 else None

        body = poll(not_ready, "readyz 503", every=0.1)
        assert body["models_without_healthy_endpoint"] == [MODEL]
        assert httpx.get(f"{front}/healthz", timeout=10).status_code == 200  # Envoy still runs
        # aimesh up restarts a crashed server (1 s backoff, then it loads): until then the
        # pool has no endpoint up; the dead process shows as down, its successor as starting.
        watch.first_since(killed_at, lambda m: all(s != "up" for s, _ in states(m)),
                          "watch: no endpoint up after the SIGKILL")
        # And status follows the restarted server back.
        watch.first_since(killed_at, lambda m: ("up", "healthy") in states(m) and all(
            e["address"] != f"pid {server['pid']}" for e in endpoints(m)), "watch: up again")
        poll(lambda: httpx.get(f"{front}/readyz", timeout=10).status_code == 200, "readyz 200 again")
    finally:
        watch.stop()

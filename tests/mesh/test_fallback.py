"""Fallback chains under faults, with real Envoy and real model servers as processes.

The mesh serves model `chat` through two pools, primary -> secondary (the registry
starts none: each test starts, kills and drains servers itself). Figures (failed
calls, latency before/after) are printed; run with -s to see them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aimesh
import httpx
import pytest
from aimesh_servers.control.servicer import EnvoyHealth

from tests.mesh.conftest import Mesh
from tests.servers import ServerProcess

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: chat
    capability: text_generation
    versions: [{version: "1", source: "builtin:smollm2-135m-instruct"}]
    pools:
      - {id: primary, serve: text, replicas: 0}
      - {id: secondary, serve: text, replicas: 0}
"""
HI = [("user", "Hi")]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("chain")
    (folder / "registry.yaml").write_text(REGISTRY)
    mesh = Mesh(folder / "state", registry=folder / "registry.yaml")
    try:
        mesh.wait_ready()
        yield mesh
    finally:
        mesh.stop()


def start(mesh: Mesh, pool: str, healthy: bool = True, **env: str) -> ServerProcess:
    """A `chat` server in `pool`, SERVING and (if `healthy`) passing Envoy's health checks."""
    server = ServerProcess(["serve", "text", "--model", "chat", "--pool", pool],
                           env={"AIMESH_REGISTRY_DIR": str(mesh.state_dir / "registrations"), **env})
    server.wait_listening()
    server.wait_serving()
    if not healthy:
        return server
    health = EnvoyHealth(f"http://127.0.0.1:{mesh.admin_port}")
    deadline = time.monotonic() + 30
    while f"127.0.0.1:{server.port}" not in (asyncio.run(health.healthy_endpoints()) or {}).get(
            "model_chat", ()):
        assert time.monotonic() < deadline, f"Envoy never marked the {pool} server healthy"
        time.sleep(0.1)
    return server


def wait_routed(mesh: Mesh, pool: str, timeout: float = 60.0) -> float:
    """Seconds until a call through the front door is served by `pool`."""
    started = time.monotonic()
    with aimesh.Client(mesh.front, max_attempts=1, timeout=10) as client:
        while time.monotonic() - started < timeout:
            try:
                if client.text.generate("chat", HI, max_tokens=1).served_by.pool == pool:
                    return time.monotonic() - started
            except aimesh.AimeshError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"calls never reached pool {pool}")


@dataclass
class Result:
    at: float
    latency: float
    pool: str | None  # None: the call failed
    error: str = ""


class Load:
    """Steady unary load from `callers` threads, each call one token."""

    def __init__(self, mesh: Mesh, callers: int = 3) -> None:
        self.mesh = mesh
        self.results: list[Result] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with aimesh.Client(self.mesh.front, max_attempts=1, timeout=20) as client:
            while not self.stop.is_set():
                began = time.monotonic()
                try:
                    pool = client.text.generate("chat", HI, max_tokens=1).served_by.pool
                    self.results.append(Result(began - self.t0, time.monotonic() - began, pool))
                except aimesh.AimeshError as exc:
                    self.results.append(Result(began - self.t0, time.monotonic() - began, None, str(exc)))

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wait_for(self, what: str, enough: int, counted: Callable[[Result], bool],
                 timeout: float = 120.0) -> None:
        """Polls until `enough` finished calls are `counted`, or fails with what it saw."""
        deadline = time.monotonic() + timeout
        while sum(map(counted, list(self.results))) < enough:
            assert time.monotonic() < deadline, f"fewer than {enough} {what}: {self.results[-5:]}"
            time.sleep(0.05)

    def finish(self) -> list[Result]:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        return self.results


def summary(label: str, rows: list[Result]) -> str:
    if not rows:
        return f"{label}: no calls"
    lat = sorted(r.latency * 1000 for r in rows)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    failed = sum(r.pool is None for r in rows)
    return (f"{label}: {len(rows)} calls, {failed} failed, p50 {statistics.median(lat):.0f} ms, "
            f"p99 {p99:.0f} ms")


def access_log(mesh: Mesh) -> list[dict]:
    return [json.loads(line) for line in (mesh.state_dir / "access.log").read_text().splitlines()]


def test_sigkill_of_the_primary_under_load_loses_no_call(chain):
    primary, secondary = start(chain, "primary"), start(chain, "secondary")
    try:
        wait_routed(chain, "primary")
        load = Load(chain)
        load.wait_for("calls served by the primary", 5, lambda r: r.pool == "primary")
        killed_at = load.now()
        primary.terminate(signal.SIGKILL)
        load.wait_for("calls begun 3 s after the kill", 5, lambda r: r.at >= killed_at + 3)
        results = load.finish()
    finally:
        primary.stop()
        secondary.stop()
    # Calls that ended before the kill; those in flight at the kill were retried elsewhere.
    before = [r for r in results if r.at + r.latency < killed_at]
    during = [r for r in results if killed_at <= r.at < killed_at + 3]
    after = [r for r in results if r.at >= killed_at + 3]
    for label, rows in (("before", before), ("kill+0-3s", during), ("after", after)):
        print(summary(f"SIGKILL {label}", rows))
    failed = [r for r in results if r.pool is None]
    assert not failed, f"{len(failed)} calls failed: {failed[:3]}"
    assert before and {r.pool for r in before} == {"primary"}
    assert after and {r.pool for r in after} == {"secondary"}
    # Once ejected, the dead primary costs nothing: calls reach the secondary at the first try.
    late = [e for e in access_log(chain) if e["model"] == "chat" and e["pool"] == "secondary"][-20:]
    assert late and all(e["attempts"] == 1 for e in late[-10:])


def test_sigterm_drain_under_load_loses_no_call_and_finishes_streams(chain):
    # The grace period lets the stream in flight finish even on a slow, shared CI machine.
    primary = start(chain, "primary", AIMESH_DRAIN_DELAY_S="2", AIMESH_DRAIN_GRACE_S="120")
    secondary = start(chain, "secondary")
    try:
        wait_routed(chain, "primary")
        load = Load(chain)
        pieces: list = []
        streaming = threading.Thread(target=lambda: pieces.extend(
            aimesh.Client(chain.front, max_attempts=1).text.stream_generate(
                "chat", [("user", "Count from 1 to 20.")], max_tokens=60)), daemon=True)
        load.wait_for("calls served by the primary", 5, lambda r: r.pool == "primary")
        streaming.start()
        deadline = time.monotonic() + 120
        while not pieces:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        drained_at = load.now()
        primary.terminate(signal.SIGTERM)
        streaming.join(120)
        load.wait_for("calls begun 1 s after the drain", 5, lambda r: r.at > drained_at + 1)
        results = load.finish()
        assert primary.proc.wait(30) == 0
    finally:
        primary.stop()
        secondary.stop()
    print(summary("SIGTERM before", [r for r in results if r.at < drained_at]))
    print(summary("SIGTERM after", [r for r in results if r.at >= drained_at]))
    assert not [r for r in results if r.pool is None]
    assert pieces[0].served_by.pool == "primary"
    assert pieces[-1].finish_reason != 0, "the stream in flight on the draining server did not finish"
    assert {r.pool for r in results if r.at > drained_at + 1} == {"secondary"}


def test_a_full_primary_spills_to_the_next_pool(chain):
    # One slot: a text engine that batches states its own capacity (AIMESH_TEXT_MAX_BATCH).
    primary = start(chain, "primary", AIMESH_MAX_CONCURRENCY="1", AIMESH_TEXT_MAX_BATCH="1")
    secondary = start(chain, "secondary")
    try:
        wait_routed(chain, "primary")
        # Fill the primary's only slot with a long stream sent to it directly.
        with aimesh.Client(f"127.0.0.1:{primary.port}", max_attempts=1) as direct:
            hog = direct.text.stream_generate("chat", [("user", "Write a long story.")], max_tokens=400)
            next(hog)
            with aimesh.Client(chain.front, max_attempts=1) as client:
                spilled = client.text.generate("chat", HI, max_tokens=2)
            hog.close()
    finally:
        primary.stop()
        secondary.stop()
    assert spilled.served_by.pool == "secondary" and spilled.served_by.requested_model == "chat"


def test_whole_chain_down_is_a_clear_unavailable_before_the_deadline(chain):
    server = start(chain, "secondary")
    wait_routed(chain, "secondary")
    server.terminate(signal.SIGKILL)
    server.stop()
    with (aimesh.Client(chain.front, max_attempts=1) as client,
          pytest.raises(aimesh.UnavailableError) as caught):
        for _ in range(5):  # until Envoy has seen the host die
            client.text.generate("chat", HI, max_tokens=1, timeout=5)
            time.sleep(0.5)
    assert caught.value.reason in ("MODEL_UNAVAILABLE",), caught.value
    assert caught.value.metadata["model"] == "chat" and "primary" in caught.value.message
    reply = httpx.post(f"http://{chain.front}/v1/models/chat:generate", timeout=10,
                       json={"messages": [{"role": "ROLE_USER", "content": "Hi"}]})
    assert reply.status_code == 503
    assert reply.json()["details"][0]["reason"] == "MODEL_UNAVAILABLE"


def test_a_stream_cut_midway_is_unavailable_stream_interrupted(chain):
    primary = start(chain, "primary")
    try:
        wait_routed(chain, "primary")
        with aimesh.Client(chain.front, max_attempts=1) as client:
            stream = client.text.stream_generate("chat", [("user", "Write a long story.")], max_tokens=400)
            with pytest.raises(aimesh.UnavailableError) as caught:
                for index, _ in enumerate(stream):
                    if index == 3:
                        primary.terminate(signal.SIGKILL)
    finally:
        primary.stop()
    assert caught.value.reason == "STREAM_INTERRUPTED"
    assert int(caught.value.metadata["messages_received"]) >= 4


def test_late_and_returning_servers_are_routed_to_within_seconds(chain):
    secondary = start(chain, "secondary")
    try:
        wait_routed(chain, "secondary")
        primary = start(chain, "primary", healthy=False)  # registers late
        late = wait_routed(chain, "primary")
        primary.terminate(signal.SIGKILL)
        primary.stop()
        wait_routed(chain, "secondary")
        back = start(chain, "primary", healthy=False)  # comes back
        returned = wait_routed(chain, "primary")
        back.stop()
    finally:
        secondary.stop()
    # Registration -> EDS (0.25 s poll) -> one passing health check (1 s interval);
    # wait_routed fails past its generous deadline (a loaded 2-core machine is slow).
    print(f"late primary routed {late:.2f}s after SERVING; returning primary {returned:.2f}s")


def test_registry_reports_live_pool_health(chain):
    server = start(chain, "secondary")
    try:
        wait_routed(chain, "secondary")
        with aimesh.Client(chain.front) as client:
            deadline = time.monotonic() + 60
            while True:  # until the registry has seen Envoy's health of both pools
                model = client.registry.get_model("chat")
                if [(p.id, p.health) for p in model.pools] == [("primary", 2), ("secondary", 1)]:
                    break
                assert time.monotonic() < deadline, f"pool health never reported: {model.pools}"
                time.sleep(0.1)
            with pytest.raises(aimesh.NotFoundError) as caught:
                client.registry.get_model("nope")
    finally:
        server.stop()
    pools = {p.id: p for p in model.pools}
    assert [p.id for p in model.pools] == ["primary", "secondary"]
    assert pools["secondary"].endpoints == [f"127.0.0.1:{server.port}"]
    assert pools["secondary"].health == 1 and pools["primary"].health == 2  # SERVING / NOT_SERVING
    assert caught.value.metadata["available"] == "chat"

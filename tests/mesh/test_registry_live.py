"""The registry API's live figures over a real mesh: `aimesh up` with an embedding model
served by two pools (primary -> secondary), real Envoy and real model servers."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import aimesh
import httpx
import pytest
from aimesh.registry.v1 import registry_pb2 as pb
from aimesh_servers.mesh.status import envoy_hosts

from tests.mesh.conftest import Mesh
from tests.polling import poll

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: emb
    capability: embedding
    versions: [{version: "1", source: "builtin:all-minilm-l6-v2"}]
    prices: {tokens: 0.001}
    pools:
      - {id: primary, serve: embedding, replicas: 1}
      - {id: secondary, serve: embedding, replicas: 1}
"""
CALLS = 5


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("live")
    (folder / "registry.yaml").write_text(REGISTRY)
    running = Mesh(folder / "state", registry=folder / "registry.yaml")
    try:
        running.wait_ready()
        # "mesh ready" may come while a host still waits for its first health check, and
        # then Envoy sends priority 0's calls on to the next pool.
        poll(lambda: [h.state for h in (envoy_hosts(f"http://127.0.0.1:{running.admin_port}") or {})
                      .get("model_emb", [])] == ["healthy", "healthy"], "both pools healthy in Envoy")
        yield running
    finally:
        running.stop()


def pools(model: pb.Model) -> dict[str, pb.Pool]:
    return {pool.id: pool for pool in model.pools}


def test_calls_latency_and_cost_of_the_pool_that_served(mesh: Mesh):
    with aimesh.Client(mesh.front, timeout=30) as client:
        before = client.registry.get_model("emb")
        assert before.live.window.seconds == 300
        assert before.live.calls == 0 and not before.live.HasField("latency_p95")
        # Right after start Envoy has now and then sent the first calls on to the second
        # pool although both showed healthy (seen in CI): count them, don't assume none.
        served = [client.embedding.embed("emb", ["warm-up"]).served_by.pool]
        poll(lambda: served[-1] == "primary" or served.append(
            client.embedding.embed("emb", ["warm-up"]).served_by.pool), "a call served by the primary pool")
        on_secondary = served.count("secondary")
        served += [client.embedding.embed("emb", [f"call {i}"]).served_by.pool for i in range(CALLS)]
        assert served[-CALLS:] == ["primary"] * CALLS
        total = len(served)

        def counted() -> pb.Model | None:
            model = client.registry.get_model("emb")
            return model if pools(model)["primary"].live.cost_usd > 0 and model.live.calls == total else None

        model = poll(counted, f"GetModel: {total} calls, {CALLS + 1} of pool primary, with their cost")
        primary, secondary = pools(model)["primary"].live, pools(model)["secondary"].live
        assert primary.calls == CALLS + 1 and secondary.calls == on_secondary
        assert primary.latency_p95.ToNanoseconds() > 0
        assert 0 < primary.latency_p50.ToNanoseconds() <= primary.latency_p95.ToNanoseconds()
        assert primary.error_rate == 0 and primary.fallback_rate == 0
        assert model.live.fallback_rate == pytest.approx(on_secondary / total, abs=1e-4)  # 4 decimals
        assert model.live.cost_usd == pytest.approx(primary.cost_usd + secondary.cost_usd)
        listed = {m.id: m for m in client.registry.list_models()}["emb"]
        assert pools(listed)["primary"].live.calls == CALLS + 1

    # The same figures over HTTP/JSON through Envoy.
    body = httpx.get(f"http://{mesh.front}/v1/models/emb", timeout=10).json()["model"]
    by_pool = {pool["id"]: pool for pool in body["pools"]}
    assert int(by_pool["primary"]["live"]["calls"]) == CALLS + 1
    assert by_pool["primary"]["live"]["latency_p95"].endswith("s")


def test_a_fallback_shows_in_the_fallback_rate(mesh: Mesh):
    servers = json.loads((mesh.state_dir / "servers.json").read_text())
    primary_pid = next(s["pid"] for s in servers if s["pool"] == "primary")
    os.kill(primary_pid, signal.SIGKILL)
    with aimesh.Client(mesh.front, timeout=30) as client:
        def served_by_secondary() -> bool:
            try:
                return client.embedding.embed("emb", ["after the kill"]).served_by.pool == "secondary"
            except aimesh.UnavailableError:  # Envoy's retries may all pick the dead host at first
                return False

        poll(served_by_secondary, "a call served by the secondary pool")

        def fell_back() -> pb.Model | None:
            model = client.registry.get_model("emb")
            return model if model.live.fallback_rate > 0 else None

        model = poll(fell_back, "GetModel: a fallback rate above 0")
        secondary = pools(model)["secondary"].live
        assert secondary.calls >= 1 and secondary.fallback_rate == 1.0
        assert model.live.calls > CALLS + 1

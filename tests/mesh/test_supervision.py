"""`aimesh up` supervises its model servers: a crashed server is restarted with backoff and
rejoins routing without an Envoy restart; a crash loop is given up with the log's last
lines. Run with -s for figures."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import aimesh
import pytest
from aimesh_servers.control.servicer import EnvoyHealth

from tests.mesh.conftest import Mesh

pytestmark = pytest.mark.timeout(900)

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: minilm
    capability: embedding
    versions: [{version: "1", source: "builtin:all-minilm-l6-v2"}]
    pools:
      - {id: local, serve: embedding, replicas: 1}
"""
BROKEN = """
kind: aimesh/registry/v1
models:
  - id: nowhere
    capability: embedding
    versions: [{version: "1", source: "%s"}]
    pools:
      - {id: local, serve: embedding, replicas: 1}
"""


def healthy(mesh: Mesh, model: str) -> set[str]:
    health = EnvoyHealth(f"http://127.0.0.1:{mesh.admin_port}")
    return set((asyncio.run(health.healthy_endpoints()) or {}).get(f"model_{model}", ()))


def test_a_killed_server_is_restarted_and_routed_again(tmp_path):
    (tmp_path / "registry.yaml").write_text(REGISTRY)
    mesh = Mesh(tmp_path / "state", registry=tmp_path / "registry.yaml")
    try:
        mesh.wait_ready()
        [before] = healthy(mesh, "minilm")
        [server] = json.loads((mesh.state_dir / "servers.json").read_text())
        killed = time.monotonic()
        os.kill(server["pid"], signal.SIGKILL)
        mesh.wait_line(r"minilm/local#0: crashed \(exit -9\); restarting in 1s")
        pid = int(mesh.wait_line(r"minilm/local#0: restarted \(pid (\d+)\)").group(1))
        deadline = time.monotonic() + 300
        while not (healthy(mesh, "minilm") - {before}):  # the new process's endpoint
            assert time.monotonic() < deadline, f"restarted server never routed:\n{mesh.output}"
            time.sleep(0.1)
        with aimesh.Client(mesh.front, max_attempts=1, timeout=60) as client:
            out = client.embedding.embed("minilm", ["back again"])
        routed = time.monotonic() - killed
        load = [float(m) for m in re.findall(r"minilm/local#0: serving .* \(loaded in ([\d.]+)s\)", mesh.output)]
        assert json.loads((mesh.state_dir / "servers.json").read_text())[0]["pid"] == pid
        assert "envoy listening" in mesh.output and mesh.output.count("envoy listening") == 1
    finally:
        mesh.stop()
    assert out.dimensions == 384
    print(f"SIGKILL -> routed again in {routed:.1f}s (1 s backoff, model load {load[-1]:.1f}s)")


def test_a_crash_loop_is_given_up_with_the_last_log_lines(tmp_path):
    (tmp_path / "registry.yaml").write_text(BROKEN % (tmp_path / "no-such-model"))
    mesh = Mesh(tmp_path / "state", registry=tmp_path / "registry.yaml")
    try:
        gave_up = mesh.wait_line(r"nowhere/local#0: crashed (\d+) times in 60s: not restarting", timeout=600)
        restarts = mesh.output.count("nowhere/local#0: restarted")
    finally:
        mesh.stop()
    assert gave_up.group(1) == "5" and restarts == 4
    # The last lines of the server's log say why it could not start.
    tail = mesh.output[mesh.output.index("not restarting"):]
    assert "no-such-model" in tail, tail
    print(f"crash loop given up after {gave_up.group(1)} crashes, {restarts} restarts")

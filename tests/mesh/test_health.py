"""grpc.health.v1 on a real server process: NOT_SERVING while loading and draining."""

from __future__ import annotations

import os
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import aimesh
from tests.mesh.conftest import Mesh
from tests.servers import server_process

SERVICE = "aimesh.text.v1.TextGenerationService"
NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING


def test_health_follows_loading_and_draining():
    with server_process("serve", "text", env={"AIMESH_DRAIN_DELAY_S": "2"}) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=120)
            assert next(watch).status == NOT_SERVING  # the model is still loading
            assert next(watch).status == SERVING
            server.wait_serving()
            server.terminate()  # SIGTERM: drain
            assert next(watch).status == NOT_SERVING
            # While draining it still answers calls already routed to it.
            with aimesh.Client(f"127.0.0.1:{server.port}", max_attempts=1) as client:
                answer = client.text.generate("smollm2-135m", [("user", "Hi")], max_tokens=3)
            assert answer.usage.completion_tokens > 0
        assert server.proc.wait(30) == 0


def test_a_killed_aimesh_up_takes_its_envoy_and_servers_with_it(tmp_path):
    mesh = Mesh(tmp_path, only=["text"])
    try:
        mesh.wait_ready()
        children = [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(mesh.proc.pid)], capture_output=True, text=True).stdout.split()]
        assert len(children) >= 2  # Envoy and the text server
        mesh.proc.kill()  # SIGKILL: no chance to drain anything itself
        mesh.proc.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], "orphans left running"
    finally:
        mesh.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child reparented to init and already dead may linger as a zombie briefly.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"

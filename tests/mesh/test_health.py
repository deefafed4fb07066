"""grpc.health.v1 on a real server process: NOT_SERVING while loading and draining."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import aimesh
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

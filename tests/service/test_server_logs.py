"""A real embedding server (`aimesh serve` as a subprocess) logs JSON lines: a per-call
line at DEBUG with the call's trace id, model, pool, status and duration; at INFO no
per-call line; never the call's content, at any level."""

from __future__ import annotations

import json

import grpc
import pytest
from aimesh.embedding.v1 import embedding_pb2 as pb
from aimesh.embedding.v1 import embedding_pb2_grpc as pb_grpc

from tests.servers import ServerProcess

TRACE = "0af7651916cd43dd8448eb211c80319c"
SECRET = "the-launch-code-is-8711"


def embed(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(texts=[SECRET]), timeout=60,
            metadata=(("traceparent", f"00-{TRACE}-b7ad6b7169203331-01"),))


@pytest.fixture(scope="module")
def servers():
    """One server at DEBUG, one at the default level (INFO), loading side by side."""
    started = {level: ServerProcess(["serve", "embedding", "--pool", "blue"], env={"AIMESH_LOG_LEVEL": level})
               for level in ("DEBUG", "")}
    try:
        for server in started.values():
            server.wait_listening()
            server.wait_serving()
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_debug_logs_each_call_as_a_json_line_without_its_content(servers):
    server = servers["DEBUG"]
    embed(server.port)
    line = json.loads(server.wait_for(r'"message": "call"', timeout=30).string)
    assert line["level"] == "DEBUG"
    assert line["trace_id"] == TRACE
    assert line["pool"] == "blue" and line["status"] == "OK" and line["model"]
    assert line["method"] == "aimesh.embedding.v1.EmbeddingService/Embed"
    assert line["duration_ms"] > 0 and line["unit"] == "tokens" and line["input_units"] > 0
    assert SECRET not in "".join(server.lines)


def test_info_has_no_per_call_line_and_no_content(servers):
    server = servers[""]
    embed(server.port)
    server.stop()  # drains: every line the call could have caused is out
    output = "".join(server.lines)
    assert SECRET not in output
    assert '"message": "call"' not in output
    # What the server did log at INFO is JSON lines (the life-cycle lines stay plain text).
    logged = [line for line in output.splitlines() if line.startswith("{")]
    assert all(json.loads(line)["level"] != "DEBUG" for line in logged)

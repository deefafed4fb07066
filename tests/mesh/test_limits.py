"""Front-door body limits per capability, through real Envoy: an oversized text request is
refused with REQUEST_TOO_LARGE (INVALID_ARGUMENT over gRPC, 413 with a JSON
google.rpc.Status over HTTP) before any server sees it; an image larger than the text
limit reaches a real vision server."""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Iterator

import aimesh
import httpx
import numpy as np
import pytest
from aimesh_servers.mesh.envoy_config import BODY_LIMITS, MiB
from aimesh_servers.registry.schema import Capability
from PIL import Image

from tests.conftest import VENV_BIN
from tests.images import encode
from tests.mesh.conftest import Mesh
from tests.servers import ServerProcess

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: captioner
    capability: image_to_text
    random_weights: true
    versions: [{version: "1", source: "builtin:tiny-blip"}]
    pools:
      - {id: primary, serve: vision, replicas: 0}
  - id: chat
    capability: text_generation
    versions: [{version: "1", source: "builtin:smollm2-135m-instruct"}]
    pools:
      - {id: primary, serve: openai, replicas: 0}
"""
TEXT_LIMIT = BODY_LIMITS[Capability.TEXT_GENERATION]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("limits")
    (folder / "registry.yaml").write_text(REGISTRY)
    running = Mesh(folder / "state", registry=folder / "registry.yaml")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_an_oversized_text_request_is_refused_with_the_documented_error(mesh):
    prompt = "x" * (TEXT_LIMIT + MiB)
    with (aimesh.Client(mesh.front, max_attempts=2, timeout=60) as client,
          pytest.raises(aimesh.InvalidArgumentError) as caught):
        client.text.generate("chat", [("user", prompt)], max_tokens=1)
    error = caught.value
    assert error.code.name == "INVALID_ARGUMENT" and error.reason == "REQUEST_TOO_LARGE", error
    assert error.metadata == {"limit_bytes": str(TEXT_LIMIT), "capability": "text_generation"}
    assert "1 MiB" in error.message and not error.retryable

    reply = httpx.post(f"http://{mesh.front}/v1/models/chat:generate", timeout=60,
                       json={"messages": [{"role": "ROLE_USER", "content": prompt}], "max_tokens": 1})
    assert reply.status_code == 413, reply.text
    body = reply.json()
    assert body["code"] == 3 and body["details"][0]["reason"] == "REQUEST_TOO_LARGE"
    assert body["details"][0]["metadata"]["limit_bytes"] == str(TEXT_LIMIT)


def test_streams_of_the_control_server_are_not_buffered(mesh):
    """Reflection is a bidirectional stream: buffered for a body limit, it would wait for an
    end of request the client never sends."""
    listed = subprocess.run([str(VENV_BIN / "grpcurl"), "-plaintext", mesh.front, "list"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "aimesh.vision.v1.ImageToTextService" in listed.stdout, listed.stderr


def test_an_image_larger_than_the_text_limit_reaches_a_vision_server(mesh):
    pixels = np.random.default_rng(7).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    image = encode(Image.fromarray(pixels), "PNG")
    assert TEXT_LIMIT < len(image) < BODY_LIMITS[Capability.IMAGE_TO_TEXT]
    server = ServerProcess(["serve", "vision", "--model", "captioner", "--pool", "primary"],
                           env={"AIMESH_REGISTRY_DIR": str(mesh.state_dir / "registrations")})
    try:
        server.wait_listening()
        server.wait_serving()
        deadline = time.monotonic() + 120
        with aimesh.Client(mesh.front, max_attempts=1, timeout=60) as client:
            while True:  # until Envoy routes to the new server
                try:
                    answer = client.vision.describe_image("captioner", image, tasks=["caption"])
                    break
                except aimesh.UnavailableError as exc:
                    assert time.monotonic() < deadline, f"never routed: {exc}"
                    time.sleep(0.2)
        over_http = httpx.post(f"http://{mesh.front}/v1/models/captioner:describeImage", timeout=60, json={
            "image": base64.b64encode(image).decode(), "tasks": ["TASK_CAPTION"]})
    finally:
        server.stop()
    assert answer.served_by.pool == "primary" and answer.caption
    assert over_http.status_code == 200 and over_http.json()["caption"], over_http.text[:500]

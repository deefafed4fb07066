"""Bad inputs never eject a pool; a server that fails every call still is ejected.

Real inputs on a real mesh: an image 40000 pixels wide and 1 high is a valid PNG that
tesseract refuses ("Image too large"), so the vision engine fails on it (INTERNAL); an
OpenAI-compatible adapter whose provider refuses connections answers every call
UNAVAILABLE while its own health stays SERVING. Run with -s for figures.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import aimesh
import httpx
import pytest
from PIL import Image

from tests.images import encode, text_image
from tests.mesh.conftest import Mesh, free_port
from tests.servers import ServerProcess

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: ocr
    capability: image_to_text
    random_weights: true
    versions: [{version: "1", source: "builtin:tiny-blip"}]
    pools:
      - {id: primary, serve: vision, replicas: 0}
      - {id: secondary, serve: vision, replicas: 0}
  - id: chat
    capability: text_generation
    versions: [{version: "1", source: "builtin:smollm2-135m-instruct"}]
    pools:
      - {id: primary, serve: openai, replicas: 0}
"""
BAD_CALLS = 8


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("bad-input")
    (folder / "registry.yaml").write_text(REGISTRY)
    running = Mesh(folder / "state", registry=folder / "registry.yaml")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def outlier_stats(mesh: Mesh, model: str) -> dict[str, int]:
    text = httpx.get(f"http://127.0.0.1:{mesh.admin_port}/stats", timeout=10,
                     params={"filter": f"^cluster\\.model_{model}\\.outlier_detection\\."}).text
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"outlier_detection\.(\w+): (\d+)", text) if m.group(2) != "0"}


def server(mesh: Mesh, kind: str, model: str, pool: str, **env: str) -> ServerProcess:
    proc = ServerProcess(["serve", kind, "--model", model, "--pool", pool],
                         env={"AIMESH_REGISTRY_DIR": str(mesh.state_dir / "registrations"), **env})
    proc.wait_listening()
    proc.wait_serving()
    return proc


def wait_ocr_routed(mesh: Mesh, good: bytes) -> None:
    deadline = time.monotonic() + 120
    with aimesh.Client(mesh.front, max_attempts=1, timeout=60) as client:
        while True:
            try:
                out = client.vision.describe_image("ocr", good, tasks=["ocr"])
                if out.served_by.pool == "primary":
                    return
            except aimesh.AimeshError:
                pass
            assert time.monotonic() < deadline, "calls never reached the primary vision server"
            time.sleep(0.2)


def test_an_input_that_fails_the_engine_answers_its_caller_and_ejects_nothing(mesh):
    primary = server(mesh, "vision", "ocr", "primary")
    secondary = server(mesh, "vision", "ocr", "secondary")
    good = encode(text_image()[0], "PNG")
    poison = encode(Image.new("RGB", (40000, 1), "white"), "PNG")
    try:
        wait_ocr_routed(mesh, good)
        errors = []
        with aimesh.Client(mesh.front, max_attempts=1, timeout=60) as client:
            for _ in range(BAD_CALLS):
                with pytest.raises(aimesh.AimeshError) as caught:
                    client.vision.describe_image("ocr", poison, tasks=["ocr"])
                errors.append(caught.value)
            # Envoy's detector sees the failures (it counts an unenforced ejection) ...
            deadline = time.monotonic() + 60
            while not outlier_stats(mesh, "ocr").get("ejections_detected_consecutive_5xx"):
                assert time.monotonic() < deadline, f"5xx never detected: {outlier_stats(mesh, 'ocr')}"
                time.sleep(0.2)
            stats = outlier_stats(mesh, "ocr")
            after = client.vision.describe_image("ocr", good, tasks=["ocr"])
    finally:
        primary.stop()
        secondary.stop()
    for err in errors:
        assert err.code.name == "INTERNAL" and err.reason == "ENGINE_FAILURE", err
        assert re.fullmatch(r"[0-9a-f]{16}", err.metadata["incident_id"]), err.metadata
        # What failed inside stays in the server's log, under the incident id.
        assert "large" not in str(err).lower() and "tesseract" not in str(err).lower(), err
    log = "".join(primary.lines)
    assert f"incident {errors[0].metadata['incident_id']}" in log and "TesseractError" in log
    assert after.served_by.pool == "primary" and after.text.startswith("Hello")
    print(f"bad input: {BAD_CALLS} INTERNAL answers, outlier stats {stats}")
    # ... and ejects nobody: the next good call is served by the same primary server.
    assert stats.get("ejections_enforced_total", 0) == 0, stats


def test_a_server_that_fails_every_call_is_ejected(mesh):
    dead_provider = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    broken = server(mesh, "openai", "chat", "primary", AIMESH_OPENAI_BASE_URL=dead_provider,
                    AIMESH_OPENAI_API_KEY="sk-unused")
    try:
        deadline = time.monotonic() + 120
        calls = 0
        with aimesh.Client(mesh.front, max_attempts=1, timeout=30) as client:
            while outlier_stats(mesh, "chat").get("ejections_enforced_consecutive_gateway_failure", 0) == 0:
                assert time.monotonic() < deadline, f"never ejected after {calls} calls"
                with pytest.raises(aimesh.UnavailableError):
                    client.text.generate("chat", [("user", "Hi")], max_tokens=1)
                calls += 1
        stats = outlier_stats(mesh, "chat")
    finally:
        broken.stop()
    print(f"failing server ejected after {calls} calls: {stats}")
    assert stats["ejections_enforced_total"] >= 1

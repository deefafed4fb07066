"""The front door trusts no caller: Envoy's own control headers sent by a caller change
nothing. Each call sends one set of forged headers that would, if obeyed, cut it short
(timeouts) or retry it (retry policy); the access log's attempt count shows what Envoy did.
The mesh listens on every address and the calls come from this machine's own network
address, not loopback: a caller on a private network (compose, `--listen 0.0.0.0`).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from aimesh.vision.v1 import image_to_text_pb2 as pb
from aimesh.vision.v1 import image_to_text_pb2_grpc as pb_grpc
from PIL import Image

from tests.images import encode, text_image
from tests.mesh.conftest import Mesh

pytestmark = pytest.mark.timeout(900)

REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: ocr
    capability: image_to_text
    random_weights: true
    versions: [{version: "1", source: "builtin:tiny-blip"}]
    pools:
      - {id: local, serve: vision, replicas: 1}
"""
# Each would end the call at once if Envoy obeyed it.
TIMEOUTS = [
    ("x-envoy-upstream-rq-timeout-ms", "1"),
    ("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
    ("x-envoy-expected-rq-timeout-ms", "1"),
    ("x-envoy-upstream-stream-duration-ms", "1"),
]
# Together they would retry an INTERNAL answer five times.
RETRIES = [
    ("x-envoy-max-retries", "5"),
    ("x-envoy-retry-on", "5xx,retriable-status-codes,reset"),
    ("x-envoy-retry-grpc-on", "internal"),
    ("x-envoy-retriable-status-codes", "500"),
    ("x-envoy-hedge-on-per-try-timeout", "true"),
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("edge")
    (folder / "registry.yaml").write_text(REGISTRY)
    running = Mesh(folder / "state", registry=folder / "registry.yaml", extra_args=["--listen", "0.0.0.0"])
    try:
        running.wait_ready()
        served_once(running)
        yield running
    finally:
        running.stop()


def served_once(mesh: Mesh, timeout: float = 120.0) -> None:
    """Until a plain call is served: what the tests below change is the headers alone."""
    image = encode(text_image()[0], "PNG")
    deadline = time.monotonic() + timeout
    while True:
        try:
            describe(mesh, image, [], "00-00000000000000000000000000000001-0000000000000001-01")
            return
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the mesh never served a plain call: {exc}") from exc
            time.sleep(0.5)


def network_address() -> str:
    """This machine's address on its network (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        return probe.getsockname()[0]


def describe(mesh: Mesh, image: bytes, headers: list[tuple[str, str]], marker: str) -> pb.DescribeImageResponse:
    address = network_address()
    assert not address.startswith("127."), address
    with grpc.insecure_channel(f"{address}:{mesh.port}") as channel:
        return pb_grpc.ImageToTextServiceStub(channel).DescribeImage(
            pb.DescribeImageRequest(model="ocr", image=image, tasks=[pb.TASK_OCR]), timeout=120,
            metadata=[("x-aimesh-model", "ocr"), ("traceparent", marker), *headers])


def logged(mesh: Mesh, marker: str) -> dict:
    deadline = time.monotonic() + 30
    while True:
        for line in (mesh.state_dir / "access.log").read_text().splitlines():
            entry = json.loads(line)
            if entry["trace_id"] == marker:
                return entry
        assert time.monotonic() < deadline, f"no access log line for {marker}"
        time.sleep(0.1)


@pytest.mark.parametrize("header", TIMEOUTS, ids=[h for h, _ in TIMEOUTS])
def test_a_forged_timeout_header_does_not_cut_the_call(mesh, header):
    marker = f"00-{header[0].encode().hex()[:32]:0<32}-0000000000000001-01"
    out = describe(mesh, encode(text_image()[0], "PNG"), [header], marker)
    assert out.text.startswith("Hello")
    assert logged(mesh, marker)["attempts"] == 1


def test_forged_retry_headers_do_not_retry_a_failed_call(mesh):
    marker = "00-00000000000000000000000000000abc-0000000000000001-01"
    poison = encode(Image.new("RGB", (40000, 1), "white"), "PNG")  # tesseract refuses it
    with pytest.raises(grpc.RpcError) as caught:
        describe(mesh, poison, RETRIES, marker)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    entry = logged(mesh, marker)
    assert entry["attempts"] == 1, entry
    print(f"forged retry headers: INTERNAL after {entry['attempts']} attempt(s)")

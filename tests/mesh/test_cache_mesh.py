"""The response cache through the real front door (Envoy, tenancy on, the built-in
registry where embeddings are cached per tenant): `x-aimesh-cache` over gRPC and
HTTP/JSON, tenants kept apart, and a hit's usage record (units, no cost)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import aimesh
import grpc
import httpx
import pytest
from aimesh.embedding.v1 import embedding_pb2

from tests.mesh.conftest import Mesh
from tests.mesh.test_tenancy import new_tenant, wait_records

pytestmark = pytest.mark.mesh

EMBED = "all-minilm-l6-v2"
METHOD = "/aimesh.embedding.v1.EmbeddingService/Embed"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(tmp_path_factory.mktemp("cache"), only=["embedding"], tenancy=True)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def admin(mesh: Mesh) -> Iterator[aimesh.Client]:
    with aimesh.Client(mesh.front, token=mesh.admin_token, timeout=30) as client:
        yield client


def grpc_embed(mesh: Mesh, token: str, text: str) -> tuple[bytes, str]:
    """One Embed over gRPC through Envoy: the answer's bytes and its x-aimesh-cache header."""
    request = embedding_pb2.EmbedRequest(model=EMBED, texts=[text]).SerializeToString()
    with grpc.insecure_channel(mesh.front) as channel:
        answer, call = channel.unary_unary(METHOD).with_call(
            request, timeout=60, metadata=(("authorization", f"Bearer {token}"), ("x-aimesh-model", EMBED)))
    return answer, dict(call.initial_metadata()).get("x-aimesh-cache", "")


def test_grpc_calls_say_miss_then_hit_with_identical_bytes(mesh: Mesh, admin: aimesh.Client) -> None:
    text = f"cached over gRPC {uuid.uuid4().hex}"
    first, state = grpc_embed(mesh, mesh.token, text)
    again, repeated = grpc_embed(mesh, mesh.token, text)
    assert (state, repeated) == ("miss", "hit") and again == first
    units = embedding_pb2.EmbedResponse.FromString(first).usage.input_units
    rows = [r for r in wait_records(admin, "local", 2) if r.method == "Embed" and r.input_units == units]
    by_origin = {r.origin: r for r in rows}
    assert sorted(by_origin) == ["cache", "server"], rows
    assert by_origin["server"].cost_usd > 0 and by_origin["cache"].cost_usd == 0
    assert by_origin["cache"].status == "OK" and by_origin["cache"].served_model == EMBED


def test_http_json_calls_carry_the_header(mesh: Mesh) -> None:
    url = f"http://{mesh.front}/v1/models/{EMBED}:embed"
    body = {"texts": [f"cached over HTTP {uuid.uuid4().hex}"], "normalize": True}
    auth = {"authorization": f"Bearer {mesh.token}"}
    first = httpx.post(url, json=body, headers=auth, timeout=60)
    again = httpx.post(url, json=body, headers=auth, timeout=60)
    assert first.status_code == again.status_code == 200, first.text
    assert (first.headers["x-aimesh-cache"], again.headers["x-aimesh-cache"]) == ("miss", "hit")
    assert again.json() == first.json()


def test_another_tenant_never_gets_the_entry(mesh: Mesh, admin: aimesh.Client) -> None:
    text = f"one tenant's text {uuid.uuid4().hex}"
    assert grpc_embed(mesh, mesh.token, text)[1] == "miss"
    assert grpc_embed(mesh, mesh.token, text)[1] == "hit"
    other = new_tenant(admin, mesh.front, "cache-other")
    assert grpc_embed(mesh, other, text)[1] == "miss"
    assert grpc_embed(mesh, other, text)[1] == "hit"

"""Tenancy at a real Envoy front door: jwt_authn from ECDS, admission from RDS, refusals.

Envoy runs from the generated bootstrap in front of a small real gRPC server that records
the metadata of every call it receives, so the tests see exactly what reaches a model
server. Tokens are minted here with PyJWT and ES256 keys.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aimesh
import grpc
import httpx
import jwt
import pytest
from aimesh.embedding.v1 import embedding_pb2
from aimesh.registry.v1 import registry_pb2
from aimesh_servers.mesh import envoy_process
from aimesh_servers.mesh.controller import EndpointController
from aimesh_servers.mesh.envoy_config import MeshSpec
from aimesh_servers.mesh.tenancy_envoy import JwtProvider, write_jwt_config, write_routes
from aimesh_servers.registry.discovery import Instance
from aimesh_servers.registry.schema import load_registry
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.mesh.conftest import free_port

EMBEDDING = "aimesh.embedding.v1.EmbeddingService"
REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: emb-a
    capability: embedding
    versions: [{version: "1", source: a}]
    pools: [{id: local, serve: embedding}]
  - id: emb-b
    capability: embedding
    versions: [{version: "1", source: b}]
    pools: [{id: local, serve: embedding}]
  - id: chat
    capability: text_generation
    versions: [{version: "1", source: c}]
    pools: [{id: local, serve: text}]
"""
REQUEST_BODIES = {f"/{EMBEDDING}/Embed": embedding_pb2.EmbedRequest(texts=["hi"]).SerializeToString()}
RDS_RELOADS = "http.aimesh.rds.aimesh.config_reload"
JWT_RELOADS = "extension_config_discovery.http_filter.envoy.filters.http.jwt_authn.config_reload"
FORGED = {"x-aimesh-tenant": "evil", "x-aimesh-scopes": "admin", "x-aimesh-token-id": "forged",
          "x-envoy-original-path": "/v1/models/emb-b:embed"}


class RecordingUpstream:
    """A real gRPC server standing in for model servers and the control server: it answers
    Embed and ListModels and records the metadata of every call it receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        health_servicer = health.HealthServicer()
        health_servicer.set(EMBEDDING, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self.server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(EMBEDDING, {"Embed": grpc.unary_unary_rpc_method_handler(
                self._embed, embedding_pb2.EmbedRequest.FromString,
                embedding_pb2.EmbedResponse.SerializeToString)}),
            grpc.method_handlers_generic_handler("aimesh.registry.v1.ModelRegistryService", {
                "ListModels": grpc.unary_unary_rpc_method_handler(
                    self._list_models, registry_pb2.ListModelsRequest.FromString,
                    registry_pb2.ListModelsResponse.SerializeToString)}),
        ])
        self.server.add_generic_rpc_handlers([_Unimplemented(self)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _record(self, method: str, context: grpc.ServicerContext) -> dict[str, str]:
        seen = dict(context.invocation_metadata())
        with self._lock:
            self.calls.append((method, seen))
        return seen

    def _embed(self, request: embedding_pb2.EmbedRequest, context: grpc.ServicerContext):
        seen = self._record("Embed", context)
        context.send_initial_metadata([("x-aimesh-served-model", seen.get("x-aimesh-model", ""))])
        return embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=[1.0])])

    def _list_models(self, request: registry_pb2.ListModelsRequest, context: grpc.ServicerContext):
        self._record("ListModels", context)
        return registry_pb2.ListModelsResponse(models=[registry_pb2.Model(id="emb-a")])

    def seen(self, method: str) -> list[dict[str, str]]:
        with self._lock:
            return [md for m, md in self.calls if m == method]


class _Unimplemented(grpc.GenericRpcHandler):
    """Any other method: recorded (so a test can tell what was routed here), then UNIMPLEMENTED."""

    def __init__(self, upstream: RecordingUpstream) -> None:
        self.upstream = upstream

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.upstream._record(method, context)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served here")

        return grpc.unary_unary_rpc_method_handler(answer)


@dataclass
class Key:
    kid: str
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    @property
    def jwk(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "alg": "ES256", "use": "sig"}


def jwks(*keys: Key) -> str:
    return json.dumps({"keys": [k.jwk for k in keys]})


def mint(key: Key, tenant: str, scope: str = "embedding", *, issuer: str = "aimesh",
         audience: str = "aimesh", expires_in: int = 3600, tenant_claim: str = "tenant",
         jti: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, tenant_claim: tenant, "scope": scope,
              "jti": jti or uuid.uuid4().hex, "iat": now, "exp": now + expires_in}
    return jwt.encode(claims, key.private, algorithm="ES256", headers={"kid": key.kid})


def tenant(**overrides: Any) -> dict[str, Any]:
    return {"disabled": False, "capabilities": None, "models": None, "requests": {}, "blocked": {},
            **overrides}


class FrontDoor:
    """The generated Envoy config, started for real in front of a RecordingUpstream."""

    def __init__(self, state_dir: Path, upstream: RecordingUpstream, tenancy: bool = True) -> None:
        registry_path = state_dir / "registry.yaml"
        registry_path.parent.mkdir(parents=True, exist_ok=True)
        registry_path.write_text(REGISTRY)
        self.spec = MeshSpec(registry=load_registry(registry_path), state_dir=state_dir,
                             control_port=upstream.port, port=free_port(), admin_port=free_port(),
                             tenancy=tenancy)
        controller = EndpointController(self.spec, self.spec.registry)
        controller.instances = [
            Instance(id=f"{m}-1", address="127.0.0.1", port=upstream.port, model=m, pool="local",
                     version="1", grpc_service=EMBEDDING) for m in ("emb-a", "emb-b")]
        config = envoy_process.write_config(self.spec, controller)
        self.version = 0
        self.proc = envoy_process.start(config, state_dir / "envoy.log")
        envoy_process.wait_ready(self.spec.admin_port, self.proc)
        self.channel = grpc.insecure_channel(self.address)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.spec.port}"

    def stat(self, name: str) -> int:
        text = httpx.get(f"http://127.0.0.1:{self.spec.admin_port}/stats?filter=^{name}$", timeout=5).text
        return int(text.split(":")[1]) if ":" in text else 0

    def _until_reloaded(self, counter: str, write: Callable[[], Any]) -> None:
        before = self.stat(counter)
        write()
        eventually(lambda: self.stat(counter) > before, 10, f"{counter} to go up")

    def admit(self, tenants: dict[str, Any], revoked: Sequence[str] = (), enforce: bool = True,
              wait: bool = True) -> None:
        """Publishes an admission state (RDS) and, with `wait`, waits until Envoy loaded it."""
        self.version += 1
        state = {"version": self.version, "enforce": enforce, "revoked": list(revoked), "tenants": tenants}
        if wait:
            self._until_reloaded(RDS_RELOADS, lambda: write_routes(self.spec, state))
        else:
            write_routes(self.spec, state)

    def trust(self, *providers: JwtProvider, wait: bool = True) -> None:
        if wait:
            self._until_reloaded(JWT_RELOADS, lambda: write_jwt_config(self.spec, providers))
        else:
            write_jwt_config(self.spec, providers)

    def call(self, method: str, token: str | None, model: str | None = None,
             extra: dict[str, str] | None = None) -> grpc.Call | grpc.RpcError:
        """A unary call (empty request body) to any method; the call or its error."""
        metadata = [*(extra or {}).items()]
        if model:
            metadata.append(("x-aimesh-model", model))
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        stub = self.channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        try:
            _, call = stub.with_call(REQUEST_BODIES.get(method, b""), metadata=metadata, timeout=10)
            return call
        except grpc.RpcError as error:
            return error

    def call_embed(self, token: str | None, model: str | None = "emb-a",
                   extra: dict[str, str] | None = None) -> grpc.Call | grpc.RpcError:
        return self.call(f"/{EMBEDDING}/Embed", token, model, extra)

    def http_embed(self, token: str | None, model: str = "emb-a") -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.post(f"http://{self.address}/v1/models/{model}:embed", json={"texts": ["hi"]},
                          headers=headers, timeout=10)

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Polls `check` until it returns something truthy; fails with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout}s; last: {last!r}")


def code_of(result: grpc.Call | grpc.RpcError) -> grpc.StatusCode:
    return result.code()


def details(error: grpc.RpcError) -> dict[str, Any]:
    """ErrorInfo, QuotaFailure and RetryInfo of a refusal, parsed by grpcio-status."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status in {error}"
    out: dict[str, Any] = {}
    for any_detail in status.details:
        for name, cls in (("info", error_details_pb2.ErrorInfo),
                          ("quota", error_details_pb2.QuotaFailure),
                          ("retry", error_details_pb2.RetryInfo)):
            if any_detail.Is(cls.DESCRIPTOR):
                message = cls()
                any_detail.Unpack(message)
                out[name] = message
    return out


MESH_KEY = Key("mesh-1")


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream()
    yield server
    server.server.stop(0)


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, upstream: RecordingUpstream) -> Iterator[FrontDoor]:
    front = FrontDoor(tmp_path_factory.mktemp("front-door"), upstream)
    try:
        front.trust(JwtProvider("aimesh", "aimesh", ("aimesh",), jwks(MESH_KEY)))
        front.admit({"acme": tenant()})
        token = mint(MESH_KEY, "acme")
        eventually(lambda: code_of(front.call_embed(token)) == grpc.StatusCode.OK, 30,
                   "a first call through Envoy")
        yield front
    finally:
        front.stop()


OK = grpc.StatusCode.OK
LIST_MODELS = "/aimesh.registry.v1.ModelRegistryService/ListModels"
LONG_WINDOW_S = 1_000_000  # no window boundary falls inside a test


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo in grpc-status-details-bin, read as the SDK reads it (jwt_authn's
    refusals keep jwt_authn's own grpc-message, which grpcio-status insists on matching)."""
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(info)
    return info


def new_calls(upstream: RecordingUpstream, since: int) -> list[tuple[str, dict[str, str]]]:
    with upstream._lock:
        return upstream.calls[since:]


def test_forged_identity_headers_never_reach_the_upstream(door, upstream):
    door.admit({"acme": tenant()})
    token = mint(MESH_KEY, "acme", jti="jti-of-acme")
    since = len(upstream.calls)
    called = door.call_embed(token, extra={**FORGED, "x-request-id": "forged-request-id"})
    over_http = httpx.post(f"http://{door.address}/v1/models/emb-a:embed", json={"texts": ["hi"]},
                           headers={"authorization": f"Bearer {token}", **FORGED}, timeout=10)
    public = door.call(LIST_MODELS, None, extra=FORGED)
    assert code_of(called) == OK and over_http.status_code == 200 and code_of(public) == OK
    (_, grpc_seen), (_, http_seen), (_, public_seen) = new_calls(upstream, since)
    for seen in (grpc_seen, http_seen):
        assert (seen["x-aimesh-tenant"], seen["x-aimesh-scopes"], seen["x-aimesh-token-id"]) == (
            "acme", "embedding", "jti-of-acme")
        assert seen["x-aimesh-model"] == "emb-a"  # not the model of the forged original path
        assert seen["x-request-id"] != "forged-request-id"  # regenerated at the edge
    assert "x-envoy-original-path" not in grpc_seen
    assert not {"x-aimesh-tenant", "x-aimesh-scopes", "x-aimesh-token-id"} & set(public_seen)


def test_a_token_sent_to_a_public_route_is_verified_and_its_claims_set(door, upstream):
    door.admit({"acme": tenant()})
    since = len(upstream.calls)
    assert code_of(door.call(LIST_MODELS, mint(MESH_KEY, "acme"))) == OK
    assert new_calls(upstream, since)[-1][1]["x-aimesh-tenant"] == "acme"
    expired = door.call(LIST_MODELS, mint(MESH_KEY, "acme", expires_in=-600))
    assert code_of(expired) == grpc.StatusCode.UNAUTHENTICATED


BAD_TOKENS = {
    "missing": lambda: None,
    "expired": lambda: mint(MESH_KEY, "acme", expires_in=-600),  # beyond jwt_authn's 60 s skew
    "signed by another key with the mesh's kid": lambda: mint(Key(MESH_KEY.kid), "acme"),
    "unknown kid": lambda: mint(Key("not-published"), "acme"),
    "wrong audience": lambda: mint(MESH_KEY, "acme", audience="another-mesh"),
    "wrong issuer": lambda: mint(MESH_KEY, "acme", issuer="someone-else"),
    "not a jwt": lambda: "not-a-jwt",
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens_are_unauthenticated_and_nothing_is_served(door, upstream, case):
    door.admit({"acme": tenant()})
    token = BAD_TOKENS[case]()
    since = len(upstream.calls)
    refused = door.call_embed(token)
    over_http = door.http_embed(token)
    assert code_of(refused) == grpc.StatusCode.UNAUTHENTICATED, refused
    assert error_info(refused).reason == "UNAUTHENTICATED"
    assert dict(refused.trailing_metadata())["x-aimesh-reason"] == "UNAUTHENTICATED"
    assert over_http.status_code == 401, over_http.text
    body = over_http.json()
    assert body["code"] == 16 and body["details"][0]["reason"] == "UNAUTHENTICATED"
    assert new_calls(upstream, since) == []


def test_a_revoked_token_is_refused_once_the_routes_are_rewritten(door, upstream):
    door.admit({"acme": tenant()})
    doomed, kept = mint(MESH_KEY, "acme", jti="doomed"), mint(MESH_KEY, "acme", jti="kept")
    assert code_of(door.call_embed(doomed)) == OK
    written = time.monotonic()
    door.admit({"acme": tenant()}, revoked=["doomed"], wait=False)
    refused = eventually(lambda: (r := door.call_embed(doomed)).code() == grpc.StatusCode.UNAUTHENTICATED and r,
                         10, "the revoked token to be refused")
    print(f"revoked token refused {time.monotonic() - written:.2f} s after the RDS rewrite")
    info = details(refused)["info"]
    assert (info.reason, info.metadata["token_id"]) == ("UNAUTHENTICATED", "doomed")
    assert code_of(door.call_embed(kept)) == OK
    over_http = door.http_embed(doomed)
    assert over_http.status_code == 401 and over_http.json()["details"][0]["metadata"]["token_id"] == "doomed"


def test_scope_capability_model_and_tenant_refusals_are_permission_denied(door, upstream):
    door.admit({"acme": tenant(models=["emb-a"]), "wordsmith": tenant(capabilities=["text"]),
                "gone": tenant(disabled=True)})
    since = len(upstream.calls)
    cases = {
        ("scope", "embedding"): door.call_embed(mint(MESH_KEY, "acme", scope="text tts")),
        ("model", "emb-b"): door.call_embed(mint(MESH_KEY, "acme"), model="emb-b"),
        ("capability", "embedding"): door.call_embed(mint(MESH_KEY, "wordsmith", scope="text embedding")),
        ("tenant", "gone"): door.call_embed(mint(MESH_KEY, "gone")),
        ("tenant", "stranger"): door.call_embed(mint(MESH_KEY, "stranger")),
    }
    for (missing, what), refused in cases.items():
        assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED, (missing, refused)
        info = details(refused)["info"]
        assert info.reason == "PERMISSION_DENIED" and info.metadata["missing"] == missing
        assert what in refused.details()
    over_http = door.http_embed(mint(MESH_KEY, "acme"), model="emb-b")
    assert over_http.status_code == 403
    assert over_http.json()["details"][0]["metadata"] == {"tenant": "acme", "missing": "model", "model": "emb-b"}
    assert new_calls(upstream, since) == []
    # The admin scope covers every capability; a call naming no model goes to the default.
    assert code_of(door.call_embed(mint(MESH_KEY, "acme", scope="admin"))) == OK
    assert code_of(door.call_embed(mint(MESH_KEY, "acme"), model=None)) == OK


def test_request_limit_refuses_with_quota_failure_and_retry_info_while_another_tenant_is_served(door):
    limit = {"embedding": {"*": [3, LONG_WINDOW_S]}}
    door.admit({"busy": tenant(requests=limit), "calm": tenant(requests=limit),
                "picky": tenant(requests={"*": {"emb-b": [1, LONG_WINDOW_S]}})})
    busy, calm, picky = mint(MESH_KEY, "busy"), mint(MESH_KEY, "calm"), mint(MESH_KEY, "picky")
    assert [code_of(door.call_embed(busy)) for _ in range(3)] == [OK] * 3
    refused = door.call_embed(busy)
    served = door.call_embed(calm)  # the same moment, another tenant
    assert code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED and code_of(served) == OK
    found = details(refused)  # grpcio-status: code and message match the Status
    assert found["info"].reason == "RATE_LIMITED" and found["info"].metadata["tenant"] == "busy"
    assert found["quota"].violations[0].subject == f"requests per {LONG_WINDOW_S} s"
    assert 0 < found["retry"].retry_delay.seconds <= LONG_WINDOW_S
    over_http = door.http_embed(busy)
    assert over_http.status_code == 429 and 0 < int(over_http.headers["retry-after"]) <= LONG_WINDOW_S
    types = [d["@type"].rsplit(".", 1)[1] for d in over_http.json()["details"]]
    assert types == ["ErrorInfo", "QuotaFailure", "RetryInfo"]
    # The SDK's typed error carries the reason and the delay.
    with aimesh.Client(door.address, token=busy) as client, pytest.raises(aimesh.ResourceExhaustedError) as caught:
        client.embedding.embed("emb-a", ["hi"])
    assert caught.value.reason == "RATE_LIMITED" and caught.value.retry_after > 0
    # A limit on one model leaves the others alone.
    assert code_of(door.call_embed(picky, model="emb-b")) == OK
    assert code_of(door.call_embed(picky, model="emb-b")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(door.call_embed(picky, model="emb-a")) == OK


def test_a_blocked_tenant_is_refused_with_the_entrys_reason_until_it_ends(door):
    now = int(time.time())

    def block(reason: str, until: int, subject: str) -> dict[str, Any]:
        return {"reason": reason, "until": until, "message": f"{subject} spent", "subject": subject}

    door.admit({
        "broke": tenant(blocked={"*": {"*": block("BUDGET_EXHAUSTED", now + 3600, "monthly budget")}}),
        "wordy": tenant(blocked={"embedding": {"emb-b": block("RATE_LIMITED", now + 3600, "tokens per 60 s")}}),
        "recovered": tenant(blocked={"*": {"*": block("BUDGET_EXHAUSTED", now - 10, "monthly budget")}}),
    })
    broke = door.call_embed(mint(MESH_KEY, "broke"))
    assert code_of(broke) == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(broke)
    assert found["info"].reason == "BUDGET_EXHAUSTED" and broke.details() == "monthly budget spent"
    assert found["quota"].violations[0].subject == "monthly budget"
    assert 0 < found["retry"].retry_delay.seconds <= 3600
    assert dict(broke.trailing_metadata())["x-aimesh-reason"] == "BUDGET_EXHAUSTED"
    wordy = mint(MESH_KEY, "wordy")
    assert details(door.call_embed(wordy, model="emb-b"))["info"].reason == "RATE_LIMITED"
    assert code_of(door.call_embed(wordy, model="emb-a")) == OK
    assert code_of(door.call_embed(mint(MESH_KEY, "recovered"))) == OK
    over_http = door.http_embed(mint(MESH_KEY, "broke"))
    assert over_http.status_code == 429 and over_http.json()["details"][0]["reason"] == "BUDGET_EXHAUSTED"


def test_signing_keys_and_external_providers_change_without_restart(door, upstream):
    door.admit({"acme": tenant(), "partner-org": tenant()})
    new_key, partner_key = Key("mesh-2"), Key("partner-1")
    old_token, new_token = mint(MESH_KEY, "acme"), mint(new_key, "acme")
    partner_token = mint(partner_key, "partner-org", issuer="https://id.partner.example", tenant_claim="org")
    assert code_of(door.call_embed(new_token)) == grpc.StatusCode.UNAUTHENTICATED
    pid = door.proc.pid
    try:
        door.trust(JwtProvider("aimesh", "aimesh", ("aimesh",), jwks(new_key)),
                   JwtProvider("partner", "https://id.partner.example", ("aimesh",), jwks(partner_key),
                               tenant_claim="org"))
        eventually(lambda: code_of(door.call_embed(new_token)) == OK, 10, "the new key to be accepted")
        assert code_of(door.call_embed(old_token)) == grpc.StatusCode.UNAUTHENTICATED
        since = len(upstream.calls)
        assert code_of(door.call_embed(partner_token)) == OK
        assert new_calls(upstream, since)[0][1]["x-aimesh-tenant"] == "partner-org"
        assert door.proc.poll() is None and door.proc.pid == pid
    finally:
        door.trust(JwtProvider("aimesh", "aimesh", ("aimesh",), jwks(MESH_KEY)))


def test_tenant_api_needs_admin_usage_any_token_and_ingest_is_never_routed(door, upstream):
    door.admit({"acme": tenant(capabilities=["embedding"])})
    user, admin = mint(MESH_KEY, "acme"), mint(MESH_KEY, "acme", scope="admin")
    tenants = "/aimesh.tenancy.v1.TenantService/ListTenants"
    usage = "/aimesh.usage.v1.UsageService/GetUsageSummary"
    ingest = "/aimesh.usage.v1.UsageIngestService/ReportCalls"
    since = len(upstream.calls)
    refused = door.call(tenants, user)
    assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED
    assert details(refused)["info"].metadata["scope"] == "admin"
    # Admitted calls reach the control server (this stand-in answers UNIMPLEMENTED).
    assert code_of(door.call(tenants, admin)) == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(door.call(usage, user)) == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(door.call(usage, None)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(door.call(ingest, admin)) == grpc.StatusCode.UNIMPLEMENTED
    assert [method for method, _ in new_calls(upstream, since)] == [tenants, usage]


def test_admission_fails_closed_when_it_cannot_decide(door, upstream):
    # A request limit that is not a number: the Lua filter errors on this tenant's calls.
    door.admit({"acme": tenant(requests={"embedding": {"*": "oops"}}), "other": tenant()})
    since = len(upstream.calls)
    broken = door.call_embed(mint(MESH_KEY, "acme"))
    assert code_of(broken) == grpc.StatusCode.INTERNAL
    assert error_info(broken).reason == "ENGINE_FAILURE"
    assert door.http_embed(mint(MESH_KEY, "acme")).status_code == 500
    assert not new_calls(upstream, since)  # nothing reached the upstream unchecked
    assert code_of(door.call_embed(mint(MESH_KEY, "other"))) == OK


def test_enforce_false_admits_every_verified_token(door):
    door.admit({}, enforce=False)
    assert code_of(door.call_embed(mint(MESH_KEY, "anyone"))) == OK
    assert code_of(door.call_embed(None)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_access_log_records_refusals_at_the_edge(door):
    door.admit({"logged": tenant(requests={"*": {"*": [1, LONG_WINDOW_S]}})})
    token = mint(MESH_KEY, "logged", jti="jti-logged")
    assert code_of(door.call_embed(token)) == OK
    assert code_of(door.call_embed(token)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(door.call_embed(None)) == grpc.StatusCode.UNAUTHENTICATED
    log = door.spec.state_dir / "access.log"

    def entries() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines()]

    # Envoy flushes the log every 200 ms; the usage collector tails it.
    refused = eventually(lambda: [e for e in entries() if e["token_id"] == "jti-logged"
                                  and e["reason"] == "RATE_LIMITED"], 10, "the refusal in the access log")
    assert refused[0]["tenant"] == "logged" and refused[0]["request_id"]
    assert refused[0]["details"] == "lua_response" and int(refused[0]["start_ms"]) > 0
    served = [e for e in entries() if e["token_id"] == "jti-logged" and e["reason"] is None]
    assert served and served[0]["cluster"] == "model_emb-a" and served[0]["grpc_status"] == "OK"
    assert any(e["reason"] == "UNAUTHENTICATED" and e["details"].startswith("jwt_authn") for e in entries())


def test_with_no_trusted_provider_every_call_needing_a_token_is_refused(tmp_path, upstream):
    front = FrontDoor(tmp_path / "bare", upstream)  # the files write_config starts with
    try:
        eventually(lambda: code_of(front.call(LIST_MODELS, None)) == OK, 30, "the public registry")
        for token in (None, mint(MESH_KEY, "acme")):
            assert code_of(front.call_embed(token)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        front.stop()


def test_with_tenancy_off_no_token_is_needed_and_forged_headers_are_still_dropped(tmp_path, upstream):
    front = FrontDoor(tmp_path / "off", upstream, tenancy=False)
    try:
        eventually(lambda: code_of(front.call_embed(None)) == OK, 30, "a first call")
        since = len(upstream.calls)
        assert code_of(front.call_embed(None, model="emb-b", extra=FORGED)) == OK
        assert front.http_embed(None, model="emb-b").status_code == 200
        for _, seen in new_calls(upstream, since):
            assert seen["x-aimesh-model"] == "emb-b"
            assert not {"x-aimesh-tenant", "x-aimesh-scopes", "x-aimesh-token-id"} & set(seen)
    finally:
        front.stop()

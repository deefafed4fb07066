"""TenantService over a real in-process grpc.aio server (the runner and its interceptor)
on a real SQLite store, through the SDK's tenants client.

There is no Envoy here, so the test's channel sets the identity headers that the front
door's jwt_authn would set from a verified token (`x-aimesh-tenant`, `x-aimesh-scopes`).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import aimesh
import grpc
import pytest
from aimesh.client.tenancy import AsyncTenantsClient, TenantsClient
from aimesh.client.transport import AsyncTransport, Transport
from aimesh.tenancy.v1 import tenancy_pb2 as pb
from aimesh_servers.cli import main as cli_main
from aimesh_servers.tenancy import keys
from aimesh_servers.tenancy.db import make_engine, migrate
from aimesh_servers.tenancy.plans import PLANS
from aimesh_servers.tenancy.servicer import TenantCapability
from aimesh_servers.tenancy.store import TenantStore
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests.identity import AddHeaders, AddHeadersSync, identity
from tests.servers import in_process_server

ADMIN = identity("ops", "admin")
TENANT = identity("acme", "text embedding")


@pytest.fixture(scope="module")
async def served(tmp_path_factory):
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('tenancy') / 'aimesh.db'}")
    migrate(engine)
    store = TenantStore(engine)
    changes: list[int] = []

    async def on_change() -> None:  # the quota controller republishes from here
        changes.append(await asyncio.to_thread(store.version))

    async with in_process_server([TenantCapability(store, on_change)]) as (server, _):
        target = f"127.0.0.1:{server.port}"
        channels = {name: grpc.aio.insecure_channel(target, interceptors=[AddHeaders(headers)])
                    for name, headers in (("admin", ADMIN), ("tenant", TENANT), ("none", []))}
        clients = {name: AsyncTenantsClient(AsyncTransport(channel, None, 30))
                   for name, channel in channels.items()}
        yield store, server, clients, changes
        for channel in channels.values():
            await channel.close()
    engine.dispose()


async def test_an_admin_manages_tenants_limits_and_tokens(served):
    store, server, clients, changes = served
    admin = clients["admin"]
    before = len(changes)
    acme = await admin.create("acme", display_name="Acme", plan="free",
                              allowed_capabilities=["text", "embedding"])
    assert acme.id == "acme" and acme.plan == "free" and acme.display_name == "Acme"
    assert acme.monthly_budget_usd == PLANS["free"].monthly_budget_usd
    assert list(acme.allowed_capabilities) == ["text", "embedding"]
    assert len(acme.limits) == len(PLANS["free"].limits) and not acme.overrides
    assert acme.create_time.ToDatetime().year >= 2025

    acme = await admin.set_limit("acme", "text", "requests", 3, timedelta(seconds=10))
    [override] = acme.overrides
    assert (override.capability, override.kind, override.limit, override.window.seconds) == (
        "text", pb.LIMIT_KIND_REQUESTS, 3, 10)
    assert override in acme.limits
    acme = await admin.set_limit("acme", "embedding", "units", 100, 60, model="minilm")
    assert len(acme.overrides) == 2
    acme = await admin.clear_limit("acme", "text", "requests")
    assert [o.model for o in acme.overrides] == ["minilm"]

    acme = await admin.update("acme", monthly_budget_usd=2.5, allowed_models=["minilm"],
                              disabled=True)
    assert acme.monthly_budget_usd == 2.5 and list(acme.allowed_models) == ["minilm"]
    assert acme.disabled and list(acme.allowed_capabilities) == ["text", "embedding"]
    acme = await admin.update("acme", disabled=False, allowed_capabilities=[])
    assert not acme.disabled and not acme.allowed_capabilities
    assert acme == await admin.get("acme")
    assert "acme" in [t.id for t in await admin.list()]

    issued = await admin.issue_token("acme", ["text", "embedding"], ttl=timedelta(days=7))
    claims = keys.verify_token(issued.token, store.jwks())
    assert claims["tenant"] == "acme" and claims["scope"] == "text embedding"
    assert claims["jti"] == issued.info.id and list(issued.info.scopes) == ["text", "embedding"]
    assert (issued.info.expire_time.ToDatetime() - issued.info.issue_time.ToDatetime()
            == timedelta(days=7))
    default_ttl = await admin.issue_token("acme")
    assert (default_ttl.info.expire_time.ToDatetime() - default_ttl.info.issue_time.ToDatetime()
            == timedelta(days=30))
    assert {t.id for t in await admin.list_tokens("acme")} == {issued.info.id, default_ttl.info.id}

    revoked = await admin.revoke_token(issued.info.id)
    assert revoked.revoked and revoked.id == issued.info.id
    assert store.revoked_unexpired() == [issued.info.id]

    rotated = await admin.rotate_signing_key()
    assert rotated.key_id != issued.info.key_id
    assert list(rotated.active_key_ids) == [issued.info.key_id, rotated.key_id]
    newer = await admin.issue_token("acme", ["text"])
    assert newer.info.key_id == rotated.key_id
    keys.verify_token(default_ttl.token, store.jwks())  # the old key still verifies

    # One on_change per change (reads call none), each after the change was stored.
    assert len(changes) - before == 11
    assert changes[-1] == store.version()
    assert server.limit.in_flight == 0


async def test_a_caller_without_the_admin_scope_is_refused_and_nothing_changes(served):
    store, _, clients, changes = served
    await clients["admin"].create("beta")
    version, calls = store.version(), len(changes)
    for name, error, reason in (("tenant", aimesh.PermissionDeniedError, "PERMISSION_DENIED"),
                                ("none", aimesh.UnauthenticatedError, "UNAUTHENTICATED")):
        client = clients[name]
        for call in (lambda c: c.create("gamma"), lambda c: c.create("Not Valid"),
                     lambda c: c.get("beta"), lambda c: c.list(),
                     lambda c: c.update("beta", disabled=True),
                     lambda c: c.set_limit("beta", "text", "requests", 1),
                     lambda c: c.issue_token("beta", ["admin"]),
                     lambda c: c.list_tokens("beta"), lambda c: c.revoke_token("x"),
                     lambda c: c.rotate_signing_key()):
            with pytest.raises(error) as caught:
                await call(client)
            assert caught.value.reason == reason and caught.value.domain == "aimesh.dev"
    assert store.version() == version and len(changes) == calls
    assert not store.get_tenant("beta").disabled


@pytest.mark.parametrize(("call", "error", "reason", "field"), [
    (lambda c: c.create("Bad Id"), aimesh.InvalidArgumentError, "INVALID_FIELD", "tenant_id"),
    (lambda c: c.create(""), aimesh.InvalidArgumentError, "INVALID_FIELD", "tenant_id"),
    (lambda c: c.create("x", plan="gold"), aimesh.InvalidArgumentError, "INVALID_FIELD", "plan"),
    (lambda c: c.create("x", allowed_capabilities=["chat"]), aimesh.InvalidArgumentError,
     "INVALID_FIELD", "allowed_capabilities[0]"),
    (lambda c: c.create("x", monthly_budget_usd=-5), aimesh.InvalidArgumentError,
     "INVALID_FIELD", "monthly_budget_usd"),
    (lambda c: c.create("gamma"), aimesh.AimeshError, "TENANT_ALREADY_EXISTS", "tenant_id"),
    (lambda c: c.get("ghost"), aimesh.NotFoundError, "TENANT_NOT_FOUND", "tenant_id"),
    (lambda c: c.update("ghost", plan="free"), aimesh.NotFoundError, "TENANT_NOT_FOUND",
     "tenant_id"),
    (lambda c: c.update("gamma", plan="gold"), aimesh.InvalidArgumentError, "INVALID_FIELD",
     "plan"),
    (lambda c: c.set_limit("gamma", "chat", "requests", 1), aimesh.InvalidArgumentError,
     "INVALID_FIELD", "limit.capability"),
    (lambda c: c.set_limit("gamma", "text", pb.LIMIT_KIND_UNSPECIFIED, 1),
     aimesh.InvalidArgumentError, "INVALID_FIELD", "limit.kind"),
    (lambda c: c.set_limit("gamma", "text", "requests", 1, 0.5), aimesh.InvalidArgumentError,
     "INVALID_FIELD", "limit.window"),
    (lambda c: c.set_limit("gamma", "text", "requests", -1), aimesh.InvalidArgumentError,
     "INVALID_FIELD", "limit.limit"),
    (lambda c: c.clear_limit("gamma", "text", pb.LIMIT_KIND_UNSPECIFIED),
     aimesh.InvalidArgumentError, "INVALID_FIELD", "limit.kind"),
    (lambda c: c.issue_token("gamma", ["text", "chat"]), aimesh.InvalidArgumentError,
     "INVALID_FIELD", "scopes[1]"),
    (lambda c: c.issue_token("gamma", ttl=0), aimesh.InvalidArgumentError, "INVALID_FIELD",
     "ttl"),
    (lambda c: c.issue_token("ghost"), aimesh.NotFoundError, "TENANT_NOT_FOUND", "tenant_id"),
    (lambda c: c.list_tokens(""), aimesh.InvalidArgumentError, "INVALID_FIELD", "tenant_id"),
    (lambda c: c.revoke_token("no-such-jti"), aimesh.NotFoundError, "TOKEN_NOT_FOUND",
     "token_id"),
])
async def test_bad_requests_get_a_status_with_error_info_and_bad_request(
        served, call, error, reason, field):
    store, server, clients, _ = served
    admin = clients["admin"]
    if "gamma" not in {t.id for t in store.list_tenants()}:
        await admin.create("gamma")
    version = store.version()
    with pytest.raises(error) as caught:
        await call(admin)
    assert caught.value.reason == reason and caught.value.domain == "aimesh.dev"
    assert caught.value.metadata["field"] == field and field in caught.value.field_violations
    assert store.version() == version
    assert server.limit.in_flight == 0


async def test_the_blocking_sdk_client_works_the_same(served):
    store, server, _, _ = served

    def admin_calls() -> tuple[pb.Tenant, pb.IssueTokenResponse]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            client = TenantsClient(Transport(grpc.intercept_channel(channel, AddHeadersSync(ADMIN)),
                                             None, 30))
            tenant = client.create("sync-co", plan="unlimited")
            return tenant, client.issue_token("sync-co", ["tts"], ttl=3600)

    tenant, issued = await asyncio.to_thread(admin_calls)
    assert tenant.plan == "unlimited" and not tenant.limits and tenant.monthly_budget_usd == 0
    assert keys.verify_token(issued.token, store.jwks())["scope"] == "tts"

    def refused() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            client = TenantsClient(Transport(grpc.intercept_channel(channel, AddHeadersSync(TENANT)),
                                             None, 30))
            client.list()

    with pytest.raises(aimesh.PermissionDeniedError):
        await asyncio.to_thread(refused)


async def test_the_sdk_reads_a_limit_refusal():
    """The front door refuses an over-limit call with RESOURCE_EXHAUSTED, ErrorInfo,
    RetryInfo and QuotaFailure; a server answering exactly that stands in for it here."""
    refusal = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED,
                                message="tenant 'acme' is over 3 requests per 10 s on text")
    delay = duration_pb2.Duration(seconds=1, nanos=500_000_000)
    for detail in (error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain="aimesh.dev",
                                               metadata={"tenant": "acme"}),
                   error_details_pb2.RetryInfo(retry_delay=delay),
                   error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
                       subject="tenant:acme/text/requests", description="3 per 10s")])):
        refusal.details.add().Pack(detail)

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort_with_status(rpc_status.to_status(refusal))

    class Refuser(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Refuser()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aimesh.AsyncClient(f"127.0.0.1:{port}", max_attempts=1) as client:
            with pytest.raises(aimesh.ResourceExhaustedError) as caught:
                await client.embedding.embed("minilm", ["hi"])
    finally:
        await server.stop(0)
    error = caught.value
    assert error.reason == "RATE_LIMITED" and error.retry_after == 1.5
    assert error.quota_violations == {"tenant:acme/text/requests": "3 per 10s"}
    assert error.metadata == {"tenant": "acme"}


async def test_the_cli_reaches_the_service_and_a_bearer_token_alone_is_no_identity(served, capsys):
    """Without the front door nothing verifies the token, so the service must not take it
    as identity: the CLI's call is refused, and it says so on stderr with exit code 1."""
    store, server, _, _ = served
    token, _ = store.issue_token(store.create_tenant("cli-admin").id, ["admin"])
    version = store.version()
    code = await asyncio.to_thread(cli_main, [
        "tenants", "create", "cli-co", "--plan", "free", "--target", f"127.0.0.1:{server.port}",
        "--token", token])
    assert code == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert store.version() == version


async def test_a_failing_on_change_does_not_fail_a_stored_change(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'aimesh.db'}")
    migrate(engine)
    store = TenantStore(engine)
    calls: list[int] = []

    def broken_republish() -> None:
        calls.append(1)
        raise RuntimeError("front door config not writable")

    try:
        async with in_process_server([TenantCapability(store, broken_republish)]) as (server, _):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                                interceptors=[AddHeaders(ADMIN)])
            try:
                tenant = await AsyncTenantsClient(AsyncTransport(channel, None, 30)).create("delta")
            finally:
                await channel.close()
        assert tenant.id == "delta" and store.get_tenant("delta").plan == "default"
        assert calls == [1]
    finally:
        engine.dispose()

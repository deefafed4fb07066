"""TenantStore on a real database: SQLite (a file, WAL) and PostgreSQL (a real server,
started once per session by tests/infra.py), migrated by Alembic like `aimesh up` does."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from aimesh_servers.runtime.errors import (
    InvalidArgument,
    TenantAlreadyExists,
    TenantNotFound,
    TokenNotFound,
)
from aimesh_servers.tenancy import keys
from aimesh_servers.tenancy.db import make_engine, migrate
from aimesh_servers.tenancy.plans import PLANS, SERVICES, Limit
from aimesh_servers.tenancy.store import KEEP, TenantStore


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'aimesh.db'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(url, clock):
    engine = make_engine(url)
    migrate(engine)
    yield TenantStore(engine, clock=clock)
    engine.dispose()


def limit_of(tenant, capability, kind, model=""):
    [found] = [x for x in tenant.limits if x.key == (capability, model, kind)]
    return found


def test_a_new_tenant_gets_its_plans_limits_and_budget(store):
    acme = store.create_tenant("acme", display_name="Acme Corp", plan="free",
                               allowed_capabilities=["text", "embedding"])
    assert acme.id == "acme" and acme.display_name == "Acme Corp" and acme.plan == "free"
    assert set(acme.limits) == set(PLANS["free"].limits) and acme.overrides == ()
    assert acme.monthly_budget_usd == PLANS["free"].monthly_budget_usd > 0
    assert acme.budget_override_usd is None
    assert acme.allowed_capabilities == ("text", "embedding") and acme.allowed_models == ()
    assert not acme.disabled and acme.created_at == store.clock()
    assert store.get_tenant("acme") == acme

    local = store.create_tenant("local")  # the quick start's tenant: defaults everywhere
    assert local.plan == "default" and local.display_name == "local"
    assert local.monthly_budget_usd == 0 and len(local.limits) == 2 * len(SERVICES)
    assert [t.id for t in store.list_tenants()] == ["acme", "local"]
    assert store.create_tenant("free-user", plan="unlimited").limits == ()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tenant_id": "Acme"}, "tenant_id"),
    ({"tenant_id": ""}, "tenant_id"),
    ({"tenant_id": "-acme"}, "tenant_id"),
    ({"tenant_id": "a" * 65}, "tenant_id"),
    ({"plan": "gold"}, "plan"),
    ({"monthly_budget_usd": -1.0}, "monthly_budget_usd"),
    ({"monthly_budget_usd": math.nan}, "monthly_budget_usd"),
    ({"allowed_capabilities": ["text", "chat"]}, "allowed_capabilities[1]"),
    ({"allowed_models": ["ok", "two words"]}, "allowed_models[1]"),
    ({"allowed_models": ["a,b"]}, "allowed_models[0]"),
])
def test_bad_tenant_fields_name_the_field_and_change_nothing(store, kwargs, field):
    before = store.version()
    with pytest.raises(InvalidArgument) as caught:
        store.create_tenant(**{"tenant_id": "acme", **kwargs})
    assert caught.value.field == field and caught.value.metadata["field"] == field
    assert store.version() == before and store.list_tenants() == []


def test_a_tenant_id_is_taken_once(store):
    store.create_tenant("acme")
    with pytest.raises(TenantAlreadyExists) as caught:
        store.create_tenant("acme", plan="free")
    assert caught.value.metadata["tenant_id"] == "acme"
    assert store.get_tenant("acme").plan == "default"


def test_unknown_tenants_are_not_found_everywhere(store):
    for call in (lambda: store.get_tenant("ghost"),
                 lambda: store.update_tenant("ghost", plan="free"),
                 lambda: store.set_limit("ghost", Limit("text", "requests", 1, 60)),
                 lambda: store.clear_limit("ghost", "text", "", "requests"),
                 lambda: store.issue_token("ghost", ["text"]),
                 lambda: store.list_tokens("ghost")):
        with pytest.raises(TenantNotFound) as caught:
            call()
        assert caught.value.metadata["tenant_id"] == "ghost"
    assert store.version() == 0


def test_update_changes_only_what_is_given(store, clock):
    store.create_tenant("acme", allowed_models=["chat"])
    clock.advance(seconds=5)
    acme = store.update_tenant("acme", plan="free", monthly_budget_usd=12.5)
    assert acme.plan == "free" and acme.monthly_budget_usd == 12.5
    assert acme.allowed_models == ("chat",) and acme.updated_at == clock()
    acme = store.update_tenant("acme", monthly_budget_usd=None)  # back to the plan's
    assert acme.monthly_budget_usd == PLANS["free"].monthly_budget_usd
    acme = store.update_tenant("acme", allowed_capabilities=["tts"], allowed_models=[],
                               disabled=True)
    assert acme.allowed_capabilities == ("tts",) and acme.allowed_models == () and acme.disabled
    assert store.update_tenant("acme", disabled=False, plan=KEEP).plan == "free"
    with pytest.raises(InvalidArgument) as caught:
        store.update_tenant("acme", plan="platinum")
    assert caught.value.field == "plan"


def test_overrides_replace_the_plans_limit_of_the_same_key_and_clearing_restores_it(store):
    store.create_tenant("acme", plan="free")
    plan_text_requests = limit_of(store.get_tenant("acme"), "text", "requests")
    acme = store.set_limit("acme", Limit("text", "requests", 3, 10))
    assert limit_of(acme, "text", "requests") == Limit("text", "requests", 3, 10)
    acme = store.set_limit("acme", Limit("text", "units", 500, 3600, model="chat"))
    assert limit_of(acme, "text", "units", "chat").limit == 500  # added beside the plan's
    assert limit_of(acme, "text", "units") == limit_of(store.get_tenant("acme"), "text", "units")
    acme = store.set_limit("acme", Limit("text", "requests", 7, 60))  # replaces the override
    assert limit_of(acme, "text", "requests").limit == 7 and len(acme.overrides) == 2
    assert len(acme.limits) == len(PLANS["free"].limits) + 1
    assert store.effective_limits("acme") == list(acme.limits)

    acme = store.clear_limit("acme", "text", "", "requests")
    assert limit_of(acme, "text", "requests") == plan_text_requests
    assert acme.overrides == (Limit("text", "units", 500, 3600, model="chat"),)
    assert [t.overrides for t in store.list_tenants()] == [acme.overrides]


@pytest.mark.parametrize(("limit", "field"), [
    (Limit("chat", "requests", 1, 60), "limit.capability"),
    (Limit("text", "tokens", 1, 60), "limit.kind"),
    (Limit("text", "requests", -1, 60), "limit.limit"),
    (Limit("text", "requests", math.inf, 60), "limit.limit"),
    (Limit("text", "requests", 1, 0), "limit.window"),
    (Limit("text", "requests", 1, 40 * 86400), "limit.window"),
    (Limit("text", "requests", 1, 60, model="a b"), "limit.model"),
])
def test_bad_limits_name_the_field(store, limit, field):
    store.create_tenant("acme")
    with pytest.raises(InvalidArgument) as caught:
        store.set_limit("acme", limit)
    assert caught.value.field == field
    assert store.get_tenant("acme").overrides == ()


def test_every_change_bumps_the_version_once_and_reads_do_not(store):
    versions = [store.version()]

    def changed(action):
        action()
        versions.append(store.version())
        assert versions[-1] == versions[-2] + 1, action

    changed(lambda: store.create_tenant("acme"))
    changed(lambda: store.update_tenant("acme", plan="free"))
    changed(lambda: store.set_limit("acme", Limit("*", "requests", 100, 60)))
    changed(lambda: store.clear_limit("acme", "*", "", "requests"))
    changed(lambda: store.ensure_signing_key())
    _, token = store.issue_token("acme", ["text"])
    versions.append(store.version())
    changed(lambda: store.revoke_token(token.id))
    changed(lambda: store.rotate_signing_key())

    same = store.version()
    store.get_tenant("acme")
    store.list_tenants()
    store.list_tokens("acme")
    store.ensure_signing_key()
    store.clear_limit("acme", "*", "", "requests")  # nothing to clear
    store.revoke_token(token.id)  # already revoked
    store.update_tenant("acme")  # nothing given
    assert store.version() == same


def test_a_second_control_plane_sees_changes_through_the_version_row(store, url):
    other_engine = make_engine(url)
    try:
        other = TenantStore(other_engine)
        seen = other.version()
        store.create_tenant("acme")
        assert other.version() > seen
        assert other.get_tenant("acme").plan == "default"
    finally:
        other_engine.dispose()


def test_tokens_are_issued_listed_and_revoked(store, clock):
    store.create_tenant("acme")
    token, first = store.issue_token("acme", ["embedding", "text", "text"], timedelta(days=2))
    claims = keys.verify_token(token, store.jwks(), leeway_s=10**9)  # the test clock is fixed
    assert claims["tenant"] == "acme" and claims["scope"] == "embedding text"
    assert claims["jti"] == first.id and first.scopes == ("embedding", "text")
    assert first.expires_at - first.issued_at == timedelta(days=2)
    clock.advance(minutes=1)
    _, every = store.issue_token("acme")
    assert every.scopes == tuple(SERVICES)  # no scopes: every capability, not admin
    _, admin = store.issue_token("acme", ["admin"], timedelta(hours=1))
    listed = [t.id for t in store.list_tokens("acme")]
    assert set(listed[:2]) == {every.id, admin.id} and listed[2] == first.id  # newest first

    assert store.revoked_unexpired() == []
    revoked = store.revoke_token(admin.id)
    assert revoked.revoked and revoked.revoked_at == clock()
    assert store.get_token(admin.id) == revoked
    assert store.revoked_unexpired() == [admin.id]
    clock.advance(hours=2)  # the revoked token expires: no front door needs to list it
    assert store.revoked_unexpired() == []
    assert {t.id: t.revoked for t in store.list_tokens("acme")} == {
        first.id: False, every.id: False, admin.id: True}

    with pytest.raises(TokenNotFound) as caught:
        store.revoke_token("no-such-jti")
    assert caught.value.field == "token_id"


@pytest.mark.parametrize(("scopes", "ttl", "field"), [
    (["text", "chat"], timedelta(days=1), "scopes[1]"),
    (["Admin"], timedelta(days=1), "scopes[0]"),
    (["text"], timedelta(0), "ttl"),
    (["text"], timedelta(days=4000), "ttl"),
])
def test_bad_token_requests_name_the_field_and_store_nothing(store, scopes, ttl, field):
    store.create_tenant("acme")
    with pytest.raises(InvalidArgument) as caught:
        store.issue_token("acme", scopes, ttl)
    assert caught.value.field == field
    assert store.list_tokens("acme") == []

"""`aimesh up`'s tenancy start: key, local tenant, token files (0600) reused across
restarts and replaced once revoked or signed by a retired key."""

from __future__ import annotations

import stat

import pytest
from aimesh_servers.tenancy import keys
from aimesh_servers.tenancy.bootstrap import bootstrap_local
from aimesh_servers.tenancy.db import make_engine, migrate, sqlite_url
from aimesh_servers.tenancy.plans import SERVICES
from aimesh_servers.tenancy.store import TenantStore


@pytest.fixture
def store(tmp_path):
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    yield TenantStore(engine)
    engine.dispose()


def test_a_fresh_state_dir_gets_a_tenant_and_two_private_tokens(store, tmp_path):
    access = bootstrap_local(store, tmp_path / "state")
    assert store.get_tenant("local").plan == "default"
    for path, token, scope in ((access.token_path, access.token, " ".join(SERVICES)),
                               (access.admin_token_path, access.admin_token, "admin")):
        assert path.read_text().strip() == token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        claims = keys.verify_token(token, store.jwks())
        assert claims["tenant"] == "local" and claims["scope"] == scope
    assert sorted(p.name for p in access.token_path.parent.iterdir()) == ["admin.token", "local.token"]


def test_a_restart_reuses_good_tokens_and_replaces_revoked_ones(store, tmp_path):
    first = bootstrap_local(store, tmp_path)
    version = store.version()
    again = bootstrap_local(store, tmp_path)
    assert (again.token, again.admin_token) == (first.token, first.admin_token)
    assert store.version() == version  # nothing issued, nothing created

    store.revoke_token(keys.verify_token(first.admin_token, store.jwks())["jti"])
    third = bootstrap_local(store, tmp_path)
    assert third.token == first.token and third.admin_token != first.admin_token
    keys.verify_token(third.admin_token, store.jwks())


def test_tokens_of_a_retired_key_are_replaced(store, tmp_path):
    first = bootstrap_local(store, tmp_path)
    old_key = store.ensure_signing_key()
    store.rotate_signing_key()
    store.retire_signing_key(old_key.id)
    second = bootstrap_local(store, tmp_path)
    assert second.token != first.token and second.admin_token != first.admin_token
    assert keys.verify_token(second.token, store.jwks())["tenant"] == "local"

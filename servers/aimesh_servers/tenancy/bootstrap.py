"""What `aimesh up` needs for a first call that just works with tenancy on: a signing
key, a local tenant, and two tokens kept in the state directory (mode 0600):

- `<state-dir>/local.token`: the local tenant's token for every capability (the banner
  prints it with the SDK, grpcurl and curl lines that use it);
- `<state-dir>/admin.token`: an `admin` token, which `aimesh tenants ...` reads.

Tokens still valid for a while are reused across restarts, so `aimesh up` does not
mint new ones every time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import jwt

from ..runtime.errors import TenantAlreadyExists, TenantNotFound
from . import keys
from .plans import ADMIN_SCOPE, SERVICES
from .store import TenantStore

LOCAL_TENANT = "local"
LOCAL_TOKEN_FILE = "local.token"
ADMIN_TOKEN_FILE = "admin.token"
TOKEN_TTL = timedelta(days=30)
REISSUE_BEFORE = timedelta(days=1)  # a token that expires sooner is replaced


@dataclass(frozen=True)
class LocalAccess:
    tenant: str
    token: str  # every capability
    admin_token: str
    token_path: Path
    admin_token_path: Path


def bootstrap_local(store: TenantStore, state_dir: str | Path,
                    tenant: str = LOCAL_TENANT) -> LocalAccess:
    """Ensures the signing key, the tenant and both token files; returns the tokens."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    store.ensure_signing_key()
    try:
        store.get_tenant(tenant)
    except TenantNotFound:
        with contextlib.suppress(TenantAlreadyExists):  # another control plane was first
            store.create_tenant(tenant, display_name="local (aimesh up)")
    token_path, admin_path = state / LOCAL_TOKEN_FILE, state / ADMIN_TOKEN_FILE
    token = _reuse_or_issue(store, token_path, tenant, tuple(SERVICES))
    admin = _reuse_or_issue(store, admin_path, tenant, (ADMIN_SCOPE,))
    return LocalAccess(tenant, token, admin, token_path, admin_path)


def _reuse_or_issue(store: TenantStore, path: Path, tenant: str, scopes: Sequence[str]) -> str:
    if path.is_file() and _still_good(store, path.read_text().strip(), tenant, scopes):
        return path.read_text().strip()
    token, _ = store.issue_token(tenant, scopes, TOKEN_TTL)
    _write_private(path, token + "\n")
    return token


def _still_good(store: TenantStore, token: str, tenant: str, scopes: Sequence[str]) -> bool:
    """Verifies with the current keys, for this tenant and scopes, not revoked, and valid
    for at least REISSUE_BEFORE more."""
    try:
        claims = keys.verify_token(token, store.jwks())
    except jwt.InvalidTokenError:
        return False
    expires_in = claims["exp"] - store.clock().timestamp()
    return (claims.get("tenant") == tenant and claims.get("scope") == " ".join(scopes)
            and expires_in > REISSUE_BEFORE.total_seconds()
            and claims["jti"] not in store.revoked_unexpired())


def _write_private(path: Path, text: str) -> None:
    """Readable by its owner only, and never half written (rename over the old file)."""
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # in case a stale temporary had other bits
        out.write(text)
    os.replace(temporary, path)

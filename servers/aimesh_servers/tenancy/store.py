"""The tenant store: tenants, their limit overrides, tokens and signing keys.

SQLAlchemy Core over the tables of `tenancy.db` (SQLite or PostgreSQL), synchronous:
async callers run it in a thread. Every change bumps `tenancy_state.version` in the
same transaction, so every control plane sharing the database notices it by polling
one row (`version()`). Bad input raises the runtime's domain errors (InvalidArgument
naming the field, TenantNotFound, ...), which the gRPC interceptor turns into statuses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..runtime.errors import (
    InvalidArgument,
    TenantAlreadyExists,
    TenantNotFound,
    TokenNotFound,
)
from . import keys as jwt_keys
from .db import signing_keys, tenancy_state, tenant_limits, tenants, tokens
from .plans import (
    ADMIN_SCOPE,
    ALL_CAPABILITIES,
    DEFAULT_PLAN,
    KINDS,
    PLANS,
    SERVICES,
    Limit,
    effective_budget,
    effective_limits,
)

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MODEL_ID = re.compile(r"^[^\s,]{1,200}$")
MAX_WINDOW_S = 31 * 86400
MAX_TOKEN_TTL = timedelta(days=3650)
DEFAULT_TOKEN_TTL = timedelta(days=30)


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()  # "leave unchanged" for update_tenant's optional fields


@dataclass(frozen=True)
class Tenant:
    id: str
    display_name: str
    plan: str
    budget_override_usd: float | None  # None: the plan's
    monthly_budget_usd: float  # in force; 0 = none
    allowed_capabilities: tuple[str, ...]  # empty = all
    allowed_models: tuple[str, ...]  # empty = all
    disabled: bool
    created_at: datetime
    updated_at: datetime
    overrides: tuple[Limit, ...]
    limits: tuple[Limit, ...]  # in force: the plan's, replaced by overrides


@dataclass(frozen=True)
class TokenRecord:
    id: str  # jti
    tenant_id: str
    scopes: tuple[str, ...]
    key_id: str
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _split(text: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(part for part in text.split(sep) if part)


def _check_capabilities(values: Iterable[str], field: str) -> tuple[str, ...]:
    result = []
    for index, value in enumerate(values):
        if value not in SERVICES:
            raise InvalidArgument(
                f"unknown capability {value!r}; capabilities: {', '.join(SERVICES)}",
                field=f"{field}[{index}]")
        if value not in result:
            result.append(value)
    return tuple(result)


def _check_models(values: Iterable[str], field: str) -> tuple[str, ...]:
    result = []
    for index, value in enumerate(values):
        if not MODEL_ID.match(value):
            raise InvalidArgument(f"model id {value!r} must be 1-200 characters without "
                                  "spaces or commas", field=f"{field}[{index}]")
        if value not in result:
            result.append(value)
    return tuple(result)


def _check_plan(plan: str, field: str = "plan") -> str:
    if plan not in PLANS:
        raise InvalidArgument(f"unknown plan {plan!r}; plans: {', '.join(sorted(PLANS))}",
                              field=field)
    return plan


def _check_budget(value: float | None, field: str = "monthly_budget_usd") -> float | None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise InvalidArgument(f"{field} must be a finite amount >= 0, not {value}", field=field)
    return value


def check_scopes(scopes: Iterable[str], field: str = "scopes") -> tuple[str, ...]:
    """Valid, deduplicated scopes; none means every capability (not admin)."""
    result: list[str] = []
    for index, scope in enumerate(scopes):
        if scope != ADMIN_SCOPE and scope not in SERVICES:
            raise InvalidArgument(
                f"unknown scope {scope!r}; scopes: {', '.join([*SERVICES, ADMIN_SCOPE])}",
                field=f"{field}[{index}]")
        if scope not in result:
            result.append(scope)
    return tuple(result) or tuple(SERVICES)


def check_limit(limit: Limit, field: str = "limit") -> Limit:
    if limit.capability != ALL_CAPABILITIES and limit.capability not in SERVICES:
        raise InvalidArgument(
            f"unknown capability {limit.capability!r}; use one of {', '.join(SERVICES)} or "
            f"'{ALL_CAPABILITIES}'", field=f"{field}.capability")
    if limit.model and not MODEL_ID.match(limit.model):
        raise InvalidArgument(f"model id {limit.model!r} must be 1-200 characters without "
                              "spaces or commas", field=f"{field}.model")
    if limit.kind not in KINDS:
        raise InvalidArgument(f"limit kind must be one of {', '.join(KINDS)}",
                              field=f"{field}.kind")
    if not math.isfinite(limit.limit) or limit.limit < 0:
        raise InvalidArgument(f"limit must be a finite number >= 0, not {limit.limit}",
                              field=f"{field}.limit")
    if not 1 <= limit.window_s <= MAX_WINDOW_S:
        raise InvalidArgument(f"window must be 1 s to {MAX_WINDOW_S // 86400} days",
                              field=f"{field}.window")
    return limit


class TenantStore:
    """Tenants, limits, tokens and signing keys in the tenancy database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self.clock = clock or (lambda: datetime.now(UTC))

    # -- change tracking --------------------------------------------------------------

    def version(self) -> int:
        """Bumped by every change to tenants, limits, tokens or keys."""
        with self.engine.connect() as conn:
            return int(conn.scalar(sa.select(tenancy_state.c.version).where(tenancy_state.c.id == 1)))

    @staticmethod
    def _bump(conn: Connection) -> None:
        conn.execute(tenancy_state.update().where(tenancy_state.c.id == 1)
                     .values(version=tenancy_state.c.version + 1))

    # -- tenants ----------------------------------------------------------------------

    def create_tenant(self, tenant_id: str, *, display_name: str = "", plan: str = "",
                      monthly_budget_usd: float | None = None,
                      allowed_capabilities: Sequence[str] = (),
                      allowed_models: Sequence[str] = ()) -> Tenant:
        if not TENANT_ID.match(tenant_id):
            raise InvalidArgument(
                f"tenant id {tenant_id!r} must be 1-64 lower-case letters, digits, '-' or '_', "
                "starting with a letter or digit", field="tenant_id")
        now = self.clock()
        row = {
            "id": tenant_id, "display_name": display_name or tenant_id,
            "plan": _check_plan(plan or DEFAULT_PLAN),
            "monthly_budget_usd": _check_budget(monthly_budget_usd),
            "allowed_capabilities": ",".join(_check_capabilities(allowed_capabilities,
                                                                 "allowed_capabilities")),
            "allowed_models": ",".join(_check_models(allowed_models, "allowed_models")),
            "disabled": False, "created_at": now, "updated_at": now,
        }
        try:
            with self.engine.begin() as conn:
                if conn.scalar(sa.select(tenants.c.id).where(tenants.c.id == tenant_id)):
                    raise TenantAlreadyExists(tenant_id)
                conn.execute(tenants.insert().values(**row))
                self._bump(conn)
        except sa.exc.IntegrityError:  # created by another control plane at the same moment
            raise TenantAlreadyExists(tenant_id) from None
        return self.get_tenant(tenant_id)

    def get_tenant(self, tenant_id: str) -> Tenant:
        with self.engine.connect() as conn:
            row = conn.execute(tenants.select().where(tenants.c.id == tenant_id)).one_or_none()
            if row is None:
                raise TenantNotFound(tenant_id)
            overrides = conn.execute(
                tenant_limits.select().where(tenant_limits.c.tenant_id == tenant_id)).all()
        return self._tenant(row, overrides)

    def list_tenants(self) -> list[Tenant]:
        """Every tenant, by id, with its limits in force."""
        with self.engine.connect() as conn:
            rows = conn.execute(tenants.select().order_by(tenants.c.id)).all()
            overrides: dict[str, list[Any]] = {}
            for limit in conn.execute(tenant_limits.select()):
                overrides.setdefault(limit.tenant_id, []).append(limit)
        return [self._tenant(row, overrides.get(row.id, [])) for row in rows]

    def update_tenant(self, tenant_id: str, *, display_name: str | _Keep = KEEP,
                      plan: str | _Keep = KEEP, monthly_budget_usd: float | None | _Keep = KEEP,
                      allowed_capabilities: Sequence[str] | _Keep = KEEP,
                      allowed_models: Sequence[str] | _Keep = KEEP,
                      disabled: bool | _Keep = KEEP) -> Tenant:
        """Changes the fields given (KEEP leaves one as it is; a budget of None means the
        plan's; empty allowed lists mean all)."""
        values: dict[str, Any] = {}
        if not isinstance(display_name, _Keep):
            values["display_name"] = display_name or tenant_id
        if not isinstance(plan, _Keep):
            values["plan"] = _check_plan(plan)
        if not isinstance(monthly_budget_usd, _Keep):
            values["monthly_budget_usd"] = _check_budget(monthly_budget_usd)
        if not isinstance(allowed_capabilities, _Keep):
            values["allowed_capabilities"] = ",".join(
                _check_capabilities(allowed_capabilities, "allowed_capabilities"))
        if not isinstance(allowed_models, _Keep):
            values["allowed_models"] = ",".join(_check_models(allowed_models, "allowed_models"))
        if not isinstance(disabled, _Keep):
            values["disabled"] = bool(disabled)
        with self.engine.begin() as conn:
            self._require_tenant(conn, tenant_id)
            if values:
                conn.execute(tenants.update().where(tenants.c.id == tenant_id)
                             .values(**values, updated_at=self.clock()))
                self._bump(conn)
        return self.get_tenant(tenant_id)

    def set_limit(self, tenant_id: str, limit: Limit) -> Tenant:
        """Sets the override of (capability, model, kind), replacing any before it."""
        check_limit(limit)
        with self.engine.begin() as conn:
            self._require_tenant(conn, tenant_id)
            conn.execute(tenant_limits.delete().where(*self._limit_key(tenant_id, limit.key)))
            conn.execute(tenant_limits.insert().values(
                tenant_id=tenant_id, capability=limit.capability, model=limit.model,
                kind=limit.kind, limit_value=limit.limit, window_s=limit.window_s))
            self._touch(conn, tenant_id)
        return self.get_tenant(tenant_id)

    def clear_limit(self, tenant_id: str, capability: str, model: str, kind: str) -> Tenant:
        """Removes an override (the plan's limit applies again); no override is no change."""
        with self.engine.begin() as conn:
            self._require_tenant(conn, tenant_id)
            deleted = conn.execute(tenant_limits.delete().where(
                *self._limit_key(tenant_id, (capability, model, kind)))).rowcount
            if deleted:
                self._touch(conn, tenant_id)
        return self.get_tenant(tenant_id)

    def effective_limits(self, tenant_id: str) -> list[Limit]:
        return list(self.get_tenant(tenant_id).limits)

    def monthly_budget(self, tenant_id: str) -> float | None:
        """The tenant's budget in force in USD; None when it has none or does not exist
        (the shape UsageService's summary wants)."""
        try:
            return self.get_tenant(tenant_id).monthly_budget_usd or None
        except TenantNotFound:
            return None

    @staticmethod
    def _limit_key(tenant_id: str, key: tuple[str, str, str]) -> tuple[Any, ...]:
        capability, model, kind = key
        return (tenant_limits.c.tenant_id == tenant_id, tenant_limits.c.capability == capability,
                tenant_limits.c.model == model, tenant_limits.c.kind == kind)

    def _touch(self, conn: Connection, tenant_id: str) -> None:
        conn.execute(tenants.update().where(tenants.c.id == tenant_id)
                     .values(updated_at=self.clock()))
        self._bump(conn)

    @staticmethod
    def _require_tenant(conn: Connection, tenant_id: str) -> None:
        if not conn.scalar(sa.select(tenants.c.id).where(tenants.c.id == tenant_id)):
            raise TenantNotFound(tenant_id)

    @staticmethod
    def _tenant(row: Any, override_rows: Iterable[Any]) -> Tenant:
        plan = PLANS.get(row.plan) or PLANS[DEFAULT_PLAN]  # a plan dropped from code
        overrides = tuple(sorted(
            (Limit(capability=o.capability, model=o.model, kind=o.kind, limit=o.limit_value,
                   window_s=o.window_s) for o in override_rows),
            key=lambda limit: limit.key))
        return Tenant(
            id=row.id, display_name=row.display_name, plan=row.plan,
            budget_override_usd=row.monthly_budget_usd,
            monthly_budget_usd=effective_budget(plan, row.monthly_budget_usd),
            allowed_capabilities=_split(row.allowed_capabilities),
            allowed_models=_split(row.allowed_models), disabled=bool(row.disabled),
            created_at=row.created_at, updated_at=row.updated_at, overrides=overrides,
            limits=tuple(effective_limits(plan, overrides)),
        )

    # -- tokens -----------------------------------------------------------------------

    def issue_token(self, tenant_id: str, scopes: Sequence[str] = (),
                    ttl: timedelta = DEFAULT_TOKEN_TTL) -> tuple[str, TokenRecord]:
        """A JWT for the tenant signed with the newest active key (made if none), and its
        stored record. No scopes means every capability (not admin)."""
        checked = check_scopes(scopes)
        if not timedelta(seconds=1) <= ttl <= MAX_TOKEN_TTL:
            raise InvalidArgument(f"ttl must be 1 s to {MAX_TOKEN_TTL.days} days", field="ttl")
        with self.engine.connect() as conn:
            self._require_tenant(conn, tenant_id)  # before a first key is made for nothing
        key = self.ensure_signing_key()
        with self.engine.begin() as conn:
            self._require_tenant(conn, tenant_id)
            token, claims = jwt_keys.issue_token(key, tenant_id, checked, ttl, now=self.clock())
            conn.execute(tokens.insert().values(
                id=claims.id, tenant_id=tenant_id, scopes=" ".join(claims.scopes),
                key_id=key.id, issued_at=claims.issued_at, expires_at=claims.expires_at,
                revoked_at=None))
            self._bump(conn)
        return token, TokenRecord(claims.id, tenant_id, claims.scopes, key.id, claims.issued_at,
                                  claims.expires_at, None)

    def list_tokens(self, tenant_id: str) -> list[TokenRecord]:
        """The tenant's tokens, newest first."""
        with self.engine.connect() as conn:
            self._require_tenant(conn, tenant_id)
            rows = conn.execute(tokens.select().where(tokens.c.tenant_id == tenant_id)
                                .order_by(tokens.c.issued_at.desc(), tokens.c.id)).all()
        return [self._token(row) for row in rows]

    def get_token(self, token_id: str) -> TokenRecord:
        with self.engine.connect() as conn:
            row = conn.execute(tokens.select().where(tokens.c.id == token_id)).one_or_none()
        if row is None:
            raise TokenNotFound(token_id)
        return self._token(row)

    def revoke_token(self, token_id: str) -> TokenRecord:
        """Revokes a token (revoking one already revoked changes nothing)."""
        with self.engine.begin() as conn:
            updated = conn.execute(tokens.update()
                                   .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                                   .values(revoked_at=self.clock())).rowcount
            if updated:
                self._bump(conn)
        return self.get_token(token_id)

    def revoked_unexpired(self) -> list[str]:
        """Ids (jti) of revoked tokens that have not expired: what the front door refuses
        on top of signature and expiry checks."""
        with self.engine.connect() as conn:
            return list(conn.scalars(
                sa.select(tokens.c.id)
                .where(tokens.c.revoked_at.is_not(None), tokens.c.expires_at > self.clock())
                .order_by(tokens.c.id)))

    @staticmethod
    def _token(row: Any) -> TokenRecord:
        return TokenRecord(row.id, row.tenant_id, _split(row.scopes, " "), row.key_id,
                           row.issued_at, row.expires_at, row.revoked_at)

    # -- signing keys -----------------------------------------------------------------

    def signing_keys(self, *, include_retired: bool = False) -> list[jwt_keys.SigningKey]:
        """Keys, oldest first."""
        query = signing_keys.select().order_by(signing_keys.c.created_at, signing_keys.c.id)
        if not include_retired:
            query = query.where(signing_keys.c.retired_at.is_(None))
        with self.engine.connect() as conn:
            return [self._key(row) for row in conn.execute(query)]

    def ensure_signing_key(self) -> jwt_keys.SigningKey:
        """The key new tokens are signed with (the newest active one); made if none."""
        active = self.signing_keys()
        return active[-1] if active else self._add_key()

    def rotate_signing_key(self, *, retire_old: bool = False
                           ) -> tuple[jwt_keys.SigningKey, list[jwt_keys.SigningKey]]:
        """Adds a key that signs from now on, and returns it with the active keys. Tokens
        of older keys stay valid; with retire_old, keys older than the previous signing
        key are retired (their tokens stop working)."""
        previous = self.signing_keys()
        key = self._add_key()
        if retire_old and len(previous) > 1:
            with self.engine.begin() as conn:
                conn.execute(signing_keys.update()
                             .where(signing_keys.c.id.in_([k.id for k in previous[:-1]]))
                             .values(retired_at=self.clock()))
                self._bump(conn)
        return key, self.signing_keys()

    def retire_signing_key(self, key_id: str) -> None:
        """Retires one key: tokens it signed stop working. The last active key cannot be."""
        active = [k.id for k in self.signing_keys()]
        if key_id not in active:
            raise InvalidArgument(f"no active signing key {key_id!r}", field="key_id")
        if len(active) == 1:
            raise InvalidArgument("the only active signing key cannot be retired; rotate first",
                                  field="key_id")
        with self.engine.begin() as conn:
            conn.execute(signing_keys.update().where(signing_keys.c.id == key_id)
                         .values(retired_at=self.clock()))
            self._bump(conn)

    def jwks(self) -> dict[str, Any]:
        """The JWKS of the active keys, for the front door's jwt_authn."""
        return jwt_keys.jwks(self.signing_keys())

    def _add_key(self) -> jwt_keys.SigningKey:
        # Strictly after every key before it: the newest key signs, by created_at.
        newest = self.signing_keys(include_retired=True)
        now = self.clock()
        if newest and newest[-1].created_at >= now:
            now = newest[-1].created_at + timedelta(microseconds=1)
        key = jwt_keys.new_signing_key(now)
        with self.engine.begin() as conn:
            conn.execute(signing_keys.insert().values(
                id=key.id, algorithm=key.algorithm, private_pem=key.private_pem,
                public_jwk=json.dumps(key.public_jwk, sort_keys=True), created_at=key.created_at,
                retired_at=None))
            self._bump(conn)
        return key

    @staticmethod
    def _key(row: Any) -> jwt_keys.SigningKey:
        return jwt_keys.SigningKey(id=row.id, private_pem=row.private_pem,
                                   public_jwk=json.loads(row.public_jwk),
                                   created_at=row.created_at, retired_at=row.retired_at,
                                   algorithm=row.algorithm)

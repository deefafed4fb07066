"""Tenant administration: `client.tenants.create("acme")`, `.issue_token("acme", ["text"])`...

Every call needs a token with the `admin` scope (`aimesh.Client(..., token=ADMIN_TOKEN)`).
Changes reach every front door within seconds, without a restart.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import timedelta

from google.protobuf import duration_pb2

from ..tenancy.v1 import tenancy_pb2 as pb
from ..tenancy.v1 import tenancy_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport

LimitKind = str | pb.LimitKind.ValueType  # "requests" | "units" | pb.LIMIT_KIND_*
Seconds = float | timedelta
_KINDS = {"requests": pb.LIMIT_KIND_REQUESTS, "units": pb.LIMIT_KIND_UNITS}


def _duration(value: Seconds) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _kind(kind: LimitKind) -> pb.LimitKind.ValueType:
    if isinstance(kind, str):
        try:
            return _KINDS[kind]
        except KeyError:
            raise ValueError(f"limit kind must be one of {', '.join(_KINDS)}, not {kind!r}") from None
    return kind


def _create(tenant_id: str, display_name: str, plan: str, monthly_budget_usd: float | None,
            allowed_capabilities: Sequence[str], allowed_models: Sequence[str]
            ) -> pb.CreateTenantRequest:
    request = pb.CreateTenantRequest(
        tenant_id=tenant_id, display_name=display_name, plan=plan,
        allowed_capabilities=allowed_capabilities, allowed_models=allowed_models)
    if monthly_budget_usd is not None:
        request.monthly_budget_usd = monthly_budget_usd
    return request


def _update(tenant_id: str, plan: str | None, monthly_budget_usd: float | None,
            allowed_capabilities: Sequence[str] | None, allowed_models: Sequence[str] | None,
            disabled: bool | None) -> pb.UpdateTenantRequest:
    request = pb.UpdateTenantRequest(tenant_id=tenant_id)
    if plan is not None:
        request.plan = plan
    if monthly_budget_usd is not None:
        request.monthly_budget_usd = monthly_budget_usd
    if allowed_capabilities is not None:
        request.set_allowed_capabilities = True
        request.allowed_capabilities.extend(allowed_capabilities)
    if allowed_models is not None:
        request.set_allowed_models = True
        request.allowed_models.extend(allowed_models)
    if disabled is not None:
        request.disabled = disabled
    return request


def _set_limit(tenant_id: str, capability: str, kind: LimitKind, limit: float, window: Seconds,
               model: str, clear: bool) -> pb.SetLimitRequest:
    return pb.SetLimitRequest(
        tenant_id=tenant_id, clear=clear,
        limit=pb.Limit(capability=capability, model=model, kind=_kind(kind), limit=limit,
                       window=_duration(window)))


def _issue(tenant_id: str, scopes: Sequence[str], ttl: Seconds | None) -> pb.IssueTokenRequest:
    if isinstance(scopes, str):  # "text" would otherwise become scopes t, e, x, t
        raise TypeError("scopes must be a sequence of strings, not one string")
    request = pb.IssueTokenRequest(tenant_id=tenant_id, scopes=scopes)
    if ttl is not None:
        request.ttl.CopyFrom(_duration(ttl))
    return request


class TenantsClient:
    """Blocking tenant administration (admin scope)."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.TenantServiceStub(transport.channel)

    def create(self, tenant_id: str, *, display_name: str = "", plan: str = "",
               monthly_budget_usd: float | None = None, allowed_capabilities: Sequence[str] = (),
               allowed_models: Sequence[str] = (), timeout: float | None = None) -> pb.Tenant:
        """Creates a tenant on a plan ("" = "default"). monthly_budget_usd: None keeps the
        plan's budget, 0 means none. Empty allowed lists mean every capability / model."""
        request = _create(tenant_id, display_name, plan, monthly_budget_usd,
                          allowed_capabilities, allowed_models)
        return self._t.unary(self._stub.CreateTenant, request, timeout=timeout).tenant

    def get(self, tenant_id: str, *, timeout: float | None = None) -> pb.Tenant:
        """One tenant with its limits in force (`.limits`) and its own overrides."""
        request = pb.GetTenantRequest(tenant_id=tenant_id)
        return self._t.unary(self._stub.GetTenant, request, timeout=timeout).tenant

    def list(self, *, timeout: float | None = None) -> builtins.list[pb.Tenant]:
        """Every tenant, by id."""
        response = self._t.unary(self._stub.ListTenants, pb.ListTenantsRequest(), timeout=timeout)
        return list(response.tenants)

    def update(self, tenant_id: str, *, plan: str | None = None,
               monthly_budget_usd: float | None = None,
               allowed_capabilities: Sequence[str] | None = None,
               allowed_models: Sequence[str] | None = None, disabled: bool | None = None,
               timeout: float | None = None) -> pb.Tenant:
        """Changes only the arguments given (None leaves a field as it is)."""
        request = _update(tenant_id, plan, monthly_budget_usd, allowed_capabilities,
                          allowed_models, disabled)
        return self._t.unary(self._stub.UpdateTenant, request, timeout=timeout).tenant

    def set_limit(self, tenant_id: str, capability: str, kind: LimitKind, limit: float,
                  window: Seconds = 60, *, model: str = "",
                  timeout: float | None = None) -> pb.Tenant:
        """Overrides one limit: at most `limit` calls ("requests") or units ("units") per
        `window` (seconds or timedelta) on `capability` ("text", ..., or "*"), optionally
        for one model."""
        request = _set_limit(tenant_id, capability, kind, limit, window, model, clear=False)
        return self._t.unary(self._stub.SetLimit, request, timeout=timeout).tenant

    def clear_limit(self, tenant_id: str, capability: str, kind: LimitKind, *, model: str = "",
                    timeout: float | None = None) -> pb.Tenant:
        """Removes an override: the plan's limit applies again."""
        request = _set_limit(tenant_id, capability, kind, 0, 0, model, clear=True)
        return self._t.unary(self._stub.SetLimit, request, timeout=timeout).tenant

    def issue_token(self, tenant_id: str, scopes: Sequence[str] = (), *,
                    ttl: Seconds | None = None, timeout: float | None = None
                    ) -> pb.IssueTokenResponse:
        """A new JWT (`.token`, shown once) and its claims (`.info`). scopes: capability
        short names or "admin"; empty means every capability. ttl: default 30 days."""
        request = _issue(tenant_id, scopes, ttl)
        return self._t.unary(self._stub.IssueToken, request, timeout=timeout)

    def list_tokens(self, tenant_id: str, *, timeout: float | None = None
                    ) -> builtins.list[pb.TokenInfo]:
        """The tenant's tokens (claims only), newest first."""
        request = pb.ListTokensRequest(tenant_id=tenant_id)
        return list(self._t.unary(self._stub.ListTokens, request, timeout=timeout).tokens)

    def revoke_token(self, token_id: str, *, timeout: float | None = None) -> pb.TokenInfo:
        """Revokes a token by id (jti): every front door refuses it within seconds."""
        request = pb.RevokeTokenRequest(token_id=token_id)
        return self._t.unary(self._stub.RevokeToken, request, timeout=timeout).info

    def rotate_signing_key(self, *, retire_old: bool = False, timeout: float | None = None
                           ) -> pb.RotateSigningKeyResponse:
        """A new key signs from now on; older keys' tokens stay valid unless retire_old
        retires every key older than the previous one."""
        request = pb.RotateSigningKeyRequest(retire_old=retire_old)
        return self._t.unary(self._stub.RotateSigningKey, request, timeout=timeout)


class AsyncTenantsClient:
    """Awaitable tenant administration (same methods as TenantsClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.TenantServiceStub(transport.channel)

    async def create(self, tenant_id: str, *, display_name: str = "", plan: str = "",
                     monthly_budget_usd: float | None = None,
                     allowed_capabilities: Sequence[str] = (), allowed_models: Sequence[str] = (),
                     timeout: float | None = None) -> pb.Tenant:
        request = _create(tenant_id, display_name, plan, monthly_budget_usd,
                          allowed_capabilities, allowed_models)
        return (await self._t.unary(self._stub.CreateTenant, request, timeout=timeout)).tenant

    async def get(self, tenant_id: str, *, timeout: float | None = None) -> pb.Tenant:
        request = pb.GetTenantRequest(tenant_id=tenant_id)
        return (await self._t.unary(self._stub.GetTenant, request, timeout=timeout)).tenant

    async def list(self, *, timeout: float | None = None) -> builtins.list[pb.Tenant]:
        response = await self._t.unary(self._stub.ListTenants, pb.ListTenantsRequest(),
                                       timeout=timeout)
        return list(response.tenants)

    async def update(self, tenant_id: str, *, plan: str | None = None,
                     monthly_budget_usd: float | None = None,
                     allowed_capabilities: Sequence[str] | None = None,
                     allowed_models: Sequence[str] | None = None, disabled: bool | None = None,
                     timeout: float | None = None) -> pb.Tenant:
        request = _update(tenant_id, plan, monthly_budget_usd, allowed_capabilities,
                          allowed_models, disabled)
        return (await self._t.unary(self._stub.UpdateTenant, request, timeout=timeout)).tenant

    async def set_limit(self, tenant_id: str, capability: str, kind: LimitKind, limit: float,
                        window: Seconds = 60, *, model: str = "",
                        timeout: float | None = None) -> pb.Tenant:
        request = _set_limit(tenant_id, capability, kind, limit, window, model, clear=False)
        return (await self._t.unary(self._stub.SetLimit, request, timeout=timeout)).tenant

    async def clear_limit(self, tenant_id: str, capability: str, kind: LimitKind, *,
                          model: str = "", timeout: float | None = None) -> pb.Tenant:
        request = _set_limit(tenant_id, capability, kind, 0, 0, model, clear=True)
        return (await self._t.unary(self._stub.SetLimit, request, timeout=timeout)).tenant

    async def issue_token(self, tenant_id: str, scopes: Sequence[str] = (), *,
                          ttl: Seconds | None = None, timeout: float | None = None
                          ) -> pb.IssueTokenResponse:
        request = _issue(tenant_id, scopes, ttl)
        return await self._t.unary(self._stub.IssueToken, request, timeout=timeout)

    async def list_tokens(self, tenant_id: str, *, timeout: float | None = None
                          ) -> builtins.list[pb.TokenInfo]:
        request = pb.ListTokensRequest(tenant_id=tenant_id)
        return list((await self._t.unary(self._stub.ListTokens, request, timeout=timeout)).tokens)

    async def revoke_token(self, token_id: str, *, timeout: float | None = None) -> pb.TokenInfo:
        request = pb.RevokeTokenRequest(token_id=token_id)
        return (await self._t.unary(self._stub.RevokeToken, request, timeout=timeout)).info

    async def rotate_signing_key(self, *, retire_old: bool = False, timeout: float | None = None
                                 ) -> pb.RotateSigningKeyResponse:
        request = pb.RotateSigningKeyRequest(retire_old=retire_old)
        return await self._t.unary(self._stub.RotateSigningKey, request, timeout=timeout)

"""`aimesh.tenancy.v1.TenantService`: the admin API over the tenant store.

Identity comes only from the headers the front door sets after verifying the JWT (a
caller can never set them itself): every RPC needs the `admin` scope in
`x-aimesh-scopes`. Store calls block, so they run in a worker thread. After every
change `on_change` is called (the quota controller republishes the front door's
admission state from it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from aimesh.tenancy.v1 import tenancy_pb2 as pb
from aimesh.tenancy.v1 import tenancy_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, timestamp_pb2

from ..runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from ..runtime.service import ServedModel
from .plans import ADMIN_SCOPE, Limit
from .store import DEFAULT_TOKEN_TTL, KEEP, Tenant, TenantStore, TokenRecord

log = logging.getLogger(__name__)

SCOPES_HEADER = "x-aimesh-scopes"
TENANT_HEADER = "x-aimesh-tenant"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TenantService"].full_name
KIND_TO_PB = {"requests": pb.LIMIT_KIND_REQUESTS, "units": pb.LIMIT_KIND_UNITS}
KIND_FROM_PB = {value: key for key, value in KIND_TO_PB.items()}
T = TypeVar("T")


def caller_scopes(context: grpc.aio.ServicerContext) -> tuple[str, ...] | None:
    """The verified scopes of the caller, or None when the call carries no identity."""
    metadata = dict(context.invocation_metadata() or ())
    if SCOPES_HEADER not in metadata and TENANT_HEADER not in metadata:
        return None
    return tuple(metadata.get(SCOPES_HEADER, "").split())


def require_admin(context: grpc.aio.ServicerContext) -> None:
    scopes = caller_scopes(context)
    if scopes is None:
        raise Unauthenticated("the tenant admin API needs a verified token with the "
                              f"{ADMIN_SCOPE!r} scope; this call carries none")
    if ADMIN_SCOPE not in scopes:
        raise PermissionDenied(f"the tenant admin API needs the {ADMIN_SCOPE!r} scope",
                               metadata={"required_scope": ADMIN_SCOPE,
                                         "scopes": " ".join(scopes)})


def _timestamp(value: Any) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def limit_to_pb(limit: Limit) -> pb.Limit:
    return pb.Limit(capability=limit.capability, model=limit.model, kind=KIND_TO_PB[limit.kind],
                    limit=limit.limit, window=_duration(limit.window_s))


def limit_from_pb(limit: pb.Limit, field: str = "limit") -> Limit:
    if limit.kind not in KIND_FROM_PB:
        raise InvalidArgument("limit kind must be LIMIT_KIND_REQUESTS or LIMIT_KIND_UNITS",
                              field=f"{field}.kind")
    if limit.window.nanos:
        raise InvalidArgument("the window must be whole seconds", field=f"{field}.window")
    return Limit(capability=limit.capability, model=limit.model, kind=KIND_FROM_PB[limit.kind],
                 limit=limit.limit, window_s=limit.window.seconds)


def tenant_to_pb(tenant: Tenant) -> pb.Tenant:
    return pb.Tenant(
        id=tenant.id, display_name=tenant.display_name, plan=tenant.plan,
        limits=[limit_to_pb(limit) for limit in tenant.limits],
        overrides=[limit_to_pb(limit) for limit in tenant.overrides],
        monthly_budget_usd=tenant.monthly_budget_usd,
        allowed_capabilities=tenant.allowed_capabilities, allowed_models=tenant.allowed_models,
        disabled=tenant.disabled, create_time=_timestamp(tenant.created_at),
    )


def token_to_pb(token: TokenRecord) -> pb.TokenInfo:
    return pb.TokenInfo(id=token.id, tenant_id=token.tenant_id, scopes=token.scopes,
                        issue_time=_timestamp(token.issued_at),
                        expire_time=_timestamp(token.expires_at), revoked=token.revoked,
                        key_id=token.key_id)


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    return value


OnChange = Callable[[], None | Awaitable[None]]


class TenantServicer(pb_grpc.TenantServiceServicer):
    def __init__(self, store: TenantStore, on_change: OnChange | None = None) -> None:
        self.store = store
        self.on_change = on_change

    async def _run(self, call: Callable[..., T], *args: Any,
                   changes: bool = False, **kwargs: Any) -> T:
        result = await asyncio.to_thread(call, *args, **kwargs)
        if changes and self.on_change is not None:
            # The change is stored: a failed republish must not fail the call (the quota
            # controller also polls the version row and catches up).
            try:
                outcome = self.on_change()
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("on_change after a tenancy change failed")
        return result

    async def CreateTenant(self, request: pb.CreateTenantRequest,
                           context: grpc.aio.ServicerContext) -> pb.CreateTenantResponse:
        require_admin(context)
        budget = request.monthly_budget_usd if request.HasField("monthly_budget_usd") else None
        tenant = await self._run(
            self.store.create_tenant, _required(request.tenant_id, "tenant_id"),
            display_name=request.display_name, plan=request.plan, monthly_budget_usd=budget,
            allowed_capabilities=list(request.allowed_capabilities),
            allowed_models=list(request.allowed_models), changes=True)
        return pb.CreateTenantResponse(tenant=tenant_to_pb(tenant))

    async def GetTenant(self, request: pb.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> pb.GetTenantResponse:
        require_admin(context)
        tenant = await self._run(self.store.get_tenant,
                                 _required(request.tenant_id, "tenant_id"))
        return pb.GetTenantResponse(tenant=tenant_to_pb(tenant))

    async def ListTenants(self, request: pb.ListTenantsRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListTenantsResponse:
        require_admin(context)
        tenants = await self._run(self.store.list_tenants)
        return pb.ListTenantsResponse(tenants=[tenant_to_pb(t) for t in tenants])

    async def UpdateTenant(self, request: pb.UpdateTenantRequest,
                           context: grpc.aio.ServicerContext) -> pb.UpdateTenantResponse:
        require_admin(context)
        def optional(field: str) -> Any:
            return getattr(request, field) if request.HasField(field) else KEEP

        tenant = await self._run(
            self.store.update_tenant, _required(request.tenant_id, "tenant_id"),
            plan=optional("plan"), monthly_budget_usd=optional("monthly_budget_usd"),
            disabled=optional("disabled"),
            allowed_capabilities=(list(request.allowed_capabilities)
                                  if request.set_allowed_capabilities else KEEP),
            allowed_models=(list(request.allowed_models) if request.set_allowed_models else KEEP),
            changes=True)
        return pb.UpdateTenantResponse(tenant=tenant_to_pb(tenant))

    async def SetLimit(self, request: pb.SetLimitRequest,
                       context: grpc.aio.ServicerContext) -> pb.SetLimitResponse:
        require_admin(context)
        tenant_id = _required(request.tenant_id, "tenant_id")
        if not request.HasField("limit"):
            raise InvalidArgument("limit is required", field="limit")
        if request.clear:
            kind = limit_from_pb(request.limit).kind
            tenant = await self._run(self.store.clear_limit, tenant_id,
                                     request.limit.capability, request.limit.model, kind,
                                     changes=True)
        else:
            tenant = await self._run(self.store.set_limit, tenant_id,
                                     limit_from_pb(request.limit), changes=True)
        return pb.SetLimitResponse(tenant=tenant_to_pb(tenant))

    async def IssueToken(self, request: pb.IssueTokenRequest,
                         context: grpc.aio.ServicerContext) -> pb.IssueTokenResponse:
        require_admin(context)
        ttl = (timedelta(microseconds=request.ttl.ToMicroseconds()) if request.HasField("ttl")
               else DEFAULT_TOKEN_TTL)
        token, record = await self._run(
            self.store.issue_token, _required(request.tenant_id, "tenant_id"),
            list(request.scopes), ttl, changes=True)
        return pb.IssueTokenResponse(token=token, info=token_to_pb(record))

    async def ListTokens(self, request: pb.ListTokensRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListTokensResponse:
        require_admin(context)
        records = await self._run(self.store.list_tokens,
                                  _required(request.tenant_id, "tenant_id"))
        return pb.ListTokensResponse(tokens=[token_to_pb(r) for r in records])

    async def RevokeToken(self, request: pb.RevokeTokenRequest,
                          context: grpc.aio.ServicerContext) -> pb.RevokeTokenResponse:
        require_admin(context)
        record = await self._run(self.store.revoke_token,
                                 _required(request.token_id, "token_id"), changes=True)
        return pb.RevokeTokenResponse(info=token_to_pb(record))

    async def RotateSigningKey(self, request: pb.RotateSigningKeyRequest,
                               context: grpc.aio.ServicerContext) -> pb.RotateSigningKeyResponse:
        require_admin(context)
        key, active = await self._run(self.store.rotate_signing_key,
                                      retire_old=request.retire_old, changes=True)
        return pb.RotateSigningKeyResponse(key_id=key.id, active_key_ids=[k.id for k in active])


class TenantCapability:
    """TenantService as the runner hosts it (beside the control server's services)."""

    models: Sequence[ServedModel] = ()
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, store: TenantStore, on_change: OnChange | None = None) -> None:
        self.servicer = TenantServicer(store, on_change)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TenantServiceServicer_to_server(self.servicer, server)

    def load(self) -> None:
        """Nothing to load."""

"""aimesh.usage.v1.UsageService over the usage store.

Who is asking comes only from the headers the front door sets after verifying the
token (``x-aimesh-tenant``, ``x-aimesh-scopes``): a tenant sees its own usage; the
``admin`` scope may name any tenant, or none for everyone. Queries run in worker
threads (SQLAlchemy is synchronous).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import sqlalchemy as sa
from aimesh.usage.v1 import usage_pb2 as pb
from aimesh.usage.v1 import usage_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from sqlalchemy.engine import Engine

from ..runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from . import usage_queries as queries
from .plans import ADMIN_SCOPE, SERVICES

TENANT_HEADER = "x-aimesh-tenant"
SCOPES_HEADER = "x-aimesh-scopes"
DEFAULT_WINDOW = timedelta(days=30)

GROUP_BY = {
    pb.GROUP_BY_UNSPECIFIED: "model",
    pb.GROUP_BY_CAPABILITY: "capability",
    pb.GROUP_BY_MODEL: "model",
    pb.GROUP_BY_POOL: "pool",
    pb.GROUP_BY_TENANT: "tenant",
}
GRANULARITY = {
    pb.GRANULARITY_UNSPECIFIED: None,
    pb.GRANULARITY_HOUR: "hour",
    pb.GRANULARITY_DAY: "day",
    pb.GRANULARITY_MONTH: "month",
}

MonthlyBudget = Callable[[str], float | None]  # tenant -> its monthly budget in USD (None: none)


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool

    def scope(self, asked: str) -> str | None:
        """The tenant a request may read: its own, or (admin) the one asked, None = all."""
        if self.admin:
            return asked or None
        if asked and asked != self.tenant:
            raise PermissionDenied(
                f"tenant {self.tenant!r} may not read the usage of tenant {asked!r}",
                field="tenant", metadata={"tenant": self.tenant, "asked": asked},
            )
        return self.tenant


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    headers = {key: value for key, value in context.invocation_metadata() or ()}
    tenant = headers.get(TENANT_HEADER, "")
    if not tenant:
        raise Unauthenticated("no verified tenant: call through the front door with a token")
    return Caller(tenant=tenant, admin=ADMIN_SCOPE in headers.get(SCOPES_HEADER, "").split())


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def _duration_ms(ms: float | None) -> duration_pb2.Duration | None:
    if ms is None:
        return None
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(ms * 1e6))
    return out


def record_message(row: sa.Row) -> pb.UsageRecord:
    return pb.UsageRecord(
        id=str(row.id), tenant=row.tenant, service=row.service, method=row.method,
        requested_model=row.requested_model, served_model=row.served_model, pool=row.pool, unit=row.unit,
        input_units=row.input_units, output_units=row.output_units, duration=_duration_ms(row.duration_ms),
        status=row.status, cost_usd=row.cost_usd, time=_timestamp(row.time), capability=row.capability,
        request_type=row.request_type, served_version=row.served_version,
        time_to_first_output=_duration_ms(row.ttft_ms), reason=row.reason, fell_back=row.fell_back,
        trace_id=row.trace_id, request_id=row.request_id, origin=row.origin,
    )


def line_message(line: queries.SummaryLine) -> pb.UsageSummaryLine:
    return pb.UsageSummaryLine(
        service=SERVICES.get(line.capability, ""), served_model=line.served_model, unit=line.unit,
        calls=line.calls, failed_calls=line.failed_calls, input_units=line.input_units,
        output_units=line.output_units, cost_usd=line.cost_usd, capability=line.capability, pool=line.pool,
        tenant=line.tenant, bucket_start=_timestamp(line.bucket_start) if line.bucket_start else None,
        fallback_rate=line.fallback_rate, latency_p50=_duration_ms(line.latency_p50_ms),
        latency_p95=_duration_ms(line.latency_p95_ms), error_rate=line.error_rate,
    )


class UsageServicer(pb_grpc.UsageServiceServicer):
    def __init__(self, engine: Engine, monthly_budget: MonthlyBudget, clock=lambda: datetime.now(UTC)) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.monthly_budget = monthly_budget
        self.clock = clock

    async def GetUsageSummary(self, request: pb.GetUsageSummaryRequest, context) -> pb.GetUsageSummaryResponse:
        caller = caller_of(context)
        tenant = caller.scope(request.tenant)
        if request.group_by not in GROUP_BY:
            raise InvalidArgument(f"unknown group_by {request.group_by}", field="group_by")
        if request.granularity not in GRANULARITY:
            raise InvalidArgument(f"unknown granularity {request.granularity}", field="granularity")
        if request.group_by == pb.GROUP_BY_TENANT and not caller.admin:
            raise PermissionDenied("grouping by tenant needs the admin scope", field="group_by")
        now = self.clock()
        end = request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else now
        start = request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else end - DEFAULT_WINDOW
        if end <= start:
            raise InvalidArgument("end_time must be after start_time", field="end_time")

        def query() -> tuple[list[queries.SummaryLine], queries.MonthCost, float | None]:
            lines = queries.summarize(
                self.engine, start, end, tenant=tenant, group_by=GROUP_BY[request.group_by],
                granularity=GRANULARITY[request.granularity],
            )
            budget = self.monthly_budget(tenant) if tenant is not None else None
            return lines, queries.month_cost(self.engine, now, tenant=tenant), budget

        lines, month, budget = await asyncio.to_thread(query)
        return pb.GetUsageSummaryResponse(
            tenant=tenant or "", lines=[line_message(line) for line in lines],
            total_cost_usd=sum(line.cost_usd for line in lines),
            month_to_date_cost_usd=month.month_to_date_usd, projected_month_cost_usd=month.projected_usd,
            monthly_budget_usd=budget or 0.0,
        )

    async def ListUsageRecords(self, request: pb.ListUsageRecordsRequest, context) -> pb.ListUsageRecordsResponse:
        tenant = caller_of(context).scope(request.tenant)
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must be 1..{queries.MAX_PAGE_SIZE}", field="page_size")
        rows, token = await asyncio.to_thread(
            queries.list_records, self.engine, tenant=tenant, page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListUsageRecordsResponse(records=[record_message(row) for row in rows], next_page_token=token)


class UsageCapability:
    """UsageService as the runner hosts it (in the control server)."""

    models: Sequence = ()
    service_names: Sequence[str] = (pb.DESCRIPTOR.services_by_name["UsageService"].full_name,)

    def __init__(self, engine: Engine, monthly_budget: MonthlyBudget) -> None:
        self.servicer = UsageServicer(engine, monthly_budget)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_UsageServiceServicer_to_server(self.servicer, server)

    def load(self) -> None:
        """Nothing to load."""

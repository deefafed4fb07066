"""Usage and cost: `client.usage.summary(group_by="model", granularity="day")`,
`client.usage.records()`.

A tenant's token sees only its own usage; an admin token may name any tenant, or none
for everyone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime

from google.protobuf import timestamp_pb2

from ..usage.v1 import usage_pb2 as pb
from ..usage.v1 import usage_pb2_grpc as pb_grpc
from .transport import AsyncTransport, Transport

GroupBy = str | pb.GroupBy.ValueType  # "capability" | "model" | "pool" | "tenant" | pb.GROUP_BY_*
Granularity = str | pb.Granularity.ValueType  # "" | "hour" | "day" | "month" | pb.GRANULARITY_*


def _enum(value: str | int, prefix: str, enum: type, field: str) -> int:
    if not isinstance(value, str):
        return value
    if not value:
        return 0
    names = [n.removeprefix(prefix).lower() for n in enum.keys()[1:]]  # type: ignore[attr-defined]
    if value.lower() not in names:
        raise ValueError(f"{field} must be one of {', '.join(names)}, not {value!r}")
    return enum.Value(prefix + value.upper())  # type: ignore[attr-defined]


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:
        raise ValueError(f"give an aware datetime (e.g. tzinfo=UTC), not {value!r}")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def _summary(start: datetime | None, end: datetime | None, group_by: GroupBy,
             granularity: Granularity, tenant: str) -> pb.GetUsageSummaryRequest:
    request = pb.GetUsageSummaryRequest(
        group_by=_enum(group_by, "GROUP_BY_", pb.GroupBy, "group_by"),
        granularity=_enum(granularity, "GRANULARITY_", pb.Granularity, "granularity"),
        tenant=tenant)
    if start is not None:
        request.start_time.CopyFrom(_timestamp(start))
    if end is not None:
        request.end_time.CopyFrom(_timestamp(end))
    return request


class UsageClient:
    """Blocking usage queries."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = pb_grpc.UsageServiceStub(transport.channel)

    def summary(self, start: datetime | None = None, end: datetime | None = None, *,
                group_by: GroupBy = "model", granularity: Granularity = "", tenant: str = "",
                timeout: float | None = None) -> pb.GetUsageSummaryResponse:
        """Calls, units, errors, fallback rate, p50/p95 latency and cost per group and time
        bucket over [start, end) (default: the last 30 days), with the month-to-date cost
        and its month-end projection. group_by: "capability", "model", "pool" or "tenant"
        (admin); granularity: "" (one bucket), "hour", "day" or "month"."""
        request = _summary(start, end, group_by, granularity, tenant)
        return self._t.unary(self._stub.GetUsageSummary, request, timeout=timeout)

    def records(self, *, page_size: int = 100, page_token: str = "", tenant: str = "",
                timeout: float | None = None) -> pb.ListUsageRecordsResponse:
        """One page of usage records, newest first (`.records`, `.next_page_token`)."""
        request = pb.ListUsageRecordsRequest(page_size=page_size, page_token=page_token,
                                             tenant=tenant)
        return self._t.unary(self._stub.ListUsageRecords, request, timeout=timeout)

    def iter_records(self, *, page_size: int = 100, tenant: str = "",
                     timeout: float | None = None) -> Iterator[pb.UsageRecord]:
        """Every record, newest first, page after page (each page is one call)."""
        token = ""
        while True:
            page = self.records(page_size=page_size, page_token=token, tenant=tenant,
                                timeout=timeout)
            yield from page.records
            token = page.next_page_token
            if not token:
                return


class AsyncUsageClient:
    """Awaitable usage queries (same methods as UsageClient)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = pb_grpc.UsageServiceStub(transport.channel)

    async def summary(self, start: datetime | None = None, end: datetime | None = None, *,
                      group_by: GroupBy = "model", granularity: Granularity = "",
                      tenant: str = "", timeout: float | None = None
                      ) -> pb.GetUsageSummaryResponse:
        request = _summary(start, end, group_by, granularity, tenant)
        return await self._t.unary(self._stub.GetUsageSummary, request, timeout=timeout)

    async def records(self, *, page_size: int = 100, page_token: str = "", tenant: str = "",
                      timeout: float | None = None) -> pb.ListUsageRecordsResponse:
        request = pb.ListUsageRecordsRequest(page_size=page_size, page_token=page_token,
                                             tenant=tenant)
        return await self._t.unary(self._stub.ListUsageRecords, request, timeout=timeout)

    async def iter_records(self, *, page_size: int = 100, tenant: str = "",
                           timeout: float | None = None) -> AsyncIterator[pb.UsageRecord]:
        token = ""
        while True:
            page = await self.records(page_size=page_size, page_token=token, tenant=tenant,
                                      timeout=timeout)
            for record in page.records:
                yield record
            token = page.next_page_token
            if not token:
                return

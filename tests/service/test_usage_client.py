"""The SDK's usage client (`client.usage`) against the real UsageService on a real
in-process server and SQLite, with budgets from the real tenant store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aimesh
import grpc
import pytest
from aimesh.client.transport import AsyncTransport, Transport
from aimesh.client.usage import AsyncUsageClient, UsageClient
from aimesh_servers.tenancy.db import make_engine, migrate, sqlite_url
from aimesh_servers.tenancy.recorder import UsageRecorder, UsageRow
from aimesh_servers.tenancy.store import TenantStore
from aimesh_servers.tenancy.usage_servicer import UsageCapability

from tests.identity import AddHeaders, AddHeadersSync, identity
from tests.servers import in_process_server

START = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)


def call(tenant: str, minutes: float, pool: str = "primary", **fields: object) -> UsageRow:
    values: dict[str, object] = {
        "time": START + timedelta(minutes=minutes), "tenant": tenant, "capability": "text",
        "service": "aimesh.text.v1.TextGenerationService", "method": "Generate",
        "request_type": "unary", "requested_model": "chat", "served_model": "chat",
        "served_version": "1", "pool": pool, "unit": "tokens", "input_units": 10.0,
        "output_units": 5.0, "duration_ms": 20.0, "cost_usd": 0.25,
    }
    values.update(fields)
    return UsageRow(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def served(tmp_path_factory):
    engine = make_engine(sqlite_url(tmp_path_factory.mktemp("usage")))
    migrate(engine)
    store = TenantStore(engine)
    store.create_tenant("acme", monthly_budget_usd=40.0)
    store.create_tenant("zeta")
    rows = [call("acme", i, pool="primary" if i % 3 else "cloud", fell_back=not i % 3)
            for i in range(7)]
    rows += [call("acme", 70, status="RESOURCE_EXHAUSTED", reason="RATE_LIMITED", origin="edge",
                  input_units=0.0, output_units=0.0, cost_usd=0.0, pool="", served_model="")]
    rows += [call("zeta", 5, cost_usd=1.0)]
    with UsageRecorder(engine, rollup_interval_s=None) as recorder:
        for row in rows:
            recorder.submit(row)
    async with in_process_server([UsageCapability(engine, store.monthly_budget)]) as (server, _):
        yield server, engine
    engine.dispose()


def client_for(server, headers) -> tuple[grpc.aio.Channel, AsyncUsageClient]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                        interceptors=[AddHeaders(headers)])
    return channel, AsyncUsageClient(AsyncTransport(channel, None, 30))


async def test_a_tenant_reads_its_own_summary_by_pool_and_hour(served):
    server, _ = served
    channel, usage = client_for(server, identity("acme", "text"))
    try:
        summary = await usage.summary(START, START + timedelta(hours=3), group_by="pool",
                                      granularity="hour")
        assert summary.tenant == "acme" and summary.monthly_budget_usd == 40.0
        lines = {(line.bucket_start.ToDatetime(tzinfo=UTC), line.pool): line
                 for line in summary.lines}
        assert lines[(START, "primary")].calls == 4 and lines[(START, "cloud")].calls == 3
        assert lines[(START, "cloud")].fallback_rate == 1.0
        refused = lines[(START + timedelta(hours=1), "")]
        assert refused.calls == 1 and refused.failed_calls == 1 and refused.error_rate == 1.0
        assert summary.total_cost_usd == pytest.approx(7 * 0.25)

        with pytest.raises(aimesh.PermissionDeniedError) as caught:
            await usage.summary(tenant="zeta")
        assert caught.value.reason == "PERMISSION_DENIED"
        with pytest.raises(ValueError, match="group_by"):
            await usage.summary(group_by="color")
        with pytest.raises(ValueError, match="aware"):
            await usage.summary(datetime(2026, 1, 1))
    finally:
        await channel.close()


async def test_records_page_newest_first_and_an_admin_sees_everyone(served):
    server, _ = served
    channel, usage = client_for(server, identity("acme", "text"))
    try:
        page = await usage.records(page_size=3)
        assert len(page.records) == 3 and page.next_page_token
        assert page.records[0].origin == "edge" and page.records[0].reason == "RATE_LIMITED"
        every = [record async for record in usage.iter_records(page_size=3)]
        assert len(every) == 8 and {r.tenant for r in every} == {"acme"}
        times = [r.time.ToDatetime() for r in every]
        assert times == sorted(times, reverse=True)
    finally:
        await channel.close()

    def admin_records() -> list:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
            channel = grpc.intercept_channel(plain, AddHeadersSync(identity("ops", "admin")))
            client = UsageClient(Transport(channel, None, 30))
            return list(client.iter_records(page_size=4))

    records = await asyncio.to_thread(admin_records)
    assert len(records) == 9 and {r.tenant for r in records} == {"acme", "zeta"}

"""The usage store on SQLite and on a real PostgreSQL: migrations, the batched recorder
(drain on close, drops when full, loss bound when its process is killed), hourly
rollups, summary queries, and UsageService over a real in-process gRPC server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from aimesh.errors import from_rpc_error
from aimesh.usage.v1 import usage_pb2 as pb
from aimesh.usage.v1 import usage_pb2_grpc as pb_grpc
from aimesh_servers.tenancy import db
from aimesh_servers.tenancy import usage_queries as queries
from aimesh_servers.tenancy.recorder import UsageRecorder, UsageRow, rollup
from aimesh_servers.tenancy.usage_servicer import UsageCapability
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.servers import in_process_server

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0
NOW = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return db.sqlite_url(tmp_path)
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    db.migrate(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def count_records(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return connection.scalar(sa.select(sa.func.count()).select_from(db.usage_records))


def wait_for(check, what: str, timeout: float = DEADLINE_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def row(minutes_ago: float = 0, **fields: object) -> UsageRow:
    values: dict[str, object] = {
        "time": NOW - timedelta(minutes=minutes_ago), "tenant": "acme", "capability": "text",
        "service": "aimesh.text.v1.TextGenerationService", "method": "Generate", "request_type": "unary",
        "requested_model": "chat", "served_model": "chat", "served_version": "1", "pool": "primary",
        "unit": "tokens", "input_units": 10.0, "output_units": 5.0, "duration_ms": 20.0, "cost_usd": 0.5,
    }
    values.update(fields)
    return UsageRow(**values)  # type: ignore[arg-type]


def record_all(engine: sa.Engine, rows: list[UsageRow]) -> None:
    with UsageRecorder(engine, rollup_interval_s=None) as recorder:
        for item in rows:
            recorder.submit(item)


# --- migrations ------------------------------------------------------------------------


def test_migrated_schema_equals_the_metadata(url: str, engine: sa.Engine) -> None:
    db.migrate(url)  # a second upgrade is a no-op
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, db.metadata) == []
        assert set(sa.inspect(connection).get_table_names()) >= {
            "tenants", "tenant_limits", "tokens", "signing_keys", "tenancy_state", "usage_records", "usage_hourly",
        }
        assert connection.execute(sa.select(db.tenancy_state)).all() == [(1, 0)]


def test_control_planes_starting_together_migrate_once(url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            db.migrate(url)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert errors == []
    engine = db.make_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.select(db.tenancy_state)).all() == [(1, 0)]
    engine.dispose()


def test_times_come_back_aware_utc(engine: sa.Engine) -> None:
    local = datetime(2026, 3, 1, 1, 30, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    record_all(engine, [row(time=local)])
    with engine.connect() as connection:
        stored = connection.scalar(sa.select(db.usage_records.c.time))
    assert stored == datetime(2026, 3, 1, 1, 30, tzinfo=UTC) and stored.tzinfo == UTC


# --- recorder --------------------------------------------------------------------------


def test_recorder_writes_in_batches_and_close_drains_everything(engine: sa.Engine) -> None:
    # A batch interval far beyond the test: only full batches are written until close.
    recorder = UsageRecorder(engine, batch_size=100, batch_interval_s=600, rollup_interval_s=None)
    for i in range(1050):
        recorder.submit(row(request_id=f"r{i}"))
    wait_for(lambda: count_records(engine) == 1000, "ten full batches")
    assert recorder.written == 1000
    recorder.close()
    assert count_records(engine) == 1050 and recorder.dropped == 0
    # After close, a row is refused without blocking, and counted.
    recorder.submit(row())
    assert recorder.dropped == 1 and count_records(engine) == 1050


def test_flush_returns_once_earlier_rows_are_committed(engine: sa.Engine) -> None:
    with UsageRecorder(engine, batch_interval_s=600, rollup_interval_s=None) as recorder:
        for i in range(7):
            recorder.submit(row(request_id=f"r{i}"))
        assert recorder.flush()
        assert count_records(engine) == 7


def test_submit_never_blocks_and_counts_drops_while_the_database_is_locked(engine: sa.Engine) -> None:
    recorder = UsageRecorder(engine, batch_size=1, batch_interval_s=0.01, max_queue=5, rollup_interval_s=None)
    with engine.connect().execution_options(**{db.WRITE_LOCK_OPTION: True}) as locker:
        lock = locker.begin()  # SQLite: BEGIN IMMEDIATE takes the database's write lock
        if engine.dialect.name == "postgresql":
            locker.exec_driver_sql("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE")
        for i in range(20):
            recorder.submit(row(request_id=f"r{i}"))
        # The writer holds at most one row (its blocked batch) and the queue five.
        assert recorder.dropped >= 14
        lock.rollback()
    recorder.close()
    assert count_records(engine) == 20 - recorder.dropped


def test_a_bad_row_costs_only_itself(engine: sa.Engine) -> None:
    with UsageRecorder(engine, rollup_interval_s=None) as recorder:
        recorder.submit(row(request_id="before"))
        recorder.submit(row(request_id="naive", time=datetime(2026, 1, 1)))  # no time zone: refused
        recorder.submit(row(request_id="after"))
        assert recorder.flush()
        recorder.submit(row(request_id="later"))  # the writer lives on
    with engine.connect() as connection:
        stored = set(connection.scalars(sa.select(db.usage_records.c.request_id)))
    assert stored == {"before", "after", "later"} and recorder.dropped == 1


CRASH_WRITER = textwrap.dedent("""
    import sys, time
    from datetime import datetime, UTC
    from aimesh_servers.tenancy.db import make_engine
    from aimesh_servers.tenancy.recorder import UsageRecorder, UsageRow
    recorder = UsageRecorder(make_engine(sys.argv[1]), rollup_interval_s=None)
    seq = 0
    while True:  # ~200 calls a second, in small bursts, until killed
        for _ in range(10):
            recorder.submit(UsageRow(request_id=str(seq), time=datetime.now(UTC), tenant="acme"))
            print(seq, flush=True)
            seq += 1
        time.sleep(0.05)
""")


def test_a_killed_writer_loses_at_most_the_last_batch(url: str, engine: sa.Engine) -> None:
    batch_size = 500  # the recorder's default
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "servers"), str(ROOT / "sdk")])},
    )
    try:
        wait_for(lambda: proc.poll() is not None or count_records(engine) >= 600, "several batches written")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)
    printed = [int(line) for line in out.decode().split("\n")[:-1] if line.strip()]
    submitted = printed[-1] + 2  # the last submit may have happened without its print
    with engine.connect() as connection:
        written = sorted(int(r) for r in connection.scalars(sa.select(db.usage_records.c.request_id)))
    # What was committed is exactly the first rows, each once; what is lost is the tail.
    assert written == list(range(len(written)))
    lost = submitted - len(written)
    print(f"killed writer: {lost} of {submitted} rows lost")
    assert lost <= batch_size, f"{lost} rows lost of {submitted}"


# --- rollup ----------------------------------------------------------------------------


def varied_rows() -> list[UsageRow]:
    """Three days of calls across tenants, capabilities, models, pools and statuses."""
    rows = []
    for i in range(1500):
        rows.append(row(
            minutes_ago=i * 2.9,
            tenant=("acme", "beta", "gamma")[i % 3],
            capability=("text", "embedding")[i % 2],
            unit=("tokens", "items")[i % 2],
            served_model=("chat", "chat-small", "minilm")[i % 3],
            pool=("primary", "secondary")[(i // 7) % 2],
            status=("OK", "OK", "OK", "OK", "CANCELLED", "UNAVAILABLE", "OK")[i % 7],
            fell_back=i % 11 == 0,
            duration_ms=0.5 + (i * 37) % 3000,
            input_units=float(i % 13), output_units=float(i % 5), cost_usd=(i % 9) * 0.25,
        ))
    return rows


SUMMARY_CASES = [
    ("model", None, None), ("capability", "hour", "acme"), ("pool", "day", "beta"),
    ("tenant", "month", None), ("model", "day", None),
]


def summaries(engine: sa.Engine) -> list[list[queries.SummaryLine]]:
    start = queries.floor_hour(NOW) - timedelta(days=4)
    end = queries.floor_hour(NOW) + timedelta(hours=1)
    return [
        queries.summarize(engine, start, end, tenant=tenant, group_by=group_by, granularity=granularity)
        for group_by, granularity, tenant in SUMMARY_CASES
    ]


def assert_same(before: list[list[queries.SummaryLine]], after: list[list[queries.SummaryLine]]) -> None:
    for lines_before, lines_after in zip(before, after, strict=True):
        assert len(lines_before) == len(lines_after)
        for a, b in zip(lines_before, lines_after, strict=True):
            assert (a.bucket_start, a.tenant, a.capability, a.served_model, a.pool, a.unit) == (
                b.bucket_start, b.tenant, b.capability, b.served_model, b.pool, b.unit)
            assert (a.calls, a.failed_calls, a.fallbacks, a.latency_hist) == (
                b.calls, b.failed_calls, b.fallbacks, b.latency_hist)
            for name in ("input_units", "output_units", "cost_usd", "duration_ms_sum"):
                assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-9)


def test_rollup_keeps_summaries_identical_and_is_idempotent(engine: sa.Engine) -> None:
    record_all(engine, varied_rows())
    before = summaries(engine)
    assert sum(line.calls for line in before[0]) == 1500
    horizon = NOW - timedelta(days=1, minutes=17)
    # Two control planes rolling up at once count every record once.
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(rollup(engine, horizon))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert min(results) == 0 and sum(results) == 1500 - count_records(engine) > 0
    with engine.connect() as connection:
        oldest_raw = connection.scalar(sa.select(sa.func.min(db.usage_records.c.time)))
    assert oldest_raw >= queries.floor_hour(horizon)  # whole hours rolled up, the rest kept raw
    assert_same(before, summaries(engine))
    assert rollup(engine, horizon) == 0
    assert_same(before, summaries(engine))
    # A late record for an hour already rolled up is merged into that hour next time.
    record_all(engine, [row(minutes_ago=60 * 40, tenant="acme", duration_ms=7.0)])
    with_late = summaries(engine)
    assert rollup(engine, NOW) > 0
    assert_same(with_late, summaries(engine))
    assert sum(line.calls for line in summaries(engine)[0]) == 1501


# --- queries ---------------------------------------------------------------------------


def test_summary_groups_rates_and_percentiles(engine: sa.Engine) -> None:
    rows = [row(minutes_ago=i, duration_ms=float(i + 1), fell_back=i < 10,
                status="INTERNAL" if i < 5 else "CANCELLED" if i < 8 else "OK") for i in range(100)]
    rows += [row(minutes_ago=5, pool="secondary", served_model="chat", cost_usd=2.0),
             row(minutes_ago=5, capability="embedding", served_model="minilm", unit="items", tenant="beta"),
             row(minutes_ago=60 * 24 * 3, tenant="acme", cost_usd=1.0)]  # three days ago
    record_all(engine, rows)
    start, end = NOW - timedelta(hours=2), NOW + timedelta(minutes=1)

    by_model = queries.summarize(engine, start, end, tenant="acme", group_by="model")
    assert [(line.capability, line.served_model, line.calls) for line in by_model] == [("text", "chat", 101)]
    (line,) = by_model
    assert line.tenant == "acme" and line.bucket_start is None
    assert line.failed_calls == 5 and line.error_rate == pytest.approx(5 / 101)  # CANCELLED is not a failure
    assert line.fallback_rate == pytest.approx(10 / 101)
    assert line.cost_usd == pytest.approx(100 * 0.5 + 2.0) and line.input_units == 1010
    assert queries.latency_bucket_of(line.latency_p50_ms) == queries.latency_bucket_of(51.0)
    assert queries.latency_bucket_of(line.latency_p95_ms) == queries.latency_bucket_of(96.0)

    by_pool = queries.summarize(engine, start, end, tenant="acme", group_by="pool")
    assert [(line.pool, line.calls) for line in by_pool] == [("primary", 100), ("secondary", 1)]
    by_tenant = queries.summarize(engine, start, end, group_by="tenant")
    assert [(line.tenant, line.unit, line.calls) for line in by_tenant] == [
        ("acme", "tokens", 101), ("beta", "items", 1)]
    by_capability = queries.summarize(engine, start, end, group_by="capability")
    assert [(line.capability, line.calls) for line in by_capability] == [("embedding", 1), ("text", 101)]

    hourly = queries.summarize(engine, start, end, tenant="acme", granularity="hour")
    assert [(line.bucket_start, line.calls) for line in hourly] == [
        (datetime(2026, 11, 20, 10, tzinfo=UTC), 9), (datetime(2026, 11, 20, 11, tzinfo=UTC), 60),
        (datetime(2026, 11, 20, 12, tzinfo=UTC), 32)]
    daily = queries.summarize(engine, NOW - timedelta(days=5), end, tenant="acme", granularity="day")
    assert [(line.bucket_start.day, line.calls) for line in daily] == [(17, 1), (20, 101)]
    monthly = queries.summarize(engine, NOW - timedelta(days=30), end, tenant="acme", granularity="month")
    assert [(line.bucket_start, line.calls) for line in monthly] == [(datetime(2026, 11, 1, tzinfo=UTC), 102)]

    month = queries.month_cost(engine, NOW, tenant="acme")
    # Up to NOW, exclusive: the call that starts at NOW is not in yet.
    assert month.month_to_date_usd == pytest.approx(52.5)
    # The last 24 hours (from 12:00 the day before) cost 51.5 USD: the rest of the month at that rate.
    remaining_s = (datetime(2026, 12, 1, tzinfo=UTC) - NOW).total_seconds()
    rate_per_s = 51.5 / timedelta(hours=24, minutes=30).total_seconds()
    assert month.projected_usd == pytest.approx(52.5 + rate_per_s * remaining_s)

    with pytest.raises(Exception, match="end_time"):
        queries.summarize(engine, end, start)


def test_records_page_newest_first(engine: sa.Engine) -> None:
    rows = [row(minutes_ago=i // 2, request_id=f"r{i}") for i in range(25)]  # pairs share a time
    rows.append(row(tenant="beta", request_id="other"))
    record_all(engine, rows)
    seen, token = [], ""
    while True:
        page, token = queries.list_records(engine, tenant="acme", page_size=4, page_token=token)
        seen.extend(page)
        if not token:
            break
    assert len(seen) == 25 and len({r.id for r in seen}) == 25
    assert [(r.time, r.id) for r in seen] == sorted(((r.time, r.id) for r in seen), reverse=True)
    with pytest.raises(Exception, match="page_token"):
        queries.list_records(engine, page_token="not-a-token")


# --- UsageService ----------------------------------------------------------------------


def headers(tenant: str | None, scopes: str = "text") -> list[tuple[str, str]]:
    return [("x-aimesh-tenant", tenant), ("x-aimesh-scopes", scopes)] if tenant else []


async def test_usage_service_shows_each_tenant_only_its_own_usage(engine: sa.Engine) -> None:
    now = datetime.now(UTC)
    record_all(engine, [
        row(time=now - timedelta(minutes=1), tenant="acme", cost_usd=1.0, request_id="a1"),
        row(time=now - timedelta(minutes=2), tenant="acme", cost_usd=2.0, request_id="a2"),
        row(time=now - timedelta(minutes=3), tenant="beta", cost_usd=4.0, request_id="b1"),
    ])
    budgets = {"acme": 100.0}
    capability = UsageCapability(engine, budgets.get)
    async with in_process_server([capability]) as (_, channel):
        stub = pb_grpc.UsageServiceStub(channel)

        own = await stub.GetUsageSummary(pb.GetUsageSummaryRequest(), metadata=headers("acme"), timeout=30)
        assert own.tenant == "acme" and own.total_cost_usd == 3.0 and own.monthly_budget_usd == 100.0
        assert [(line.tenant, line.calls, line.service) for line in own.lines] == [
            ("acme", 2, "aimesh.text.v1.TextGenerationService")]
        assert own.month_to_date_cost_usd >= 0 and own.projected_month_cost_usd >= own.month_to_date_cost_usd
        records = await stub.ListUsageRecords(pb.ListUsageRecordsRequest(), metadata=headers("acme"), timeout=30)
        assert [r.request_id for r in records.records] == ["a1", "a2"]
        assert records.records[0].duration.ToMilliseconds() == 20 and records.records[0].tenant == "acme"

        everyone = await stub.GetUsageSummary(
            pb.GetUsageSummaryRequest(group_by=pb.GROUP_BY_TENANT), metadata=headers("ops", "admin"), timeout=30)
        assert everyone.tenant == "" and [(line.tenant, line.calls) for line in everyone.lines] == [
            ("acme", 2), ("beta", 1)]
        beta = await stub.ListUsageRecords(
            pb.ListUsageRecordsRequest(tenant="beta"), metadata=headers("ops", "text admin"), timeout=30)
        assert [r.request_id for r in beta.records] == ["b1"]

        async def refused(call, request, metadata):  # type: ignore[no-untyped-def]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request, metadata=metadata, timeout=30)
            return from_rpc_error(caught.value)

        error = await refused(stub.GetUsageSummary, pb.GetUsageSummaryRequest(tenant="beta"), headers("acme"))
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        error = await refused(stub.ListUsageRecords, pb.ListUsageRecordsRequest(tenant="beta"), headers("acme"))
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        error = await refused(
            stub.GetUsageSummary, pb.GetUsageSummaryRequest(group_by=pb.GROUP_BY_TENANT), headers("acme"))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        error = await refused(stub.GetUsageSummary, pb.GetUsageSummaryRequest(), headers(None))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        error = await refused(
            stub.ListUsageRecords, pb.ListUsageRecordsRequest(page_token="zzz"), headers("acme"))
        assert (error.code, error.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")
        error = await refused(
            stub.ListUsageRecords, pb.ListUsageRecordsRequest(page_size=5000), headers("acme"))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        start = pb.GetUsageSummaryRequest()
        start.start_time.FromDatetime(now)
        start.end_time.FromDatetime(now - timedelta(hours=1))
        error = await refused(stub.GetUsageSummary, start, headers("acme"))
        assert (error.code, error.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "end_time")

        # Paging through the service: newest first, every record once.
        first = await stub.ListUsageRecords(pb.ListUsageRecordsRequest(page_size=1), metadata=headers("acme"),
                                            timeout=30)
        second = await stub.ListUsageRecords(
            pb.ListUsageRecordsRequest(page_size=1, page_token=first.next_page_token), metadata=headers("acme"),
            timeout=30)
        assert [r.request_id for r in (*first.records, *second.records)] == ["a1", "a2"]
        assert second.next_page_token == ""

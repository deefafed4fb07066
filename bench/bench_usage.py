"""The usage store at a million records: a month summary over raw records against the
same summary after the hourly rollup, and the recorder's cost on the calling thread.

1. Bulk-inserts --rows records (default 1,000,000: a month of 20 tenants' calls) into
   SQLite, and into PostgreSQL with --postgres URL (or --start-postgres: a throwaway
   server, as the tests start one).
2. Times one tenant's month summary (by model, per day) over raw records (baseline),
   rolls everything up into hours, and times the same summary again; the two must agree.
3. Times `UsageRecorder.submit()` per call and its sustained rows/s to the database,
   against a synchronous insert per call on the caller's thread (baseline).

    .venv/bin/python bench/bench_usage.py [--rows N] [--quick] [--postgres URL | --start-postgres] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import common  # bench/common.py
import sqlalchemy as sa
from aimesh_servers.tenancy import db
from aimesh_servers.tenancy import usage_queries as queries
from aimesh_servers.tenancy.recorder import UsageRecorder, UsageRow, rollup

TENANTS = [f"tenant-{i:02d}" for i in range(20)]
# Zipf shares, as real tenants are: the biggest makes ~28% of the calls, the tenth ~3%.
TENANT_WEIGHTS = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(TENANTS))))
MEASURED = {"biggest tenant": TENANTS[0], "10th tenant": TENANTS[9]}
CAPABILITIES = [("text", "tokens", ("chat", "chat-small")), ("embedding", "items", ("minilm",)),
                ("image", "image_steps", ("tiny-sd",)), ("stt", "audio_seconds", ("whisper-base",))]
STATUSES = ["OK"] * 95 + ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL", "UNAUTHENTICATED"]
END = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
START = END - timedelta(days=30)
INSERT_CHUNK = 20_000


def make_rows(count: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """`count` records (usage_records columns) spread evenly over the month before END."""
    rng = random.Random(seed)
    step = (END - START) / count
    for i in range(count):
        capability, unit, models = CAPABILITIES[rng.randrange(len(CAPABILITIES))]
        model = models[rng.randrange(len(models))]
        duration = rng.lognormvariate(4.0, 1.0)
        yield {
            "request_id": f"req-{i}", "time": START + step * i, "tenant": rng.choices(TENANTS, cum_weights=TENANT_WEIGHTS)[0],
            "capability": capability, "service": f"aimesh.{capability}.v1.Service", "method": "Generate",
            "request_type": "unary", "requested_model": model, "served_model": model, "served_version": "1",
            "pool": "primary" if rng.random() < 0.9 else "secondary", "unit": unit,
            "input_units": float(rng.randint(1, 200)), "output_units": float(rng.randint(0, 200)),
            "duration_ms": duration, "ttft_ms": duration / 3, "status": STATUSES[rng.randrange(len(STATUSES))],
            "reason": "", "fell_back": rng.random() < 0.05, "cost_usd": rng.randint(0, 1000) * 1e-6,
            "trace_id": "", "origin": "server",
        }


def bulk_insert(engine: sa.Engine, count: int) -> float:
    """Rows/s of bulk insert (executemany in chunks, one transaction); generating the
    rows is not timed."""
    spent = 0.0
    rows = make_rows(count)
    with engine.begin() as connection:
        while chunk := list(itertools.islice(rows, INSERT_CHUNK)):
            started = time.perf_counter()
            connection.execute(db.usage_records.insert(), chunk)
            spent += time.perf_counter() - started
    return count / spent


def timed(action: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def totals(lines: list[queries.SummaryLine]) -> tuple[int, int, float]:
    return sum(line.calls for line in lines), sum(line.failed_calls for line in lines), round(
        sum(line.cost_usd for line in lines), 6)


def store_figures(name: str, url: str, rows: int, repeats: int) -> dict[str, Any]:
    db.migrate(url)
    engine = db.make_engine(url)
    try:
        print(f"[{name}] inserting {rows:,} records...", flush=True)
        insert_rate = bulk_insert(engine, rows)
        analyze(engine)

        raw = {label: timed(lambda t=tenant: summary(engine, t), repeats) for label, tenant in MEASURED.items()}
        rollup_started = time.perf_counter()
        rolled = rollup(engine, END)
        rollup_s = time.perf_counter() - rollup_started
        analyze(engine)
        hourly = {label: timed(lambda t=tenant: summary(engine, t), repeats) for label, tenant in MEASURED.items()}
        with engine.connect() as connection:
            hourly_rows = connection.scalar(sa.select(sa.func.count()).select_from(db.usage_hourly))
        figures: dict[str, Any] = {"records": rows, "insert_rows_per_s": insert_rate, "rollup_s": rollup_s,
                                   "rolled_up": rolled, "hourly_rows": hourly_rows, "tenants": {}}
        for label in MEASURED:
            (raw_s, raw_lines), (hourly_s, hourly_lines) = raw[label], hourly[label]
            figures["tenants"][label] = {
                "calls": totals(raw_lines)[0], "summary_raw_ms": raw_s * 1000,
                "summary_rolled_up_ms": hourly_s * 1000, "speedup": raw_s / hourly_s,
                "results_agree": agree(raw_lines, hourly_lines),
            }
        return figures
    finally:
        engine.dispose()


def analyze(engine: sa.Engine) -> None:
    """Fresh planner statistics after a bulk change, as autovacuum would soon make them."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE usage_records")
            connection.exec_driver_sql("VACUUM ANALYZE usage_hourly")


def summary(engine: sa.Engine, tenant: str) -> list[queries.SummaryLine]:
    """The measured query: one tenant's month, by model, per day."""
    return queries.summarize(engine, START, END, tenant=tenant, group_by="model", granularity="day")


def agree(first: list[queries.SummaryLine], second: list[queries.SummaryLine]) -> bool:
    """Same lines, counts and histograms; sums equal but for float rounding."""
    def exact(line: queries.SummaryLine) -> tuple[Any, ...]:
        return (line.bucket_start, line.served_model, line.unit, line.calls, line.failed_calls, line.fallbacks,
                line.latency_hist)

    return len(first) == len(second) and all(
        exact(a) == exact(b) and all(math.isclose(getattr(a, name), getattr(b, name), rel_tol=1e-9)
                                     for name in ("input_units", "output_units", "cost_usd", "duration_ms_sum"))
        for a, b in zip(first, second, strict=True))


def recorder_figures(rows: int) -> dict[str, Any]:
    """submit() cost and sustained rows/s, against a synchronous insert per call."""
    workdir = Path(tempfile.mkdtemp(prefix="aimesh-bench-usage-"))
    url = db.sqlite_url(workdir)
    db.migrate(url)
    engine = db.make_engine(url)
    items = [UsageRow(**item) for item in make_rows(rows, seed=1)]
    try:
        recorder = UsageRecorder(engine, max_queue=rows + 1, rollup_interval_s=None)
        started = time.perf_counter()
        for item in items:
            recorder.submit(item)
        submit_s = time.perf_counter() - started
        recorder.flush(timeout_s=600)
        drained_s = time.perf_counter() - started
        recorder.close()
        direct = items[: max(200, rows // 100)]
        started = time.perf_counter()
        for item in direct:
            with engine.begin() as connection:
                connection.execute(db.usage_records.insert(), dict(vars(item)))
        direct_us = (time.perf_counter() - started) / len(direct) * 1e6
        submit_us = submit_s / rows * 1e6
        return {
            "rows": rows, "submit_us_per_call": submit_us, "sustained_rows_per_s": rows / drained_s,
            "dropped": recorder.dropped, "direct_insert_us_per_call": direct_us,
            "submit_vs_direct": direct_us / submit_us,
        }
    finally:
        engine.dispose()


@contextlib.contextmanager
def postgres(args: argparse.Namespace) -> Iterator[str | None]:
    if args.postgres:
        yield args.postgres
        return
    if not args.start_postgres:
        yield None
        return
    sys.path.insert(0, str(common.ROOT))
    from tests.infra import PostgresServer, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        sys.exit("--start-postgres: PostgreSQL is not installed")
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server.create_database("bench_usage")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 records, 50,000 submits")
    parser.add_argument("--postgres", metavar="URL", help="also measure this (empty) PostgreSQL database")
    parser.add_argument("--start-postgres", action="store_true", help="also measure a throwaway PostgreSQL")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = 100_000 if args.quick else args.rows
    submits = 50_000 if args.quick else 200_000

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="aimesh-bench-usage-") as workdir:
        results["sqlite"] = store_figures("sqlite", db.sqlite_url(workdir), rows, args.repeats)
    with postgres(args) as url:
        if url:
            results["postgresql"] = store_figures("postgresql", url, rows, args.repeats)
    print(f"[recorder] {submits:,} submits...", flush=True)
    results["recorder"] = recorder_figures(submits)

    print(f"\nmonth summary of one tenant (of {len(TENANTS)}, Zipf shares), by model per day, over {rows:,} records")
    for name in ("sqlite", "postgresql"):
        if name in results:
            r = results[name]
            print(f"{name}: bulk insert {r['insert_rows_per_s']:,.0f} rows/s; rollup {r['rollup_s']:.1f} s "
                  f"-> {r['hourly_rows']:,} hourly rows")
            print(f"  {'tenant':<16}{'calls':>9}{'raw ms':>10}{'rolled-up ms':>14}{'speedup':>9}{'agree':>7}")
            for label, t in r["tenants"].items():
                print(f"  {label:<16}{t['calls']:>9,}{t['summary_raw_ms']:>10.1f}{t['summary_rolled_up_ms']:>14.1f}"
                      f"{t['speedup']:>8.1f}x{'yes' if t['results_agree'] else 'NO':>7}")
    r = results["recorder"]
    print(f"\nrecorder (SQLite): submit() {r['submit_us_per_call']:.2f} us/call vs synchronous insert "
          f"{r['direct_insert_us_per_call']:.0f} us/call ({r['submit_vs_direct']:.0f}x less on the caller's "
          f"thread); sustained {r['sustained_rows_per_s']:,.0f} rows/s; dropped {r['dropped']}")

    goals = [
        common.Goal(f"{name}: biggest tenant's month summary, raw / rolled up", t["speedup"], ">= 5x",
                    t["speedup"] >= 5 and t["results_agree"],
                    f"{t['summary_rolled_up_ms']:.1f} ms vs {t['summary_raw_ms']:.0f} ms")
        for name in ("sqlite", "postgresql") if name in results
        for t in [results[name]["tenants"]["biggest tenant"]]
    ]
    goals.append(common.Goal("recorder submit() on the caller's thread", r["submit_us_per_call"], "<= 20 us",
                             r["submit_us_per_call"] <= 20 and r["dropped"] == 0))
    common.report("usage", args.json, goals, results)


if __name__ == "__main__":
    main()

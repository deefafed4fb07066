"""Usage records written off the hot path: a bounded queue, one writer thread, batches.

``submit(row)`` never blocks: it puts the row on an in-memory queue of at most
``max_queue`` rows (100,000 by default, ~3 minutes of a busy mesh's calls) and, when
that is full, drops the row, counts it in ``dropped`` and logs (at most every 10 s).
The writer thread inserts what has queued every ``batch_interval_s`` (0.5 s) or as soon
as ``batch_size`` (500) rows wait, one transaction per batch.

Durability: ``flush()`` returns once every row submitted before it is committed;
``close()`` drains the queue, so nothing is lost on a clean shutdown. On a crash (the
process killed), what was not yet committed is lost: the rows submitted during the last
batch interval, plus the batch being written (at most ``batch_size`` rows when the
database keeps up). tests/unit/test_usage_store.py kills a real writer to check it.

Rollup: a second thread calls ``rollup(now - raw_retention)`` every
``rollup_interval_s`` (5 minutes; raw records are kept 7 days by default): raw records older than the horizon become ``usage_hourly`` rows
(summed and merged into any row already there for the hour) and are deleted, in one
transaction, so queries over long windows read hours instead of calls.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .db import ROLLUP_LOCK, WRITE_LOCK_OPTION, usage_hourly, usage_records
from .usage_queries import (
    LATENCY_BUCKETS,
    RAW_LATENCY_BUCKET,
    encode_histogram,
    failed,
    floor_hour,
    merge_histograms,
    parse_time_key,
    time_key,
)

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 10.0
CLOSE_TIMEOUT_S = 60.0


@dataclass(kw_only=True)
class UsageRow:
    """One call, as stored in ``usage_records`` (every column but the id)."""

    request_id: str = ""
    time: datetime  # when the call started, aware
    tenant: str
    capability: str = ""
    service: str = ""
    method: str = ""
    request_type: str = ""
    requested_model: str = ""
    served_model: str = ""
    served_version: str = ""
    pool: str = ""
    unit: str = ""
    input_units: float = 0.0
    output_units: float = 0.0
    duration_ms: float = 0.0
    ttft_ms: float | None = None
    status: str = "OK"  # gRPC code name
    reason: str = ""
    fell_back: bool = False
    cost_usd: float = 0.0
    trace_id: str = ""
    origin: str = "server"  # "server" | "cache" (a response-cache hit) | "edge"


@dataclass
class _Flush:
    """A marker: set once every row queued before it is committed."""

    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class UsageRecorder:
    """Writes submitted UsageRows in batches on its own thread; rolls old ones up into
    hours on another (``rollup_interval_s=None``: no periodic rollup)."""

    def __init__(
        self,
        engine: Engine,
        *,
        batch_size: int = 500,
        batch_interval_s: float = 0.5,
        max_queue: int = 100_000,
        rollup_interval_s: float | None = 300.0,
        raw_retention: timedelta = timedelta(days=7),
    ) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.raw_retention = raw_retention
        self.written = 0
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._last_drop_log = 0.0
        self._drop_lock = threading.Lock()
        self._stop_rollups = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)
        self._writer.start()
        self._roller: threading.Thread | None = None
        if rollup_interval_s:
            self._roller = threading.Thread(
                target=self._rollup_loop, args=(rollup_interval_s,), name="usage-rollup", daemon=True
            )
            self._roller.start()

    def submit(self, row: UsageRow) -> None:
        """Queues a row for writing; never blocks (a full queue drops it, counted)."""
        if self._closed:
            self._drop("recorder closed")
            return
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._drop(f"queue full ({self._queue.maxsize} rows)")

    def _drop(self, why: str) -> None:
        with self._drop_lock:
            self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("usage record dropped: %s; %d dropped so far", why, self.dropped)

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Waits until every row submitted before this call is committed; False on timeout."""
        marker = _Flush()
        try:
            self._queue.put(marker, timeout=timeout_s)
        except queue.Full:
            return False
        return marker.done.wait(timeout_s)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Writes every row submitted so far, then stops the threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_rollups.set()
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.error("usage writer stuck: %d records not written", self._queue.qsize())
        self._writer.join(timeout_s)
        if self._roller is not None:
            self._roller.join(timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rollup(self, before: datetime) -> int:
        return rollup(self.engine, before)

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch: list[UsageRow] = []
            flushes: list[_Flush] = []
            deadline = time.monotonic() + self.batch_interval_s
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                if isinstance(item, _Flush):
                    flushes.append(item)
                    break
                batch.append(item)
            if stopping:  # drain what came before the stop marker
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, _Flush):
                        flushes.append(item)
                    elif item is not _STOP:
                        batch.append(item)
            if batch:
                self._insert(batch, give_up=stopping)
            for marker in flushes:
                marker.done.set()

    def _insert(self, batch: list[UsageRow], *, give_up: bool) -> None:
        """Inserts one batch in one transaction. While the database is unreachable or
        locked it retries (new rows queue meanwhile, bounded; at close it gives up after a
        few tries and logs the loss). A batch the database refuses for its content is
        written row by row, so one bad row costs only itself."""
        rows = [dict(vars(row)) for row in batch]  # shallow: asdict's deep copy costs ~10x more
        delay = 0.1
        for attempt in range(1, 1_000_000):
            try:
                with self.engine.begin() as connection:
                    connection.execute(usage_records.insert(), rows)
                self.written += len(rows)
                return
            except (sa.exc.OperationalError, sa.exc.InterfaceError):
                log.exception("writing %d usage records failed (attempt %d)", len(rows), attempt)
                if give_up and attempt >= 3:
                    log.error("usage writer closing: %d records lost", len(rows))
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("a batch of %d usage records was refused; writing them one by one", len(rows))
                self._insert_one_by_one(rows)
                return

    def _insert_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                with self.engine.begin() as connection:
                    connection.execute(usage_records.insert(), row)
                self.written += 1
            except (sa.exc.StatementError, ValueError, TypeError) as exc:
                self._drop(f"refused by the database: {exc}")

    def _rollup_loop(self, interval_s: float) -> None:
        while not self._stop_rollups.wait(interval_s):
            try:
                rollup(self.engine, datetime.now(UTC) - self.raw_retention)
            except Exception:  # the thread must outlive a failed rollup
                log.exception("usage rollup failed; will retry")


def rollup(engine: Engine, before: datetime) -> int:
    """Moves raw records of the hours before ``before`` (floored to the hour) into
    ``usage_hourly``, in one transaction; returns how many records it rolled up.

    Idempotent and safe with several control planes on one database: the transaction
    holds the write lock (SQLite) or an advisory lock (PostgreSQL) from its start, so
    two rollups never count the same records. Records that arrive late for an hour
    already rolled up are merged into its row by the next rollup.
    """
    horizon = floor_hour(before)
    dialect = engine.dialect.name
    raw = usage_records.c
    hour = time_key(raw.time, "hour", dialect)
    lat = RAW_LATENCY_BUCKET
    keys = (raw.tenant, raw.capability, raw.served_model, raw.pool, raw.unit)
    aggregate = (
        sa.select(
            hour, *keys, lat, sa.func.count(), sa.func.sum(failed(raw.status)),
            sa.func.sum(sa.case((raw.fell_back, 1), else_=0)), sa.func.sum(raw.input_units),
            sa.func.sum(raw.output_units), sa.func.sum(raw.cost_usd), sa.func.sum(raw.duration_ms),
        )
        .where(raw.time < horizon)
        .group_by(hour, *keys, lat)
    )
    with engine.connect().execution_options(**{WRITE_LOCK_OPTION: True}) as connection, connection.begin():
        if dialect == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(ROLLUP_LOCK)))
        sums: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row in connection.execute(aggregate):
            key = (parse_time_key(row[0], "hour"), *row[1:6])
            lat_index, calls, errors, fallbacks, inputs, outputs, cost, duration = row[6:]
            entry = sums.setdefault(key, _empty_hour())
            _accumulate(entry, calls, errors, fallbacks, inputs, outputs, cost, duration)
            entry["hist"][lat_index] += calls
        if not sums:
            return 0
        hours = [key[0] for key in sums]
        existing = connection.execute(
            sa.select(usage_hourly).where(usage_hourly.c.hour >= min(hours), usage_hourly.c.hour <= max(hours))
        )
        updates = []
        for old in existing:
            key = (old.hour, old.tenant, old.capability, old.served_model, old.pool, old.unit)
            entry = sums.pop(key, None)
            if entry is None:
                continue
            _accumulate(entry, old.calls, old.errors, old.fallbacks, old.input_units, old.output_units,
                        old.cost_usd, old.duration_ms_sum)
            merge_histograms(entry["hist"], json.loads(old.latency_hist))
            updates.append(_hourly_values(key, entry, bind_keys=True))
        if updates:
            columns = usage_hourly.c
            connection.execute(
                usage_hourly.update()
                .where(columns.hour == sa.bindparam("k_hour"), columns.tenant == sa.bindparam("k_tenant"),
                       columns.capability == sa.bindparam("k_capability"),
                       columns.served_model == sa.bindparam("k_served_model"),
                       columns.pool == sa.bindparam("k_pool"), columns.unit == sa.bindparam("k_unit"))
                .values({name: sa.bindparam("v_" + name) for name in _SUM_COLUMNS}),
                updates,
            )
        if sums:
            connection.execute(usage_hourly.insert(), [_hourly_values(key, entry) for key, entry in sums.items()])
        deleted = connection.execute(usage_records.delete().where(raw.time < horizon)).rowcount
    log.info("rolled up %d usage records before %s", deleted, horizon.isoformat())
    return deleted


_SUM_COLUMNS = ("calls", "errors", "fallbacks", "input_units", "output_units", "cost_usd", "duration_ms_sum",
                "latency_hist")
_KEY_COLUMNS = ("hour", "tenant", "capability", "served_model", "pool", "unit")


def _empty_hour() -> dict[str, Any]:
    return {"calls": 0, "errors": 0, "fallbacks": 0, "input_units": 0.0, "output_units": 0.0,
            "cost_usd": 0.0, "duration_ms_sum": 0.0, "hist": [0] * LATENCY_BUCKETS}


def _accumulate(entry: dict[str, Any], calls: int, errors: int, fallbacks: int, inputs: float,
                outputs: float, cost: float, duration: float) -> None:
    entry["calls"] += int(calls)
    entry["errors"] += int(errors)
    entry["fallbacks"] += int(fallbacks)
    entry["input_units"] += float(inputs or 0.0)
    entry["output_units"] += float(outputs or 0.0)
    entry["cost_usd"] += float(cost or 0.0)
    entry["duration_ms_sum"] += float(duration or 0.0)


def _hourly_values(key: tuple[Any, ...], entry: dict[str, Any], *, bind_keys: bool = False) -> dict[str, Any]:
    """Column values of an hourly row; with bind_keys, named for the UPDATE's parameters."""
    sums = {name: entry[name] for name in _SUM_COLUMNS if name != "latency_hist"}
    sums["latency_hist"] = encode_histogram(entry["hist"])
    keys = dict(zip(_KEY_COLUMNS, key, strict=True))
    if not bind_keys:
        return {**keys, **sums}
    return {**{"k_" + k: v for k, v in keys.items()}, **{"v_" + k: v for k, v in sums.items()}}

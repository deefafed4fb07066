"""Usage summaries, month cost and projection, and record listing, over raw records
(``usage_records``) and hourly rollups (``usage_hourly``) together.

Latency percentiles come from one fixed histogram (``LATENCY_BOUNDS_MS``, log-spaced,
2^(1/4) apart: within ~9% of the true value). Raw records are bucketed in SQL by the
same expression the rollup uses, so a summary gives the same p50/p95 before and after
its records are rolled up. Rolled-up usage has hour resolution: an hourly row counts
in a window when its hour starts inside [start, end).

Time buckets are computed in SQL as text keys ("YYYY-MM-DD HH", "YYYY-MM-DD",
"YYYY-MM"), identical on SQLite (which stores times as UTC text) and PostgreSQL
(sessions in UTC), so one GROUP BY does the work on either.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import functools
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..runtime.errors import InvalidArgument
from .db import usage_hourly, usage_records

# Bucket 0: [0, 1 ms); bucket i: [bounds[i-1], bounds[i]); the last: >= 2^20 ms (~17 min).
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(2 ** (i / 4) for i in range(81))
LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1

# Not failures: a call that succeeded, or one its caller cancelled (left a stream early).
NOT_FAILED_STATUSES = ("OK", "CANCELLED")

GROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "capability": ("capability",),
    "model": ("capability", "served_model"),
    "pool": ("capability", "served_model", "pool"),
    "tenant": ("tenant",),
}
GRANULARITIES = ("hour", "day", "month")
_KEY_LENGTH = {"hour": 13, "day": 10, "month": 7}  # of "YYYY-MM-DD HH:MM:SS..."
_PG_KEY_FORMAT = {"hour": "YYYY-MM-DD HH24", "day": "YYYY-MM-DD", "month": "YYYY-MM"}
_KEY_PARSE = {"hour": "%Y-%m-%d %H", "day": "%Y-%m-%d", "month": "%Y-%m"}

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def latency_bucket(column: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    """SQL for the histogram bucket of a duration in ms: a binary search of CASEs
    (7 comparisons a row), the same on every dialect."""

    def search(low: int, high: int) -> sa.ColumnElement[int]:
        if low == high:
            return sa.literal_column(str(low), sa.Integer)
        middle = (low + high + 1) // 2  # bucket >= middle  <=>  duration >= bounds[middle - 1]
        return sa.case(
            (column < sa.literal_column(repr(LATENCY_BOUNDS_MS[middle - 1]), sa.Float), search(low, middle - 1)),
            else_=search(middle, high),
        )

    return search(0, LATENCY_BUCKETS - 1)


def latency_bucket_of(duration_ms: float) -> int:
    """The bucket of one duration, as latency_bucket computes it in SQL."""
    for index, bound in enumerate(LATENCY_BOUNDS_MS):
        if duration_ms < bound:
            return index
    return LATENCY_BUCKETS - 1


def percentile_ms(histogram: Sequence[int], quantile: float) -> float | None:
    """The quantile of a histogram, as its bucket's geometric middle (None if empty)."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = max(1, math.ceil(quantile * total))
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            if index == 0:
                return LATENCY_BOUNDS_MS[0] / 2
            if index >= len(LATENCY_BOUNDS_MS):
                return LATENCY_BOUNDS_MS[-1]
            return math.sqrt(LATENCY_BOUNDS_MS[index - 1] * LATENCY_BOUNDS_MS[index])
    return LATENCY_BOUNDS_MS[-1]


def merge_histograms(into: list[int], other: Sequence[int]) -> None:
    """Adds other (which may be shorter: stored histograms drop trailing zeros) into into."""
    into[: len(other)] = map(operator.add, into, other)


def encode_histogram(histogram: Sequence[int]) -> str:
    """The JSON list stored in usage_hourly.latency_hist, without trailing zeros."""
    end = len(histogram)
    while end and not histogram[end - 1]:
        end -= 1
    return json.dumps(list(histogram[:end]), separators=(",", ":"))


# Built once: the nested CASE is large, and SQLAlchemy caches statements by structure.
RAW_LATENCY_BUCKET = latency_bucket(usage_records.c.duration_ms)


def failed(status: sa.ColumnElement[str]) -> sa.ColumnElement[int]:
    return sa.case((status.in_(NOT_FAILED_STATUSES), 0), else_=1)


def time_key(column: sa.ColumnElement[Any], granularity: str, dialect: str) -> sa.ColumnElement[str]:
    """A text key of the UTC hour/day/month a time falls in."""
    if dialect == "sqlite":
        return sa.func.substr(sa.type_coerce(column, sa.Text), 1, _KEY_LENGTH[granularity])
    return sa.func.to_char(sa.func.timezone("UTC", column), _PG_KEY_FORMAT[granularity], type_=sa.Text)


@functools.lru_cache(maxsize=4096)
def parse_time_key(key: str, granularity: str) -> datetime:
    return datetime.strptime(key, _KEY_PARSE[granularity]).replace(tzinfo=UTC)


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(moment: datetime) -> datetime:
    start = month_start(moment)
    return start + timedelta(days=calendar.monthrange(start.year, start.month)[1])


@dataclass
class SummaryLine:
    """Sums over one group and time bucket."""

    bucket_start: datetime | None
    tenant: str = ""
    capability: str = ""
    served_model: str = ""
    pool: str = ""
    unit: str = ""
    calls: int = 0
    failed_calls: int = 0
    fallbacks: int = 0
    input_units: float = 0.0
    output_units: float = 0.0
    cost_usd: float = 0.0
    duration_ms_sum: float = 0.0
    latency_hist: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)

    @property
    def error_rate(self) -> float:
        return self.failed_calls / self.calls if self.calls else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.calls if self.calls else 0.0

    @property
    def latency_p50_ms(self) -> float | None:
        return percentile_ms(self.latency_hist, 0.50)

    @property
    def latency_p95_ms(self) -> float | None:
        return percentile_ms(self.latency_hist, 0.95)


def _check_window(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("summary windows take aware UTC datetimes")
    if end <= start:
        raise InvalidArgument("end_time must be after start_time", field="end_time")


def summarize(
    engine: Engine,
    start: datetime,
    end: datetime,
    *,
    tenant: str | None = None,
    group_by: str = "model",
    granularity: str | None = None,
) -> list[SummaryLine]:
    """Usage in [start, end) of one tenant (None: all), one line per group, unit and
    time bucket (granularity None: one bucket), ordered by bucket then group."""
    _check_window(start, end)
    if group_by not in GROUP_COLUMNS:
        raise ValueError(f"group_by must be one of {sorted(GROUP_COLUMNS)}")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES} or None")
    names = (*GROUP_COLUMNS[group_by], "unit")
    dialect = engine.dialect.name
    lines: dict[tuple[Any, ...], SummaryLine] = {}

    def line_for(bucket: str | None, values: Sequence[str]) -> SummaryLine:
        key = (bucket, *values)
        line = lines.get(key)
        if line is None:
            line = SummaryLine(bucket_start=parse_time_key(bucket, granularity) if bucket else None,
                               **dict(zip(names, values, strict=True)))
            if tenant is not None:
                line.tenant = tenant
            lines[key] = line
        return line

    raw = usage_records.c
    raw_bucket = time_key(raw.time, granularity, dialect) if granularity else sa.null()
    raw_groups = [raw[name] for name in names]
    lat = RAW_LATENCY_BUCKET
    raw_query = (
        sa.select(
            raw_bucket, *raw_groups, lat, sa.func.count(), sa.func.sum(failed(raw.status)),
            sa.func.sum(sa.case((raw.fell_back, 1), else_=0)), sa.func.sum(raw.input_units),
            sa.func.sum(raw.output_units), sa.func.sum(raw.cost_usd), sa.func.sum(raw.duration_ms),
        )
        .where(raw.time >= start, raw.time < end)
        .group_by(*([raw_bucket] if granularity else []), *raw_groups, lat)
    )
    hourly = usage_hourly.c
    hourly_bucket = time_key(hourly.hour, granularity, dialect) if granularity else sa.null()
    hourly_groups = [hourly[name] for name in names]
    hourly_query = sa.select(
        hourly_bucket, *hourly_groups, hourly.calls, hourly.errors, hourly.fallbacks, hourly.input_units,
        hourly.output_units, hourly.cost_usd, hourly.duration_ms_sum, hourly.latency_hist,
    ).where(hourly.hour >= start, hourly.hour < end)
    if tenant is not None:
        raw_query = raw_query.where(raw.tenant == tenant)
        hourly_query = hourly_query.where(hourly.tenant == tenant)

    width = len(names)
    stored_histograms: dict[int, list[str]] = {}  # id(line) -> its hourly rows' JSON histograms
    with engine.connect() as connection:
        for row in connection.execute(raw_query):
            bucket, values = row[0], row[1:1 + width]
            lat_index, calls, errors, fallbacks, inputs, outputs, cost, duration = row[1 + width:]
            line = line_for(bucket, values)
            _add(line, calls, errors, fallbacks, inputs, outputs, cost, duration)
            line.latency_hist[lat_index] += calls
        for row in connection.execute(hourly_query):
            bucket, values = row[0], row[1:1 + width]
            calls, errors, fallbacks, inputs, outputs, cost, duration, histogram = row[1 + width:]
            line = line_for(bucket, values)
            _add(line, calls, errors, fallbacks, inputs, outputs, cost, duration)
            stored_histograms.setdefault(id(line), []).append(histogram)
    for line in lines.values():
        if texts := stored_histograms.get(id(line)):
            # One parse per line, not per hourly row: it is most of the cost of a rolled-up query.
            for histogram in json.loads("[" + ",".join(texts) + "]"):
                merge_histograms(line.latency_hist, histogram)
    return [lines[key] for key in sorted(lines, key=lambda k: tuple("" if v is None else v for v in k))]


def _add(line: SummaryLine, calls: int, errors: int, fallbacks: int, inputs: float, outputs: float,
         cost: float, duration: float) -> None:
    line.calls += int(calls)
    line.failed_calls += int(errors)
    line.fallbacks += int(fallbacks)
    line.input_units += float(inputs or 0.0)
    line.output_units += float(outputs or 0.0)
    line.cost_usd += float(cost or 0.0)
    line.duration_ms_sum += float(duration or 0.0)


def total_cost(engine: Engine, start: datetime, end: datetime, *, tenant: str | None = None) -> float:
    """Cost in [start, end) (rolled-up hours count when they start inside)."""
    raw, hourly = usage_records.c, usage_hourly.c
    raw_query = sa.select(sa.func.coalesce(sa.func.sum(raw.cost_usd), 0.0)).where(raw.time >= start, raw.time < end)
    hourly_query = sa.select(sa.func.coalesce(sa.func.sum(hourly.cost_usd), 0.0)).where(
        hourly.hour >= start, hourly.hour < end
    )
    if tenant is not None:
        raw_query = raw_query.where(raw.tenant == tenant)
        hourly_query = hourly_query.where(hourly.tenant == tenant)
    with engine.connect() as connection:
        return float(connection.scalar(raw_query)) + float(connection.scalar(hourly_query))


@dataclass(frozen=True)
class MonthCost:
    month_to_date_usd: float
    projected_usd: float  # month-end cost if the rate of the last 24 hours holds


def month_cost(engine: Engine, now: datetime, *, tenant: str | None = None) -> MonthCost:
    """Cost so far this UTC month, and its projection to the month's end at the rate of
    the last 24 hours (from the start of the hour 24 hours ago, as rollups are hourly)."""
    start = month_start(now)
    so_far = total_cost(engine, start, now, tenant=tenant)
    rate_start = floor_hour(now) - timedelta(hours=24)
    rate_per_s = total_cost(engine, rate_start, now, tenant=tenant) / (now - rate_start).total_seconds()
    remaining_s = (next_month_start(now) - now).total_seconds()
    return MonthCost(month_to_date_usd=so_far, projected_usd=so_far + rate_per_s * remaining_s)


def _encode_token(time: datetime, record_id: int) -> str:
    payload = json.dumps([time.isoformat(), record_id]).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, int]:
    try:
        payload = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        iso, record_id = json.loads(payload)
        moment = datetime.fromisoformat(iso)
        if moment.tzinfo is None or not isinstance(record_id, int):
            raise ValueError("bad token fields")
        return moment, record_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token is not one this service issued", field="page_token") from exc


def list_records(
    engine: Engine, *, tenant: str | None = None, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
) -> tuple[list[sa.Row[Any]], str]:
    """Raw records, newest first (time, then id), one page; and the next page's token
    ("" at the end). Records already rolled up into hours are no longer listed."""
    if page_size == 0:
        page_size = DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be 1..{MAX_PAGE_SIZE}", field="page_size")
    columns = usage_records.c
    query = sa.select(usage_records).order_by(columns.time.desc(), columns.id.desc()).limit(page_size + 1)
    if tenant is not None:
        query = query.where(columns.tenant == tenant)
    if page_token:
        after_time, after_id = _decode_token(page_token)
        query = query.where(
            sa.or_(columns.time < after_time, sa.and_(columns.time == after_time, columns.id < after_id))
        )
    with engine.connect() as connection:
        rows = list(connection.execute(query))
    if len(rows) <= page_size:
        return rows, ""
    rows = rows[:page_size]
    return rows, _encode_token(rows[-1].time, rows[-1].id)

"""The tenancy database: engine, schema and migrations.

SQLite by default (one file, WAL), PostgreSQL in production (psycopg 3); the same
schema on both, created and upgraded only by the Alembic migrations in
``migrations/`` (``migrate(url)`` at start). SQLAlchemy Core, synchronous: async
callers run it in threads.

Every time is a timezone-aware UTC ``datetime`` in Python. SQLite has no time zone
type, so ``UtcDateTime`` stores UTC there and hands back aware values on both.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Execution option: on SQLite, begin the transaction with the database's write lock
# (BEGIN IMMEDIATE), so a read-then-write transaction cannot race another writer.
WRITE_LOCK_OPTION = "aimesh_write_lock"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class UtcDateTime(sa.TypeDecorator[dt.datetime]):
    """timestamptz that takes and returns aware UTC datetimes on every dialect."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: aimesh stores aware UTC times")
        value = value.astimezone(dt.UTC)
        # SQLite keeps text; stripping the zone keeps every value in one sortable format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


metadata = sa.MetaData()

tenants = sa.Table(
    "tenants", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("plan", sa.Text, nullable=False),
    # NULL: the plan's budget.
    sa.Column("monthly_budget_usd", sa.Float, nullable=True),
    # Comma lists; '' means all.
    sa.Column("allowed_capabilities", sa.Text, nullable=False),
    sa.Column("allowed_models", sa.Text, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

# Per-tenant overrides of the plan's limits (plans live in code: tenancy/plans.py).
tenant_limits = sa.Table(
    "tenant_limits", metadata,
    sa.Column("tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("capability", sa.Text, primary_key=True),  # '*' = every capability
    sa.Column("model", sa.Text, primary_key=True),  # '' = every model
    sa.Column("kind", sa.Text, primary_key=True),  # 'requests' | 'units'
    sa.Column("limit_value", sa.Float, nullable=False),
    sa.Column("window_s", sa.Integer, nullable=False),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.Text, primary_key=True),  # the JWT's jti
    sa.Column("tenant_id", sa.Text, nullable=False, index=True),
    sa.Column("scopes", sa.Text, nullable=False),  # space-separated
    sa.Column("key_id", sa.Text, nullable=False),
    sa.Column("issued_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
)

signing_keys = sa.Table(
    "signing_keys", metadata,
    sa.Column("id", sa.Text, primary_key=True),  # the JWT header's kid
    sa.Column("algorithm", sa.Text, nullable=False),
    sa.Column("private_pem", sa.Text, nullable=False),
    sa.Column("public_jwk", sa.Text, nullable=False),  # JSON
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("retired_at", UtcDateTime, nullable=True),
)

# One row (id = 1) whose version is bumped in the same transaction as every change to
# tenants, limits, tokens or keys: control planes sharing the database poll it.
tenancy_state = sa.Table(
    "tenancy_state", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)

usage_records = sa.Table(
    "usage_records", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("time", UtcDateTime, nullable=False),  # call start
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("capability", sa.Text, nullable=False),
    sa.Column("service", sa.Text, nullable=False),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("request_type", sa.Text, nullable=False),
    sa.Column("requested_model", sa.Text, nullable=False),
    sa.Column("served_model", sa.Text, nullable=False),
    sa.Column("served_version", sa.Text, nullable=False),
    sa.Column("pool", sa.Text, nullable=False),
    sa.Column("unit", sa.Text, nullable=False),
    sa.Column("input_units", sa.Float, nullable=False),
    sa.Column("output_units", sa.Float, nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("ttft_ms", sa.Float, nullable=True),
    sa.Column("status", sa.Text, nullable=False),  # gRPC code name
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("fell_back", sa.Boolean, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("trace_id", sa.Text, nullable=False),
    sa.Column("origin", sa.Text, nullable=False),  # 'server' | 'cache' | 'edge'
    sa.Index("ix_usage_records_tenant_time", "tenant", "time"),
    sa.Index("ix_usage_records_time", "time"),
)

usage_hourly = sa.Table(
    "usage_hourly", metadata,
    sa.Column("hour", UtcDateTime, primary_key=True),
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("capability", sa.Text, primary_key=True),
    sa.Column("served_model", sa.Text, primary_key=True),
    sa.Column("pool", sa.Text, primary_key=True),
    sa.Column("unit", sa.Text, primary_key=True),
    sa.Column("calls", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("fallbacks", sa.BigInteger, nullable=False),
    sa.Column("input_units", sa.Float, nullable=False),
    sa.Column("output_units", sa.Float, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("duration_ms_sum", sa.Float, nullable=False),
    # JSON list of counts over usage_queries.LATENCY_BOUNDS_MS buckets (mergeable).
    sa.Column("latency_hist", sa.Text, nullable=False),
    sa.Index("ix_usage_hourly_tenant_hour", "tenant", "hour"),
)

# Asynchronous jobs (aimesh_servers/jobs): one row per job, one per request item.
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("capability", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # the JobRequest oneof case, e.g. 'generate'
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("ended_at", UtcDateTime, nullable=True),
    sa.Column("expire_at", UtcDateTime, nullable=True),
    sa.Index("ix_jobs_tenant_created", "tenant", "created_at"),
    sa.Index("ux_jobs_tenant_idempotency_key", "tenant", "idempotency_key", unique=True),
)

job_items = sa.Table(
    "job_items", metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("request", sa.LargeBinary, nullable=False),  # serialized capability request
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("result_key", sa.Text, nullable=True),  # key in the results store
    sa.Column("error_reason", sa.Text, nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("error_status", sa.LargeBinary, nullable=True),  # google.rpc.Status
    sa.Column("leased_by", sa.Text, nullable=True),
    sa.Column("lease_until", UtcDateTime, nullable=True),
    sa.Index("ix_job_items_state", "state"),
)


def sqlite_url(state_dir: str | Path) -> str:
    return f"sqlite:///{Path(state_dir) / 'aimesh.db'}"


def make_engine(url: str, **kwargs: object) -> Engine:
    """An engine for a SQLite or PostgreSQL URL, with aimesh's session settings.

    SQLite: WAL (readers never block the writer), a busy timeout, foreign keys, and
    transactions begun by SQLAlchemy (not pysqlite) so they behave as on PostgreSQL.
    PostgreSQL: psycopg 3 ("postgresql://" is taken as "postgresql+psycopg://"),
    sessions in UTC.
    """
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection):  # type: ignore[no-untyped-def]
            immediate = connection.get_execution_options().get(WRITE_LOCK_OPTION)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(
            parsed, connect_args={"options": "-c timezone=UTC"}, pool_pre_ping=True, **kwargs
        )
    raise ValueError(f"unsupported database URL {parsed.render_as_string()!r}: use sqlite:// or postgresql://")


def alembic_config(connection: sa.Connection | None = None):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


# PostgreSQL advisory locks ("aimesh", "aimesi"): one migration, one rollup at a time.
MIGRATION_LOCK = 0x61696D657368
ROLLUP_LOCK = 0x61696D657369


def migrate(url_or_engine: str | Engine) -> None:
    """Upgrades the database to the newest migration (a no-op when it is there)."""
    from alembic import command

    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        # Control planes that start together must not migrate at once: the loser waits for
        # the winner's transaction (SQLite: its write lock), then finds nothing left to do.
        with engine.connect().execution_options(**{WRITE_LOCK_OPTION: True}) as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            command.upgrade(alembic_config(connection), "head")
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()

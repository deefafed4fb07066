"""Initial schema: tenants, limits, tokens, signing keys, tenancy state, usage records
and hourly usage.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from aimesh_servers.tenancy.db import UtcDateTime
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("monthly_budget_usd", sa.Float, nullable=True),
        sa.Column("allowed_capabilities", sa.Text, nullable=False),
        sa.Column("allowed_models", sa.Text, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "tenant_limits",
        sa.Column("tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("capability", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("limit_value", sa.Float, nullable=False),
        sa.Column("window_s", sa.Integer, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("issued_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.Column("revoked_at", UtcDateTime, nullable=True),
    )
    op.create_index("ix_tokens_tenant_id", "tokens", ["tenant_id"])
    op.create_table(
        "signing_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("algorithm", sa.Text, nullable=False),
        sa.Column("private_pem", sa.Text, nullable=False),
        sa.Column("public_jwk", sa.Text, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("retired_at", UtcDateTime, nullable=True),
    )
    state = op.create_table(
        "tenancy_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0}])
    op.create_table(
        "usage_records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("time", UtcDateTime, nullable=False),
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
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("fell_back", sa.Boolean, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("trace_id", sa.Text, nullable=False),
        sa.Column("origin", sa.Text, nullable=False),
    )
    op.create_index("ix_usage_records_tenant_time", "usage_records", ["tenant", "time"])
    op.create_index("ix_usage_records_time", "usage_records", ["time"])
    op.create_table(
        "usage_hourly",
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
        sa.Column("latency_hist", sa.Text, nullable=False),
    )
    op.create_index("ix_usage_hourly_tenant_hour", "usage_hourly", ["tenant", "hour"])


def downgrade() -> None:
    for table in ("usage_hourly", "usage_records", "tenancy_state", "signing_keys", "tokens",
                  "tenant_limits", "tenants"):
        op.drop_table(table)

"""Asynchronous jobs: jobs and their request items.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from aimesh_servers.tenancy.db import UtcDateTime
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("capability", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=True),
        sa.Column("ended_at", UtcDateTime, nullable=True),
        sa.Column("expire_at", UtcDateTime, nullable=True),
    )
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant", "created_at"])
    # NULL keys never collide (both databases), so jobs without a key are not limited.
    op.create_index("ux_jobs_tenant_idempotency_key", "jobs", ["tenant", "idempotency_key"], unique=True)
    op.create_table(
        "job_items",
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("request", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("result_key", sa.Text, nullable=True),
        sa.Column("error_reason", sa.Text, nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("error_status", sa.LargeBinary, nullable=True),
        sa.Column("leased_by", sa.Text, nullable=True),
        sa.Column("lease_until", UtcDateTime, nullable=True),
    )
    op.create_index("ix_job_items_state", "job_items", ["state"])


def downgrade() -> None:
    op.drop_table("job_items")
    op.drop_table("jobs")

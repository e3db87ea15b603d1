"""Initial schema: adapters, batch_runs, jobs, usage_daily.

Revision ID: 0001
Revises:
Create Date: 2025-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_MODES = "'generate', 'score'"
RUN_STATUSES = "'pending', 'running', 'completed', 'failed', 'cancelled'"
JOB_STATUSES = "'queued', 'running', 'completed', 'failed', 'cancelled'"
BASE_MODEL_ROW = sa.text("adapter_id IS NULL")


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(length=129), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(length=256), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("storage_uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=True),
        sa.Column("visibility", sa.String(length=16), nullable=False),
        sa.Column("group", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("\"visibility\" IN ('private', 'public')", name=op.f("ck_adapters_visibility")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_adapters_version_positive")),
        sa.CheckConstraint("rank > 0", name=op.f("ck_adapters_rank_positive")),
        sa.CheckConstraint("bytes >= 0", name=op.f("ck_adapters_bytes_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
    )
    op.create_index(op.f("ix_adapters_group"), "adapters", ["group"])
    op.create_index(op.f("ix_adapters_tenant"), "adapters", ["tenant"])

    op.create_table(
        "batch_runs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("input_uri", sa.Text(), nullable=False),
        sa.Column("output_uri", sa.Text(), nullable=True),
        sa.Column("total_rows", sa.Integer(), nullable=False),
        sa.Column("done_rows", sa.Integer(), nullable=False),
        sa.Column("failed_rows", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f'"status" IN ({RUN_STATUSES})', name=op.f("ck_batch_runs_status")),
        sa.CheckConstraint(f'"mode" IN ({JOB_MODES})', name=op.f("ck_batch_runs_mode")),
        sa.CheckConstraint(
            "total_rows >= 0 AND done_rows >= 0 AND failed_rows >= 0",
            name=op.f("ck_batch_runs_rows_nonnegative"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_runs")),
    )
    op.create_index(op.f("ix_batch_runs_status"), "batch_runs", ["status"])
    op.create_index(op.f("ix_batch_runs_tenant"), "batch_runs", ["tenant"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("adapter", sa.String(length=129), nullable=True),
        sa.Column("adapters", sa.JSON(), nullable=True),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("generated_tokens", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("batch_run_id", sa.String(length=64), nullable=True),
        sa.CheckConstraint(f'"status" IN ({JOB_STATUSES})', name=op.f("ck_jobs_status")),
        sa.CheckConstraint(f'"mode" IN ({JOB_MODES})', name=op.f("ck_jobs_mode")),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND generated_tokens >= 0", name=op.f("ck_jobs_tokens_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["batch_run_id"], ["batch_runs.id"],
            name=op.f("fk_jobs_batch_run_id_batch_runs"), ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_tenant"), "jobs", ["tenant"])
    op.create_index(op.f("ix_jobs_batch_run_id"), "jobs", ["batch_run_id"])
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])

    op.create_table(
        "usage_daily",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("adapter_id", sa.String(length=129), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("generated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND generated_tokens >= 0 AND requests >= 0",
            name=op.f("ck_usage_daily_counts_nonnegative"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_daily")),
        sa.UniqueConstraint(
            "day", "tenant", "adapter_id", name=op.f("uq_usage_daily_day_tenant_adapter_id")
        ),
    )
    # NULLs are distinct in the unique constraint above: base-model rows need their own.
    op.create_index(
        "uq_usage_daily_day_tenant_base", "usage_daily", ["day", "tenant"], unique=True,
        sqlite_where=BASE_MODEL_ROW, postgresql_where=BASE_MODEL_ROW,
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; jobs goes before batch_runs (its FK target).
    op.drop_table("usage_daily")
    op.drop_table("jobs")
    op.drop_table("batch_runs")
    op.drop_table("adapters")

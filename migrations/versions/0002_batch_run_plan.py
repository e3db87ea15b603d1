"""Batch runs remember how they were planned: options, input checksum, chunk count.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batch_runs") as t:
        t.add_column(sa.Column("options", sa.JSON(), nullable=True))
        t.add_column(sa.Column("input_sha256", sa.String(length=64), nullable=True))
        t.add_column(sa.Column("num_chunks", sa.Integer(), nullable=False, server_default="0"))
        t.create_index("ix_batch_runs_input_sha256", ["input_sha256"])


def downgrade() -> None:
    with op.batch_alter_table("batch_runs") as t:
        t.drop_index("ix_batch_runs_input_sha256")
        t.drop_column("num_chunks")
        t.drop_column("input_sha256")
        t.drop_column("options")

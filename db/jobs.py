"""Inference jobs and the offline batch runs that group them."""

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import validates
from sqlmodel import Field, SQLModel

from db.base import Choice, timestamp


class JobMode(Choice):
    GENERATE = "generate"
    SCORE = "score"


class JobStatus(Choice):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BatchRunStatus(Choice):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def new_id() -> str:
    return uuid.uuid4().hex


class BatchRun(SQLModel, table=True):
    """One offline scoring/generation run over an input dataset."""

    __tablename__ = "batch_runs"
    __table_args__ = (
        BatchRunStatus.check("status", "status"),
        JobMode.check("mode", "mode"),
        sa.CheckConstraint(
            "total_rows >= 0 AND done_rows >= 0 AND failed_rows >= 0", name="rows_nonnegative"
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, sa_type=sa.String(64))
    tenant: str = Field(index=True, sa_type=sa.String(128))
    status: str = Field(default=BatchRunStatus.PENDING.value, index=True, sa_type=sa.String(16))
    mode: str = Field(default=JobMode.SCORE.value, sa_type=sa.String(16))
    input_uri: str = Field(sa_type=sa.Text)
    output_uri: str | None = Field(default=None, sa_type=sa.Text)
    total_rows: int = 0
    done_rows: int = 0
    failed_rows: int = 0
    error: str | None = Field(default=None, sa_type=sa.Text)
    # how the run was planned (mode options, chunk size...): a resume replays the same plan
    options: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    input_sha256: str | None = Field(default=None, index=True, sa_type=sa.String(64))
    num_chunks: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = timestamp()
    updated_at: datetime = timestamp(onupdate=True)
    finished_at: datetime | None = timestamp(nullable=True)

    @validates("status")
    def _check_status(self, key: str, value: str) -> str:
        return BatchRunStatus.validate(key, value)

    @validates("mode")
    def _check_mode(self, key: str, value: str) -> str:
        return JobMode.validate(key, value)


class Job(SQLModel, table=True):
    """The durable record of one inference job (the live state is in Redis).

    ``adapter`` is a plain id, not a foreign key: deleting an adapter must not
    rewrite or block the history of the jobs that used it.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        JobStatus.check("status", "status"),
        JobMode.check("mode", "mode"),
        sa.CheckConstraint("prompt_tokens >= 0 AND generated_tokens >= 0", name="tokens_nonnegative"),
        sa.Index("ix_jobs_status_created_at", "status", "created_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, sa_type=sa.String(128))
    tenant: str = Field(index=True, sa_type=sa.String(128))
    adapter: str | None = Field(default=None, sa_type=sa.String(129))
    # Ensemble: [{"id": ..., "weight": ...}, ...]; None for a single adapter.
    adapters: list[dict[str, Any]] | None = Field(default=None, sa_type=sa.JSON)
    mode: str = Field(default=JobMode.GENERATE.value, sa_type=sa.String(16))
    status: str = Field(default=JobStatus.QUEUED.value, sa_type=sa.String(16))
    priority: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    error: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = timestamp()
    started_at: datetime | None = timestamp(nullable=True)
    finished_at: datetime | None = timestamp(nullable=True)
    batch_run_id: str | None = Field(
        default=None, foreign_key="batch_runs.id", ondelete="SET NULL", index=True,
        sa_type=sa.String(64),
    )

    @validates("status")
    def _check_status(self, key: str, value: str) -> str:
        return JobStatus.validate(key, value)

    @validates("mode")
    def _check_mode(self, key: str, value: str) -> str:
        return JobMode.validate(key, value)

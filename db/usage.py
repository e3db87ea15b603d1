"""The usage ledger: tokens and requests per (UTC day, tenant, adapter)."""

from datetime import date

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel

from db.base import utcnow
from db.upsert import dialect_insert


class UsageDaily(SQLModel, table=True):
    """One row per (day, tenant, adapter); ``adapter_id`` NULL is the base model.

    SQL treats NULLs as distinct in a unique constraint, so the constraint on
    (day, tenant, adapter_id) alone would let base-model rows duplicate; a
    partial unique index on (day, tenant) WHERE adapter_id IS NULL closes that
    hole and is the conflict target for base-model upserts.
    """

    __tablename__ = "usage_daily"
    __table_args__ = (
        sa.UniqueConstraint("day", "tenant", "adapter_id"),
        sa.Index(
            "uq_usage_daily_day_tenant_base",
            "day", "tenant",
            unique=True,
            sqlite_where=sa.text("adapter_id IS NULL"),
            postgresql_where=sa.text("adapter_id IS NULL"),
        ),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND generated_tokens >= 0 AND requests >= 0",
            name="counts_nonnegative",
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    day: date
    tenant: str = Field(sa_type=sa.String(128))
    adapter_id: str | None = Field(default=None, sa_type=sa.String(129))
    prompt_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    generated_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    requests: int = Field(default=0, sa_type=sa.BigInteger)


def record_usage(
    session: Session,
    tenant: str,
    adapter_id: str | None,
    prompt_tokens: int,
    generated_tokens: int,
    day: date | None = None,
    requests: int = 1,
) -> None:
    """Add one request's tokens to the ledger row of (day, tenant, adapter).

    One atomic ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x``:
    safe under concurrent callers on SQLite and PostgreSQL. ``day`` defaults
    to today in UTC. The caller commits.
    """
    if not tenant:
        raise ValueError("tenant is required for usage attribution")
    for name, value in (("prompt_tokens", prompt_tokens), ("generated_tokens", generated_tokens),
                        ("requests", requests)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    table = UsageDaily.__table__
    stmt = dialect_insert(session, table).values(
        day=day or utcnow().date(),
        tenant=tenant,
        adapter_id=adapter_id,
        prompt_tokens=prompt_tokens,
        generated_tokens=generated_tokens,
        requests=requests,
    )
    if adapter_id is None:
        target = {"index_elements": [table.c.day, table.c.tenant],
                  "index_where": table.c.adapter_id.is_(None)}
    else:
        target = {"index_elements": [table.c.day, table.c.tenant, table.c.adapter_id]}
    stmt = stmt.on_conflict_do_update(
        **target,
        set_={
            "prompt_tokens": table.c.prompt_tokens + stmt.excluded.prompt_tokens,
            "generated_tokens": table.c.generated_tokens + stmt.excluded.generated_tokens,
            "requests": table.c.requests + stmt.excluded.requests,
        },
    )
    session.execute(stmt)

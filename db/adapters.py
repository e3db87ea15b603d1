"""The adapter registry: one row per LoRA adapter id."""

import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import validates
from sqlmodel import Field, Session, SQLModel

from db.base import Choice, timestamp, utcnow
from db.upsert import dialect_insert

# "acme/sql-v2", "sql-v2": lowercase, one optional namespace, no leading dot or
# dash in a segment (ids end up in paths, URLs and Redis key names).
ADAPTER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(/[a-z0-9][a-z0-9._-]{0,63})?$")
ADAPTER_ID_MAX = 129


class Visibility(Choice):
    PRIVATE = "private"
    PUBLIC = "public"


class AdapterOwnershipError(PermissionError):
    """An adapter id is already registered to another tenant."""


def validate_adapter_id(adapter_id: str) -> str:
    """Return ``adapter_id`` if it is a valid slug, else raise ValueError."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
        raise ValueError(
            f"invalid adapter id {adapter_id!r}: expected 'name' or 'namespace/name', "
            "each 1-64 chars of [a-z0-9._-] starting with a letter or digit"
        )
    return adapter_id


class Adapter(SQLModel, table=True):
    __tablename__ = "adapters"
    __table_args__ = (
        Visibility.check("visibility", "visibility"),
        sa.CheckConstraint("version >= 1", name="version_positive"),
        sa.CheckConstraint("rank > 0", name="rank_positive"),
        sa.CheckConstraint("bytes >= 0", name="bytes_nonnegative"),
    )

    id: str = Field(primary_key=True, sa_type=sa.String(ADAPTER_ID_MAX))
    name: str = Field(sa_type=sa.String(256))
    version: int = Field(default=1)
    base_model: str = Field(sa_type=sa.String(256))
    rank: int
    alpha: float
    target_modules: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    storage_uri: str = Field(sa_type=sa.Text)
    sha256: str = Field(sa_type=sa.String(64))
    bytes: int = Field(sa_type=sa.BigInteger)
    # NULL tenant: a public/system adapter owned by no tenant.
    tenant: str | None = Field(default=None, index=True, sa_type=sa.String(128))
    visibility: str = Field(default=Visibility.PRIVATE.value, sa_type=sa.String(16))
    group: str = Field(index=True, sa_type=sa.String(64))
    created_at: datetime = timestamp()
    updated_at: datetime = timestamp(onupdate=True)

    @validates("id")
    def _check_id(self, _key: str, value: str) -> str:
        return validate_adapter_id(value)

    @validates("visibility")
    def _check_visibility(self, key: str, value: str) -> str:
        return Visibility.validate(key, value)

    @validates("sha256")
    def _check_sha256(self, key: str, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value or ""):
            raise ValueError(f"{key} must be 64 lowercase hex chars, got {value!r}")
        return value


_REGISTER_FIELDS = (
    "name", "base_model", "rank", "alpha", "target_modules", "storage_uri",
    "sha256", "bytes", "tenant", "visibility", "group",
)


def register_adapter(session: Session, spec: Adapter) -> Adapter:
    """Insert ``spec``, or overwrite the row with its id and bump its version.

    One atomic upsert, so two concurrent registrations of one id give versions
    n+1 and n+2, never two n+1. ``spec.version`` and timestamps are ignored.
    Raises AdapterOwnershipError when the id belongs to a different tenant.
    The caller commits.
    """
    now = utcnow()
    values: dict[str, Any] = {f: getattr(spec, f) for f in _REGISTER_FIELDS}
    values.update(id=spec.id, version=1, created_at=now, updated_at=now)
    table = Adapter.__table__
    insert = dialect_insert(session, table)
    stmt = insert.values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.id],
        set_={
            **{f: stmt.excluded[f] for f in _REGISTER_FIELDS},
            "version": table.c.version + 1,
            "updated_at": stmt.excluded.updated_at,
        },
        # Only the owner may re-register (NULL = system; matched null-safely).
        where=table.c.tenant.is_not_distinct_from(stmt.excluded.tenant),
    ).returning(table.c.id)
    if session.execute(stmt).scalar_one_or_none() is None:
        raise AdapterOwnershipError(f"adapter id {spec.id!r} is registered to another tenant")
    adapter = session.get(Adapter, spec.id, populate_existing=True)
    if adapter is None:  # pragma: no cover - the row was just written in this transaction
        raise LookupError(f"adapter {spec.id!r} vanished after upsert")
    return adapter

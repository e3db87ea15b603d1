"""Shared pieces of the table modules: naming convention, UTC timestamps, choices.

Import this before defining any table: the naming convention must be on
``SQLModel.metadata`` when constraints are attached, so that every constraint
has a stable name (Alembic needs names to drop or alter them, and SQLite batch
mode needs them to rebuild a table).
"""

from datetime import datetime, timezone
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION


def utcnow() -> datetime:
    """The current time, tz-aware, in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp that is always tz-aware UTC in Python, on every backend.

    PostgreSQL stores ``timestamptz``; SQLite stores the UTC wall time as text
    and hands back a naive value, which is re-tagged as UTC on the way out.
    Naive datetimes are refused on the way in: their zone is a guess.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a tz-aware (UTC) datetime")
        value = value.astimezone(timezone.utc)
        # SQLite has no zone type: store the UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Choice(str, Enum):
    """A closed set of string values stored as plain text plus a CHECK constraint.

    Plain text (not a native PostgreSQL ENUM) keeps migrations simple on both
    backends; the ``str`` base lets ``job.status == JobStatus.RUNNING`` hold
    for values read back from the database.
    """

    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]

    @classmethod
    def check(cls, column: str, name: str) -> sa.CheckConstraint:
        allowed = ", ".join(f"'{v}'" for v in cls.values())
        return sa.CheckConstraint(f'"{column}" IN ({allowed})', name=name)

    @classmethod
    def validate(cls, field: str, value: Any) -> str:
        if isinstance(value, cls):
            return value.value
        if value not in cls.values():
            raise ValueError(f"{field} must be one of {cls.values()}, got {value!r}")
        return str(value)


def timestamp(nullable: bool = False, onupdate: bool = False) -> Any:
    """Field options for a UTC timestamp column (``onupdate``: refreshed by every ORM UPDATE)."""
    kwargs = {"onupdate": utcnow} if onupdate else {}
    if nullable:
        return Field(default=None, sa_type=UTCDateTime(), nullable=True, sa_column_kwargs=kwargs)
    return Field(default_factory=utcnow, sa_type=UTCDateTime(), nullable=False, sa_column_kwargs=kwargs)

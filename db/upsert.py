"""Dialect-specific ``INSERT ... ON CONFLICT`` for the backends we support."""

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session


def dialect_insert(session: Session, table: sa.Table) -> Any:
    """An ``insert(table)`` that has ``on_conflict_do_update`` for the session's backend.

    Both PostgreSQL and SQLite (>= 3.24) run the upsert as one atomic
    statement, so concurrent writers never lose an update.
    """
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upsert is implemented for postgresql and sqlite, not {name!r}")

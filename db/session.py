"""Where the database is, how to connect to it, and how to bring it up to date.

The one setting is ``DATABASE_URL``; without it the database is the SQLite
file ``$OPENLORA_HOME/openlora.db`` (``OPENLORA_HOME`` defaults to
``~/.openlora``). ``postgres://`` and ``postgresql://`` URLs are driven by
psycopg 3.
"""

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

DEFAULT_DB_FILE = "openlora.db"
_default_engine: Engine | None = None


def openlora_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("OPENLORA_HOME") or Path.home() / ".openlora").expanduser()


def database_url(env: Mapping[str, str] | None = None) -> str:
    """``DATABASE_URL``, else the default SQLite file (its directory is created)."""
    env = os.environ if env is None else env
    url = env.get("DATABASE_URL", "").strip()
    if url:
        return normalize_url(url)
    home = openlora_home(env)
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(home / DEFAULT_DB_FILE).resolve()}"


def normalize_url(url: str) -> str:
    """Route plain PostgreSQL URLs to psycopg 3 (SQLAlchemy's default is psycopg2)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL: readers do not block the writer (a no-op for :memory:).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """A new engine for ``url`` (default: :func:`database_url`), tuned per backend."""
    url = normalize_url(url) if url else database_url()
    backend = sa.make_url(url).get_backend_name()
    if backend == "sqlite":
        connect_args = kwargs.pop("connect_args", {})
        # Wait for the write lock instead of failing at once; let the pool hand a
        # connection to another thread (each is used by one thread at a time).
        connect_args.setdefault("timeout", 30)
        connect_args.setdefault("check_same_thread", False)
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return sa.create_engine(url, **kwargs)
    raise ValueError(f"unsupported database {backend!r} in DATABASE_URL: use sqlite or postgresql")


def get_engine() -> Engine:
    """The process-wide engine for :func:`database_url`, made on first use."""
    global _default_engine
    if _default_engine is None:
        _default_engine = make_engine()
    return _default_engine


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    with Session(engine or get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def init_db(url: str | Engine | None = None) -> Engine:
    """Bring the database at ``url`` to the latest migration (``alembic upgrade head``).

    Migrations are the only source of the schema; nothing here calls ``create_all``.
    Returns the engine, ready for :func:`session_scope`.
    """
    from db.migrate import upgrade

    engine = url if isinstance(url, Engine) else make_engine(url)
    upgrade(engine)
    return engine

"""The Alembic migrations: up, down, up again, and in step with the models."""

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from db.migrate import current_revision, downgrade, head_revision, upgrade
from db.session import database_url, init_db, normalize_url

TABLES = {"adapters", "batch_runs", "jobs", "usage_daily"}


def _tables(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_downgrade_to_base_and_upgrade_again(db_engine: Engine) -> None:
    assert current_revision(db_engine) == head_revision()
    assert _tables(db_engine) == TABLES

    downgrade(db_engine, "base")
    assert _tables(db_engine) == set()
    assert current_revision(db_engine) is None

    upgrade(db_engine, "head")
    assert _tables(db_engine) == TABLES
    assert current_revision(db_engine) == head_revision()


def test_migrations_match_models(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, SQLModel.metadata)
    assert diff == [], f"models and migrations differ: {diff}"


def test_init_db_is_idempotent_from_any_cwd(
    db_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    init_db(db_engine)
    assert current_revision(db_engine) == head_revision()


def test_init_db_from_url_on_fresh_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine = init_db(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        assert _tables(engine) == TABLES
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_database_url_defaults_under_openlora_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = database_url({"OPENLORA_HOME": str(home)})
    assert url == f"sqlite:///{(home / 'openlora.db').resolve()}"
    assert home.is_dir()
    assert database_url({"DATABASE_URL": "sqlite:///x.db"}) == "sqlite:///x.db"


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"

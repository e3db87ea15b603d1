"""Fixtures: every test that takes ``db_engine`` runs once on SQLite and once on PostgreSQL.

PostgreSQL: ``OPENLORA_TEST_POSTGRES_URL`` (an admin URL to an existing
database), else the local server on 127.0.0.1:5432 as ``postgres`` or
``root``, database ``test``. A fresh database is created for the session and
dropped at its end. If no server answers, one start of the local cluster is
tried; then the PostgreSQL tests fail under ``CI`` and are skipped elsewhere.
"""

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from db.session import init_db, make_engine

LOCAL_ADMIN_URLS = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)


def _first_reachable(urls: list[str]) -> tuple[str | None, str]:
    errors = []
    for url in urls:
        try:
            with psycopg.connect(url, connect_timeout=3):
                return url, ""
        except psycopg.Error as e:
            first_line = (str(e).strip() or repr(e)).splitlines()[0]
            errors.append(f"{url}: {first_line}")
    return None, "; ".join(errors)


def _start_local_cluster() -> None:
    conf = Path("/etc/postgresql")
    if not conf.is_dir():
        return
    for version in sorted(p.name for p in conf.iterdir()):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            capture_output=True, timeout=30, check=False,
        )


def _postgres_admin_url() -> str:
    override = os.environ.get("OPENLORA_TEST_POSTGRES_URL")
    urls = [override] if override else list(LOCAL_ADMIN_URLS)
    url, why = _first_reachable(urls)
    if url is None and not override:
        try:
            _start_local_cluster()
        except (OSError, subprocess.SubprocessError) as e:
            why += f"; starting the local cluster failed: {e}"
        for _ in range(20):
            url, why_now = _first_reachable(urls)
            if url is not None:
                break
            time.sleep(0.5)
        else:
            why = why_now
    if url is None:
        reason = f"PostgreSQL not reachable ({why})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return url


def _with_database(url: str, name: str) -> str:
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    admin_url = _postgres_admin_url()
    name = f"openlora_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A migrated database for the whole session, one per backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'openlora.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = init_db(url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_engine(engine: Engine) -> Iterator[Engine]:
    """The session's database, emptied after each test."""
    yield engine
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())

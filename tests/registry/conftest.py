"""Fixtures of the registry tests: the database fixtures of tests/db (SQLite and PostgreSQL), a store, adapters."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from db.store import LocalStore
from tests.db.conftest import db_engine, engine, postgres_url  # noqa: F401  (re-exported fixtures)


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def good_adapter(tiny, tmp_path) -> Path:
    """A private copy of ad1 (rank 4, q_proj + v_proj) that a test may break."""
    _, adapters = tiny
    return Path(shutil.copytree(adapters["ad1"], tmp_path / "src" / "ad1"))


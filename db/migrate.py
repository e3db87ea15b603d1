"""Run the Alembic migrations in ``migrations/`` from Python, from any cwd."""

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

import migrations


def script_location() -> Path:
    """The ``migrations/`` folder, found from the installed package (not the cwd)."""
    return Path(migrations.__file__).resolve().parent


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    return cfg


def _run(engine: Engine, fn: Callable[[Config, str], None], revision: str) -> None:
    cfg = alembic_config()
    # Hand env.py our engine's connection: pragmas, in-memory SQLite and the
    # caller's URL all carry over, and nothing is read from alembic.ini.
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        fn(cfg, revision)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` on ``engine``."""
    _run(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """``alembic downgrade <revision>`` on ``engine``."""
    _run(engine, command.downgrade, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found under {script_location()}")
    return head

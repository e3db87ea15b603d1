"""OpenLoRA's database: SQLModel tables, sessions and migrations (see ``migrations/``)."""

from db.models import *  # noqa: F401,F403  (registers every table)
from db.models import __all__ as _models_all
from db.session import database_url, get_engine, init_db, make_engine, session_scope

__all__ = [*_models_all, "database_url", "get_engine", "init_db", "make_engine", "session_scope"]

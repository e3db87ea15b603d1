"""Alembic migrations for ``db/``; run them with ``db.init_db()`` or the ``alembic`` CLI."""

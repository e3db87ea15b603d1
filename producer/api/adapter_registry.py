"""The API's view of the adapter registry (``db``): which tenant may see, run, register or delete
which adapter. A tenant sees its own adapters, public ones and system ones (no tenant); another
tenant's private adapter does not exist for it (404 everywhere).

The database is synchronous (SQLModel); every call runs in a worker thread.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, select

from db.adapter_check import BaseModelShape
from db.adapters import Adapter, Visibility
from db.session import init_db, openlora_home
from db.store import LocalStore, register, unregister


def visible(row: Adapter, tenant: str | None) -> bool:
    return row.visibility == Visibility.PUBLIC.value or row.tenant is None or row.tenant == tenant


class AdapterRegistry:
    visible = staticmethod(visible)

    def __init__(self, database_url: str, store_root: str | None, base_model_dir: str | None, max_rank: int):
        self.engine = init_db(database_url)
        self.store = LocalStore(store_root or openlora_home() / "store")
        self.base = BaseModelShape.from_dir(base_model_dir) if base_model_dir else None
        self.max_rank = max_rank

    def close(self) -> None:
        self.engine.dispose()

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    async def get(self, adapter_id: str) -> Adapter | None:
        """The row of ``adapter_id`` whoever owns it (callers check ``visible``)."""
        def get():
            with self._session() as s:
                return s.get(Adapter, adapter_id)
        return await asyncio.to_thread(get)

    async def visible_to(self, tenant: str | None) -> list[Adapter]:
        def rows():
            with self._session() as s:
                q = select(Adapter).where(sa.or_(Adapter.visibility == Visibility.PUBLIC.value,
                                                 Adapter.tenant.is_(None), Adapter.tenant == tenant))
                return list(s.exec(q.order_by(Adapter.id)).all())
        return await asyncio.to_thread(rows)

    async def hidden_from(self, tenant: str | None) -> set[str]:
        """Ids of the adapters ``tenant`` must not see (other tenants' private ones)."""
        def ids():
            with self._session() as s:
                q = select(Adapter.id).where(Adapter.visibility != Visibility.PUBLIC.value,
                                             Adapter.tenant.is_not(None), Adapter.tenant != (tenant or ""))
                return set(s.exec(q).all())
        return await asyncio.to_thread(ids)

    async def register(self, src: Path, adapter_id: str, tenant: str, public: bool, name: str | None) -> Adapter:
        """Validate (``db.adapter_check``), store and record; raises AdapterValidationError or
        AdapterOwnershipError (the id is another tenant's)."""
        def run():
            with self._session() as s:
                return register(s, self.store, src, adapter_id, tenant=tenant, base_model=self.base,
                                max_rank=self.max_rank, public=public, name=name)
        return await asyncio.to_thread(run)

    async def delete(self, adapter_id: str, tenant: str) -> Adapter:
        """Remove the tenant's own adapter (every version); LookupError if it is not theirs."""
        def run():
            with self._session() as s:
                return unregister(s, self.store, adapter_id, tenant)
        return await asyncio.to_thread(run)

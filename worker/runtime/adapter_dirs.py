"""Where a worker finds adapters it does not hold yet: a name -> directory map and/or a root folder,
then the adapter registry (adapters added with ``openlora adapters add`` or ``POST /v1/adapters``)
when the worker has a database."""
from __future__ import annotations

import json
import re
from pathlib import Path

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,256}$")


class RegistryLookup:
    """The registry's current version of an adapter, in the store the API and the CLI write to."""

    def __init__(self, database_url: str, store_root: str | Path | None = None):
        self.database_url, self.store_root = database_url, store_root
        self._db = self._store = None

    def resolve(self, name: str) -> Path | None:
        from db.adapters import Adapter
        from db.session import make_engine, openlora_home, session_scope
        from db.store import LocalStore
        if self._db is None:
            self._db = make_engine(self.database_url)
            self._store = LocalStore(self.store_root or openlora_home() / "store")
        with session_scope(self._db) as s:
            row = s.get(Adapter, name)
        if row is None or not row.storage_uri.startswith("file:"):
            return None                   # unknown, or still being written
        try:
            return self._store.open(row.storage_uri)
        except (FileNotFoundError, ValueError):
            return None                   # removed meanwhile, or not in this worker's store


class AdapterDirectory:
    def __init__(self, paths: dict[str, str | Path] | None = None, root: str | Path | None = None,
                 registry: RegistryLookup | None = None):
        self.paths = {k: Path(v) for k, v in (paths or {}).items()}
        self.root = Path(root) if root else None
        self.registry = registry

    @classmethod
    def parse(cls, spec: str | None) -> AdapterDirectory:
        """``{"name": "path", ...}`` (JSON), ``name=path,name=path``, or a root folder whose
        subfolders are adapters (the subfolder's name is the adapter id)."""
        spec = (spec or "").strip()
        if not spec:
            return cls()
        if spec.startswith("{"):
            return cls(json.loads(spec))
        if "=" in spec:
            pairs = [p.partition("=") for p in spec.split(",") if p.strip()]
            return cls({k.strip(): v.strip() for k, _, v in pairs})
        return cls(root=spec)

    def merged(self, other: AdapterDirectory) -> AdapterDirectory:
        return AdapterDirectory({**self.paths, **other.paths}, other.root or self.root, other.registry or self.registry)

    def resolve(self, name: str) -> Path | None:
        """The adapter's folder: the map, the root folder, then the registry (a database query)."""
        if name in self.paths:
            return self.paths[name]
        if self.root is not None and _NAME_RE.match(name) and name not in (".", ".."):
            path = self.root / name
            if (path / "adapter_config.json").is_file():
                return path
        return self.registry.resolve(name) if self.registry is not None else None

    def names(self) -> list[str]:
        found = set(self.paths)
        if self.root is not None and self.root.is_dir():
            found |= {p.name for p in self.root.iterdir() if (p / "adapter_config.json").is_file()}
        return sorted(found)

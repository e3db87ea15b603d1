"""Where a worker finds adapters it does not hold yet: a name -> directory map and/or a root folder.

Stands in for the adapter registry (a later issue), which will answer the same question.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,256}$")


class AdapterDirectory:
    def __init__(self, paths: dict[str, str | Path] | None = None, root: str | Path | None = None):
        self.paths = {k: Path(v) for k, v in (paths or {}).items()}
        self.root = Path(root) if root else None

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
        return AdapterDirectory({**self.paths, **other.paths}, other.root or self.root)

    def resolve(self, name: str) -> Path | None:
        if name in self.paths:
            return self.paths[name]
        if self.root is None or not _NAME_RE.match(name) or name in (".", ".."):
            return None
        path = self.root / name
        return path if (path / "adapter_config.json").is_file() else None

    def names(self) -> list[str]:
        found = set(self.paths)
        if self.root is not None and self.root.is_dir():
            found |= {p.name for p in self.root.iterdir() if (p / "adapter_config.json").is_file()}
        return sorted(found)

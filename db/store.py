"""The adapter store: validated copies of adapter directories, one directory per version.

``register`` is the one way an adapter enters the system: validate (torch-free,
``db.adapter_check``), copy into the store, write the registry row; on any
failure nothing is left behind, neither row nor files. Layout of ``LocalStore``::

    <root>/<tenant or _>/<id, '/' written as '~'>/v<version>/{adapter_config.json, adapter_model.safetensors}

Old versions stay until the adapter is removed, so a worker still serving
version n can finish while n+1 is registered. An object store (S3) would
implement the same ``AdapterStore`` interface: stage = upload under a temporary
key, commit = move to the version's key.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from sqlmodel import Session

from db.adapter_check import (CONFIG_FILE, WEIGHTS_FILE, AdapterManifest, AdapterValidationError,
                              BaseModelShape, inspect_adapter, read_config, sha256_file)
from db.adapters import Adapter, Visibility, register_adapter, validate_adapter_id
from db.groups import adapter_group

__all__ = ["AdapterStore", "AdapterValidationError", "BaseModelShape", "LocalStore", "StagedAdapter",
           "StoredAdapter", "register", "resolve_source", "unregister"]

STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
DEFAULT_MAX_RANK = 64          # the worker's default max_lora_rank
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class StagedAdapter:
    """A copy of an adapter inside the store that is not yet visible under any version."""
    location: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class StoredAdapter:
    uri: str
    sha256: str
    bytes: int


def resolve_source(src: str | Path) -> Path:
    """A local directory from a path or a ``file://`` URI (other schemes are not supported yet)."""
    text = str(src)
    if "://" in text:
        url = urlparse(text)
        if url.scheme != "file":
            raise AdapterValidationError(f"{text}: only local paths and file:// URIs can be registered, "
                                         f"not {url.scheme}://")
        if url.netloc not in ("", "localhost"):
            raise AdapterValidationError(f"{text}: file:// URI names host {url.netloc!r}; use file:///abs/path")
        return Path(unquote(url.path))
    return Path(text).expanduser()


def check_tenant(tenant: str | None) -> str | None:
    if tenant is not None and not TENANT_RE.fullmatch(tenant):
        raise AdapterValidationError(f"invalid tenant {tenant!r}: 1-128 chars of [A-Za-z0-9._-] starting "
                                     "with a letter or digit")
    return tenant


class AdapterStore(ABC):
    """Where adapter files live; the registry row holds the URI that ``commit`` returns."""

    @abstractmethod
    def stage(self, src: Path) -> StagedAdapter:
        """Copy the adapter files of ``src`` into the store, not yet visible."""

    @abstractmethod
    def commit(self, staged: StagedAdapter, tenant: str | None, adapter_id: str, version: int) -> StoredAdapter:
        """Make a staged copy the given version (replacing an orphan left by a crash)."""

    @abstractmethod
    def discard(self, staged: StagedAdapter) -> None:
        """Forget a staged copy."""

    @abstractmethod
    def open(self, uri: str) -> Path:
        """A local directory holding the adapter at ``uri`` (a download for remote stores)."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove one version."""

    @abstractmethod
    def delete_adapter(self, tenant: str | None, adapter_id: str) -> None:
        """Remove every version of an adapter."""

    def put(self, src: str | Path, tenant: str | None, adapter_id: str, version: int) -> StoredAdapter:
        """Stage and commit in one go (no registry row is written)."""
        staged = self.stage(resolve_source(src))
        try:
            return self.commit(staged, tenant, adapter_id, version)
        except BaseException:
            self.discard(staged)
            raise


class LocalStore(AdapterStore):
    """A directory tree on a local (or network-mounted) filesystem; renames make versions appear atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self._tmp = self.root / ".tmp"

    def adapter_dir(self, tenant: str | None, adapter_id: str) -> Path:
        return self.root / (check_tenant(tenant) or "_") / validate_adapter_id(adapter_id).replace("/", "~")

    def version_dir(self, tenant: str | None, adapter_id: str, version: int) -> Path:
        return self.adapter_dir(tenant, adapter_id) / f"v{int(version)}"

    def stage(self, src: Path) -> StagedAdapter:
        self._tmp.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / uuid.uuid4().hex
        tmp.mkdir()
        try:
            for name in STORED_FILES:
                shutil.copyfile(src / name, tmp / name)
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            weights = tmp / WEIGHTS_FILE
            return StagedAdapter(str(tmp), sha256_file(weights), weights.stat().st_size)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, staged: StagedAdapter, tenant: str | None, adapter_id: str, version: int) -> StoredAdapter:
        final = self.version_dir(tenant, adapter_id, version)
        self._no_symlink_below_root(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            # No row points here (the registry just handed out this version): a crash's leftover.
            orphan = self._tmp / f"orphan-{uuid.uuid4().hex}"
            os.rename(final, orphan)
            shutil.rmtree(orphan, ignore_errors=True)
        os.rename(staged.location, final)
        _fsync_dir(final.parent)
        return StoredAdapter(final.as_uri(), staged.sha256, staged.bytes)

    def discard(self, staged: StagedAdapter) -> None:
        shutil.rmtree(staged.location, ignore_errors=True)

    def open(self, uri: str) -> Path:
        path = self._inside(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"{uri} is not in the store (was the adapter removed?)")
        return path

    def delete(self, uri: str) -> None:
        shutil.rmtree(self._inside(uri), ignore_errors=True)
        self._prune_empty(self._inside(uri).parent)

    def delete_adapter(self, tenant: str | None, adapter_id: str) -> None:
        path = self.adapter_dir(tenant, adapter_id)
        self._no_symlink_below_root(path.parent)
        if path.exists():
            trash = self._tmp / f"deleted-{uuid.uuid4().hex}"
            self._tmp.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)          # gone from view at once, then removed
            shutil.rmtree(trash, ignore_errors=True)
        self._prune_empty(path.parent)

    def _no_symlink_below_root(self, path: Path) -> None:
        """Refuse to write through a symlink planted in the store (it could point anywhere)."""
        for p in (path, *path.parents):
            if p == self.root:
                return
            if p.is_symlink():
                raise ValueError(f"{p} is a symlink; refusing to write an adapter outside the store {self.root}")
        raise ValueError(f"{path} is not inside the store at {self.root}")

    def _inside(self, uri: str) -> Path:
        path = resolve_source(uri).resolve()
        if self.root not in path.parents:
            raise ValueError(f"{uri} is not inside the store at {self.root}")
        return path

    def _prune_empty(self, path: Path) -> None:
        while path != self.root and self.root in path.parents:
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def register(session: Session, store: AdapterStore, src: str | Path, adapter_id: str, *,
             tenant: str | None = None, base_model: str | Path | BaseModelShape | None = None,
             max_rank: int = DEFAULT_MAX_RANK, public: bool = False, name: str | None = None,
             group: str | None = None) -> Adapter:
    """Validate the adapter at ``src``, copy it into ``store`` and write its registry row; commits ``session``.

    ``base_model``: a model directory (its ``config.json``) or a ``BaseModelShape``;
    None checks shapes only for internal consistency. Re-registering an id
    bumps its version and stores a new version directory. Raises
    ``AdapterValidationError`` (or ``AdapterOwnershipError``); on any failure
    the session is rolled back and no files are left in the store.
    """
    try:
        validate_adapter_id(adapter_id)
    except ValueError as e:
        raise AdapterValidationError(str(e)) from e
    check_tenant(tenant)
    base = base_model if isinstance(base_model, BaseModelShape) or base_model is None \
        else BaseModelShape.from_dir(base_model)
    root = resolve_source(src)
    manifest = inspect_adapter(root, base, max_rank)
    staged = store.stage(root)
    stored = None
    try:
        # what we keep must be what we checked, even if the source changed meanwhile
        if staged.sha256 != manifest.sha256 or read_config(Path(staged.location) / CONFIG_FILE) != manifest.config:
            raise AdapterValidationError(f"{root} changed while it was being registered; try again")
        row = register_adapter(session, _row(adapter_id, name, tenant, public, group, base, manifest))
        stored = store.commit(staged, tenant, adapter_id, row.version)
        row.storage_uri = stored.uri
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        if stored is not None:
            store.delete(stored.uri)
        else:
            store.discard(staged)
        raise
    session.refresh(row)        # usable after the session closes, whatever its expire_on_commit
    return row


def _row(adapter_id: str, name: str | None, tenant: str | None, public: bool, group: str | None,
         base: BaseModelShape | None, m: AdapterManifest) -> Adapter:
    return Adapter(
        id=adapter_id, name=name or adapter_id, base_model=(base.name if base else m.base_model_name or "unknown")[:256],
        rank=m.rank, alpha=m.alpha, target_modules=m.target_modules, storage_uri="pending",
        sha256=m.sha256, bytes=m.bytes, tenant=tenant,
        visibility=(Visibility.PUBLIC if public else Visibility.PRIVATE).value,
        group=group or adapter_group(adapter_id))


def unregister(session: Session, store: AdapterStore, adapter_id: str, tenant: str | None = None,
               any_tenant: bool = False) -> Adapter:
    """Delete the row (committed first: a row must never point at missing files), then every stored version.

    Only the owning tenant may remove an adapter unless ``any_tenant`` (admin).
    """
    row = session.get(Adapter, adapter_id)
    if row is None or (not any_tenant and row.tenant != tenant):
        raise LookupError(f"adapter {adapter_id!r} is not registered" +
                          (f" for tenant {tenant!r}" if row is not None else ""))
    owner = row.tenant
    session.delete(row)
    session.commit()
    store.delete_adapter(owner, adapter_id)
    return row

"""The host-memory tier of the adapter cache: validated adapters, LRU by bytes, loaded in the background.

Adapters are registered by name and path (cheap); their weights are read from
disk, validated and (on CUDA) pinned by a background thread the first time a
request needs them, so the engine never stalls on a slow store. Idle host
copies are dropped least-recently-used first once the byte budget is exceeded;
a dropped adapter is simply read again from disk next time. Re-registering a
name bumps its version and drops every cached copy of the old one.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from worker.errors import AdapterError
from worker.lora.peft_format import LoRAAdapter, pin_packed
from worker.lora.pinned_arena import PinnedArena


@dataclass
class Entry:
    name: str
    path: str | None                         # None: given in memory (merged ensembles), never reloaded
    version: int = 1
    adapter: LoRAAdapter | None = None       # the host copy, when loaded
    loading: Future | None = None
    error: str | None = None
    pinned: bool = False                     # never dropped from host memory
    wanted: bool = False                     # loaded for a waiting request that has not picked it up yet
    nbytes: int = 0
    members: set[str] = field(default_factory=set)   # for ensembles: the adapters merged into it


class HostCache:
    def __init__(self, load: Callable[[str, str], LoRAAdapter], max_bytes: int, pin_memory: bool, workers: int = 2,
                 max_inflight: int = 4, pinned_bytes: int = 0):
        self._load = load                    # (name, path) -> validated LoRAAdapter; raises AdapterError
        self.max_bytes = max_bytes
        self.pin_memory = pin_memory
        self.arena = PinnedArena(pinned_bytes) if pin_memory and pinned_bytes else None
        self._entries: OrderedDict[str, Entry] = OrderedDict()     # LRU order: oldest first
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        self.max_inflight = max_inflight     # bounds the loads (and the bytes they add) not yet picked up
        self.loads = 0
        self.hits = 0
        self.misses = 0

    # -- registration ------------------------------------------------------------------------
    def register(self, name: str, path: str | Path | None, adapter: LoRAAdapter | None = None) -> Entry:
        """Add or replace ``name``; with ``adapter`` given, it is on the host at once."""
        with self._lock:
            old = self._entries.get(name)
            entry = Entry(name=name, path=None if path is None else str(path),
                          version=old.version + 1 if old else 1, pinned=bool(old and old.pinned))
            if adapter is not None:
                self._set(entry, adapter)
            self._entries[name] = entry
            self._shrink()
            return entry

    def remove(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(list(self._entries))

    def entry(self, name: str) -> Entry:
        return self._entries[name]

    def version(self, name: str) -> int:
        return self._entries[name].version

    def pin(self, name: str, pinned: bool = True) -> None:
        self._entries[name].pinned = pinned

    # -- the tier ----------------------------------------------------------------------------
    def get(self, name: str) -> LoRAAdapter | None:
        """The host copy if it is loaded; otherwise start loading it in the background and return None.

        Raises AdapterError when the last load failed (the error is cleared, so a later call retries).
        While ``max_inflight`` loads are not yet picked up, no new one starts (a later call retries):
        a queue of many adapters then cannot evict its own loads before they are used.
        """
        with self._lock:
            e = self._entries[name]
            if e.adapter is not None:
                self._entries.move_to_end(name)
                self.hits += 1
                e.wanted = False
                return e.adapter
            if e.error is not None:
                err, e.error, e.wanted = e.error, None, False
                raise AdapterError(err)
            if e.loading is None:
                if e.path is None:
                    raise AdapterError(f"adapter {name!r} was given in memory and has been dropped")
                if sum(x.wanted for x in self._entries.values()) >= self.max_inflight:
                    return None
                self.misses += 1
                e.wanted = True
                e.loading = self._pool.submit(self._background_load, e)
            return None

    def wait(self, name: str, timeout: float | None = None) -> LoRAAdapter:
        """Load ``name`` now (blocking); for callers that want the adapter before anything runs."""
        if self.get(name) is None:
            e = self._entries[name]
            loading = e.loading
            if loading is None:         # no load started: max_inflight loads are awaited already
                self._background_load(e)
            else:
                loading.result(timeout)
        adapter = self.get(name)
        if adapter is None:
            raise AdapterError(f"adapter {name!r} did not load")
        return adapter

    def nbytes(self) -> int:
        with self._lock:                    # a load in flight adds then shrinks under the lock
            return sum(e.nbytes for e in self._entries.values())

    def _background_load(self, e: Entry) -> None:
        try:
            adapter = self._load(e.name, e.path)
            if self.pin_memory:
                pin_packed(adapter, arena=self.arena)
        except Exception as exc:                          # reported to the requests that wait for it
            with self._lock:
                e.loading, e.error = None, str(exc) if isinstance(exc, AdapterError) else f"adapter {e.name!r}: {exc!r}"
            return
        with self._lock:
            e.loading = None
            if self._entries.get(e.name) is e:           # not replaced by a newer version meanwhile
                self._set(e, adapter)
                self.loads += 1
                self._shrink()

    def _set(self, e: Entry, adapter: LoRAAdapter) -> None:
        e.adapter, e.error = adapter, None
        e.nbytes = adapter.nbytes()

    def _shrink(self) -> None:
        """Drop idle host copies, oldest first, until the tier fits its byte budget (save for copies
        still awaited by a request: at most ``max_inflight`` of them)."""
        total = sum(x.nbytes for x in self._entries.values())
        for x in list(self._entries.values()):
            if total <= self.max_bytes:
                break
            if x.adapter is not None and not x.pinned and not x.wanted and x.path is not None:
                total -= x.nbytes
                x.adapter, x.nbytes = None, 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

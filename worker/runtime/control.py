"""Calls into the engine from other threads (Celery control, admin tools), run on the engine thread.

``EngineThread`` owns the engine and never shares it; ``ControlledEngine`` wraps the engine it
is given and runs queued calls at the top of its next ``step()``, between two model steps. An idle
engine thread sleeps on its command queue, so ``BackgroundRuntime.call`` wakes it with an abort of
an id no request has (a no-op for the engine).
"""
from __future__ import annotations

import queue
from concurrent.futures import Future
from typing import Any, Callable

WAKE_ID = "\x00openlora-control-wake"


class ControlledEngine:
    def __init__(self, engine):
        self.__dict__["_engine"] = engine
        self.__dict__["_calls"] = queue.SimpleQueue()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._engine, name, value)

    @property
    def inner(self):
        return self._engine

    def submit(self, fn: Callable[[Any], Any]) -> Future:
        """Queue ``fn(engine)`` for the engine thread; the future holds its return value or exception."""
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    # -- called by the engine thread -------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return not self._calls.empty() or self._engine.has_unfinished()

    def abort(self, request_id: str) -> bool:
        return False if request_id == WAKE_ID else self._engine.abort(request_id)

    def step(self):
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self._engine))
                except Exception as e:    # the caller's error (unknown adapter, ...), not the engine's
                    fut.set_exception(e)
        return self._engine.step()

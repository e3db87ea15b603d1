"""The worker runtime on a background thread with its own event loop, for hosts that own the main
thread (the Celery worker): start, stop, and control calls answered by the engine thread."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from worker.errors import OpenLoRAError
from worker.runtime.config import RuntimeConfig
from worker.runtime.control import WAKE_ID, ControlledEngine
from worker.runtime.runtime import WorkerRuntime

log = logging.getLogger("openlora.worker")


class BackgroundRuntime:
    def __init__(self, cfg: RuntimeConfig):
        self.cfg = cfg
        self.runtime: WorkerRuntime | None = None
        self.engine: ControlledEngine | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="openlora-runtime", daemon=True)

    def start(self, timeout: float = 600) -> BackgroundRuntime:
        """Build the engine and start the runtime; returns once it takes jobs (raises if it failed)."""
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.ready:
            if not self._thread.is_alive():
                raise OpenLoRAError(f"the worker runtime failed to start: {self.error!r}") from self.error
            if time.monotonic() > end:
                raise OpenLoRAError(f"the worker runtime did not start in {timeout} s")
            time.sleep(0.05)
        return self

    @property
    def ready(self) -> bool:
        return self.runtime is not None and hasattr(self.runtime, "thread") and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(self._main())
        except BaseException as e:      # reported by start() / stop()
            self.error = e
            log.exception("worker runtime crashed")

    async def _main(self) -> int:
        from worker.runtime.build import build_engine
        self.loop = asyncio.get_running_loop()
        self.engine = ControlledEngine(await self.loop.run_in_executor(None, build_engine, self.cfg))
        self.runtime = WorkerRuntime(self.cfg, engine=self.engine)
        return await self.runtime.run()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM semantics: stop pulling, finish in-flight jobs within the grace period, exit."""
        if self.loop is not None and self.runtime is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.runtime.request_stop)
        self._thread.join(timeout if timeout is not None else self.cfg.grace_s + 30)
        return self.exit_code

    # -- control -------------------------------------------------------------------------------
    def call(self, fn, timeout: float = 60):
        """Run ``fn(engine)`` on the engine thread between two steps; returns its result or raises."""
        if not self.ready:
            raise OpenLoRAError("the worker runtime is not running")
        fut = self.engine.submit(fn)
        self.loop.call_soon_threadsafe(self.runtime.thread.abort, WAKE_ID)
        return fut.result(timeout)

    def load_adapter(self, name: str, path: str) -> dict:
        adapter = self.call(lambda e: e.add_adapter(name, path))
        self.cfg.adapters.paths[name] = Path(path)     # a re-load after eviction finds it again
        return {"adapter": name, "rank": adapter.rank, "targets": list(adapter.target_modules)}

    def unload_adapter(self, name: str) -> dict:
        self.call(lambda e: e.remove_adapter(name))
        self.cfg.adapters.paths.pop(name, None)
        return {"adapter": name, "unloaded": True}

    def pin_adapter(self, name: str, pinned: bool = True) -> dict:
        self.call(lambda e: e.pin_adapter(name, pinned))
        return {"adapter": name, "pinned": pinned}

    def stats(self) -> dict:
        engine = self.call(lambda e: {"host_adapters": sorted(e.adapters), "gpu_slots": list(e.slots.slot_of),
                                      "pinned": sorted(e.slots.pinned), "running_requests": len(e.seqs),
                                      "device": str(e.device)})
        rt = self.runtime
        return {"worker": self.cfg.worker_id, "fleet": self.cfg.fleet, "inflight_jobs": len(rt.jobs),
                "completed_jobs": rt.completed, "capacity": self.cfg.max_num_seqs, "stopping": rt.stopping, **engine}

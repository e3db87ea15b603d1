"""The Celery app of GPU nodes: ``celery -A worker.celery_app worker --pool solo``.

A bootstep starts the same queue runtime as ``python -m worker.runtime`` inside the Celery
worker process when it starts, and stops it (SIGTERM semantics, with grace) when it shuts down.
Configuration comes from the environment, as ``RuntimeConfig.from_args`` reads it:
``REDIS_URL``, ``OPENLORA_MODEL_DIR`` (required), ``OPENLORA_ADAPTER_DIRS``, ``OPENLORA_DEVICE``, ...
The broker and the result backend are that same Redis unless ``CELERY_BROKER_URL`` /
``CELERY_RESULT_BACKEND`` say otherwise. ``OPENLORA_CELERY_RUNTIME=0`` starts no runtime (a
control-only node).

Batch runs: ``worker.batch_tasks`` registers its tasks on this app; they run on the
``openlora.batch`` queue (``-Q openlora.batch --pool threads``, with ``OPENLORA_CELERY_RUNTIME=0``
on a node without a GPU).

Control is Celery remote control, answered by the running runtime on its engine thread:

    from worker.celery_app import control
    control("stats")                                        # -> [{"gpu-node-1@host": {...}}, ...]
    control("load_adapter", name="sql", path="/adapters/sql", destination=["gpu-node-1@host"])
    control("unload_adapter", name="sql"); control("pin_adapter", name="sql", pinned=True)
"""
from __future__ import annotations

import logging
import os

from celery import Celery, bootsteps
from celery.worker.control import control_command

from producer.batches import BATCH_QUEUE
from worker.errors import OpenLoRAError

log = logging.getLogger("openlora.worker")
COMMANDS = ("stats", "load_adapter", "unload_adapter", "pin_adapter")
_runtime = None     # the BackgroundRuntime of this worker process, once started


def make_app(redis_url: str | None = None) -> Celery:
    url = redis_url or os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    app = Celery("openlora", broker=os.environ.get("CELERY_BROKER_URL", url),
                 backend=os.environ.get("CELERY_RESULT_BACKEND", url))
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
                    # a chunk task is long: take one at a time, so a dead worker holds no others
                    worker_prefetch_multiplier=1,
                    task_routes={name: {"queue": BATCH_QUEUE} for name in
                                 ("openlora.score_chunk", "openlora.finish_run", "openlora.dispatch_run")})
    return app


class OpenLoRARuntime(bootsteps.StartStopStep):
    """Runs the queue runtime beside the Celery consumer for the life of the worker."""

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.runtime = None

    def start(self, worker):
        global _runtime
        if os.environ.get("OPENLORA_CELERY_RUNTIME", "1") == "0":
            log.info("OPENLORA_CELERY_RUNTIME=0: no queue runtime in this Celery worker")
            return
        from worker.runtime.background import BackgroundRuntime
        from worker.runtime.config import RuntimeConfig
        cfg = RuntimeConfig.from_args([])
        if not os.environ.get("OPENLORA_WORKER_ID"):
            cfg.worker_id = worker.hostname.replace("{", "").replace("}", "")
        self.runtime = _runtime = BackgroundRuntime(cfg).start()
        log.info("OpenLoRA runtime %s started inside Celery worker %s", cfg.worker_id, worker.hostname)

    def stop(self, worker):
        global _runtime
        if self.runtime is not None:
            code = self.runtime.stop()
            log.info("OpenLoRA runtime stopped (exit code %s)", code)
            self.runtime = _runtime = None


app = make_app()
app.steps["worker"].add(OpenLoRARuntime)


# -- remote control (runs in the Celery worker; the work itself runs on the engine thread) --------
def _answer(fn, *args) -> dict:
    if _runtime is None:
        return {"ok": False, "error": "no OpenLoRA runtime runs in this Celery worker"}
    try:
        return {"ok": True, **fn(*args)}
    except (OpenLoRAError, KeyError, ValueError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


@control_command(name="openlora_stats")
def _stats(state):
    return _answer(lambda: _runtime.stats())


@control_command(name="openlora_load_adapter", args=[("name", str), ("path", str)], signature="<name> <path>")
def _load_adapter(state, name, path):
    return _answer(lambda: _runtime.load_adapter(name, path))


@control_command(name="openlora_unload_adapter", args=[("name", str)], signature="<name>")
def _unload_adapter(state, name):
    return _answer(lambda: _runtime.unload_adapter(name))


@control_command(name="openlora_pin_adapter", args=[("name", str), ("pinned", bool)], signature="<name> [pinned]")
def _pin_adapter(state, name, pinned=True):
    return _answer(lambda: _runtime.pin_adapter(name, pinned))


def control(command: str, *, celery_app: Celery | None = None, destination: list[str] | None = None,
            timeout: float = 30.0, **arguments) -> list[dict]:
    """Send one of ``COMMANDS`` to the OpenLoRA Celery workers; their replies, one dict per worker."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    return (celery_app or app).control.broadcast(f"openlora_{command}", arguments=arguments, reply=True,
                                                 timeout=timeout, destination=destination)


from worker import batch_tasks  # noqa: E402,F401  (registers the batch-run tasks on ``app``)

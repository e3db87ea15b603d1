"""Admission: whether a job the worker has pulled may run, and the engine request that runs it."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from worker.errors import AdapterError, InvalidRequestError
from worker.runtime.adapter_dirs import AdapterDirectory
from worker.runtime.config import RuntimeConfig
from worker.runtime.engine_thread import EngineRequest
from worker.runtime.job_state import RunningJob, sampling_params

log = logging.getLogger("openlora.worker")


@dataclass
class Refusal:
    """The job ends without running: ``reason`` is its finish reason (error | cancelled | deadline)."""
    reason: str
    error: str | None = None
    dead: bool = False                # also record it in the dead-letter stream


def check(rj: RunningJob, cfg: RuntimeConfig, cancelled: bool) -> Refusal | None:
    """The checks that need no adapter: attempts, cancel, deadline, features, parameters."""
    job, n = rj.job, rj.delivery.deliveries
    if n > cfg.max_attempts:
        return Refusal("error", f"gave up after {n - 1} attempts: the workers running it died or were stopped",
                       dead=True)
    if cancelled or rj.stop_reason == "cancelled":
        return Refusal("cancelled")
    if job.deadline is not None and time.time() >= job.deadline:
        return Refusal("deadline", "the deadline passed before the job started")
    try:
        sampling_params(job)
    except InvalidRequestError as e:
        return Refusal("error", str(e))
    return None


class AdapterLoader:
    """Reads adapters the engine does not hold yet from the adapter directory, off the engine
    thread (disk and validation); the engine thread only registers the result."""

    def __init__(self, directory: AdapterDirectory, engine):
        self.directory, self.engine = directory, engine
        self._loads: dict[str, asyncio.Future] = {}

    async def load(self, name: str):
        path = await asyncio.to_thread(self.directory.resolve, name)     # may ask the registry's database
        if path is None:
            raise AdapterError(f"unknown adapter {name!r}: not loaded on this worker, not in its adapter directory "
                               "nor in the registry")
        if name not in self._loads:
            from worker.lora.peft_format import load_peft_adapter
            e = self.engine
            self._loads[name] = asyncio.get_running_loop().run_in_executor(
                None, load_peft_adapter, name, path, e.model_config, e.config.max_lora_rank, e.config.dtype)
        try:
            return await asyncio.shield(self._loads[name])
        except Exception:
            self._loads.pop(name, None)     # a later job may try again
            raise


async def engine_request(rj: RunningJob, held: set[str], loader: AdapterLoader) -> EngineRequest | Refusal:
    """The engine request of a job, with the adapters it names that the engine lacks read from disk."""
    job = rj.job
    names = [a.id for a in job.adapters] if job.is_ensemble else [job.adapter] if job.adapter else []
    try:
        loras = tuple([await loader.load(n) for n in names if n not in held])
    except AdapterError as e:
        return Refusal("error", str(e))
    except Exception as e:      # a validator's bug must fail the job, not leave it running forever
        log.exception("loading adapter(s) %s for job %s failed", names, rj.id)
        return Refusal("error", f"adapter(s) {', '.join(names)} could not be loaded: {type(e).__name__}: {e}")
    ensemble = None
    if job.is_ensemble:
        strategy = "linear" if job.merge == "cat" else job.merge
        params = job.merge_params.model_dump(exclude_none=True) if job.merge_params else {}
        ensemble = ([(a.id, a.weight) for a in job.adapters], strategy, params)
    prompt = job.prompt if job.prompt is not None else list(job.input_ids)
    completion = job.completion if job.completion is not None else job.completion_ids
    return EngineRequest(rj.id, prompt, job.adapter, sampling_params(job), loras, echo=job.params.echo,
                         ensemble=ensemble, completion=completion, score=job.mode == "score", priority=job.priority)

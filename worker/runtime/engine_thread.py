"""The one thread that owns the engine.

The asyncio side hands it requests and aborts through a thread-safe queue; it
steps the engine while there is work and hands each step's events back to the
event loop with ``call_soon_threadsafe`` (one call per step).

Events (tuples): ``("accepted", rid, prompt_tokens, echo_text)``,
``("rejected", rid, message)``, ``("outputs", [RequestOutput, ...])``,
``("prompt_logprobs", rid, [TokenLogprob | None, ...], first scored position)``,
``("residency", resident_adapters, host_adapters)``, ``("cache", engine.cache_stats())``,
``("crashed", message)``.
"""
from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from worker.errors import OpenLoRAError

log = logging.getLogger("openlora.worker")


@dataclass
class EngineRequest:
    request_id: str
    prompt: str | list[int]
    adapter: str | None
    params: Any                      # SamplingParams
    loras: tuple = ()                # LoRAAdapters loaded off-thread, registered before the request
    echo: bool = False
    ensemble: tuple | None = None    # ([(adapter, weight), ...], strategy, merge params): merged on first use
    completion: Any = None           # mode=score: score this after the prompt (text or ids)
    score: bool = False
    priority: int = 0


class EngineThread:
    def __init__(self, engine, loop, on_events: Callable[[list[tuple]], None]):
        self.engine = engine
        self._loop, self._on_events = loop, on_events
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="openlora-engine", daemon=True)
        self._scoring: dict[str, Any] = {}          # rid -> Sequence, for prompt logprobs (mode=score)
        self._residency: tuple = ()
        self._cache_stats: dict = {}

    def start(self) -> None:
        self._thread.start()

    def add(self, req: EngineRequest) -> None:
        self._commands.put(("add", req))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stop(self, timeout: float | None = None) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout)

    # -- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                events: list[tuple] = []
                stop, aborted = self._apply(self._drain(block=not engine.has_unfinished()), events)
                if stop:
                    return
                if aborted or engine.has_unfinished():
                    outs = engine.step()          # aborts are reported by the next step
                    for out in outs:
                        seq = self._scoring.pop(out.request_id, None) if out.finished else None
                        if seq is not None:
                            events.append(("prompt_logprobs", out.request_id, list(seq.prompt_logprobs),
                                           seq.params.prompt_logprobs_from))
                    events.append(("outputs", outs))
                residency = (tuple(engine.slots.slot_of), tuple(engine.adapters))
                if residency != self._residency:
                    self._residency = residency
                    events.append(("residency", *residency))
                stats = engine.cache_stats()
                if stats != self._cache_stats:
                    self._cache_stats = stats
                    events.append(("cache", stats))
                if events:
                    self._loop.call_soon_threadsafe(self._on_events, events)
        except Exception as e:   # a bug or a device error: the runtime leaves its jobs for reclaim and exits
            log.error("engine thread crashed:\n%s", traceback.format_exc())
            self._loop.call_soon_threadsafe(self._on_events, [("crashed", f"{type(e).__name__}: {e}")])

    def _drain(self, block: bool) -> list[tuple]:
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(self, cmds: list[tuple], events: list[tuple]) -> tuple[bool, bool]:
        engine, aborted = self.engine, False
        for cmd in cmds:
            if cmd[0] == "stop":
                return True, aborted
            if cmd[0] == "abort":
                aborted |= engine.abort(cmd[1])
                continue
            req: EngineRequest = cmd[1]
            try:
                for lora in req.loras:
                    if lora.name not in engine.adapters:
                        engine.add_lora(lora)
                adapter, prompt = req.adapter, req.prompt
                if req.ensemble is not None:
                    members, strategy, params = req.ensemble
                    adapter = engine.ensemble(members, strategy, **params)
                if req.score:
                    prompt, req.params.prompt_logprobs_from = engine.encode_pair(prompt, req.completion)
                rid = engine.add_request(req.request_id, prompt, adapter, req.params, req.priority)
            except OpenLoRAError as e:      # InvalidRequestError, AdapterError: the job's fault
                events.append(("rejected", req.request_id, str(e)))
                continue
            seq = engine.seqs.get(rid) if hasattr(engine, "seqs") else None
            if seq is not None and req.params.prompt_logprobs is not None:
                self._scoring[rid] = seq
            n_prompt = len(seq.prompt_ids) if seq is not None else 0
            echo = None
            if req.echo and seq is not None and getattr(engine, "tokenizer", None) is not None:
                echo = engine.tokenizer.decode(seq.prompt_ids, skip_special_tokens=True)
            events.append(("accepted", rid, n_prompt, echo))
        return False, aborted

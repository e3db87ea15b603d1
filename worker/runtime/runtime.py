"""The worker's asyncio runtime: pull jobs, feed the engine thread, stream chunks, write results.

Tasks: ``_pull_loop`` (own shards first, then steal what waits too long elsewhere; the
shards' low-priority lanes only with capacity to spare, up to ``batch_share``),
``_upkeep_loop`` (heartbeat, keep own entries fresh, reclaim dead workers' jobs,
sweep cancel flags), ``_cancel_listener`` (pub/sub), ``_writer`` (one transaction per step).
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import redis.asyncio as aredis

from producer import keys
from producer.cursor import text
from producer.errors import JobValidationError
from producer.protocol import JOB_ID_RE, Chunk, Job
from worker.usage import UsageLedger
from worker.runtime.admission import AdapterLoader, Refusal, check, engine_request
from worker.runtime.config import RuntimeConfig
from worker.runtime.engine_thread import EngineThread
from worker.runtime.job_state import Delivery, RunningJob, failed_result
from worker.runtime.shard_queues import ShardQueues

log = logging.getLogger("openlora.worker")


class WorkerRuntime:
    def __init__(self, cfg: RuntimeConfig, engine=None, redis: aredis.Redis | None = None):
        self.cfg, self.engine, self.redis = cfg, engine, redis
        self.router = cfg.router()
        self.jobs: dict[str, RunningJob] = {}
        self.resident: tuple[str, ...] = ()
        self.host: set[str] = set()
        self.stopping = False
        self.exit_code = 0
        self.completed = 0
        self._rr = 0
        self._reclaim_due = False     # upkeep found it time to look for a dead worker's jobs
        self._tasks: set[asyncio.Task] = set()
        self.usage = UsageLedger(cfg.database_url) if cfg.database_url else None
        self.cache_stats: dict[str, int] = {}       # the engine's adapter-cache counters, for the heartbeat

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.redis = self.redis or aredis.Redis.from_url(self.cfg.redis_url)
        if self.engine is None:
            from worker.runtime.build import build_engine
            self.engine = await loop.run_in_executor(None, build_engine, self.cfg)
        self.host = set(self.engine.adapters)
        self.loader = AdapterLoader(self.cfg.adapters, self.engine)
        self.queues = ShardQueues(self.redis, self.cfg)
        await self.queues.setup(self.router.all_lanes())
        self._capacity, self._stop, self._writes = asyncio.Event(), asyncio.Event(), asyncio.Queue()
        self.thread = EngineThread(self.engine, loop, self._on_events)
        self.thread.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError, ValueError):   # not the main thread (embedded use)
                pass
        writer, upkeep = asyncio.create_task(self._writer()), asyncio.create_task(self._upkeep_loop())
        side = [asyncio.create_task(self._pull_loop()), asyncio.create_task(self._cancel_listener())]
        log.info("worker %s ready: fleet %s, shards %s", self.cfg.worker_id, self.cfg.fleet, self.router.all_shards())
        await self._stop.wait()
        await self._shutdown(side, writer, upkeep)
        return self.exit_code

    def request_stop(self) -> None:
        """SIGTERM: stop pulling, finish what runs (up to ``grace_s``), then exit."""
        self.stopping = True
        self._stop.set()

    async def _shutdown(self, side, writer, upkeep) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + (self.cfg.grace_s if self.exit_code == 0 else 0)
        while self.jobs and loop.time() < end:
            await asyncio.sleep(0.02)
        abandoned = list(self.jobs.values())
        for rj in abandoned:              # past the grace period: leave them for another worker
            rj.abandoned = True
            if rj.state in ("submitted", "running"):
                self.thread.abort(rj.id)
        for t in side:
            t.cancel()
        await self._writes.join()
        await self._flush_usage()
        writer.cancel()
        upkeep.cancel()
        if abandoned:
            await self.queues.release([rj.delivery for rj in abandoned])
        self.jobs.clear()
        await loop.run_in_executor(None, self.thread.stop, 10)
        await self.queues.leave()
        await self.redis.aclose()
        log.info("worker %s stopped (%d jobs left for reclaim)", self.cfg.worker_id, len(abandoned))

    # -- taking jobs -------------------------------------------------------------------------
    def own_shards(self) -> list[str]:
        return sorted({keys.BASE_SHARD} | {self.router.shard_of(a) for a in (*self.host, *self.resident)})

    def _rotate(self, shards: list[str]) -> list[str]:
        self._rr += 1
        k = self._rr % len(shards) if shards else 0
        return shards[k:] + shards[:k]

    async def _pull_loop(self) -> None:
        while not self.stopping:
            try:
                free = self.cfg.max_num_seqs - len(self.jobs)
                if free <= 0:
                    self._capacity.clear()
                    try:
                        await asyncio.wait_for(self._capacity.wait(), self.cfg.poll_ms / 1000)
                    except asyncio.TimeoutError:
                        pass
                    continue
                if self._reclaim_due:         # a dead worker's jobs first: under load, free room
                    free -= await self._reclaim(free)     # never lasts until the next upkeep tick
                    if free <= 0:
                        continue
                own = self.own_shards()
                got = await self._pull_round(own, [s for s in self.router.all_shards() if s not in own], free)
                low_free = min(free, self._low_capacity())
                if not got and low_free > 0:
                    low = [keys.lane(s, -1) for s in self.router.all_shards()]
                    own_low = [keys.lane(s, -1) for s in own]
                    got = await self._pull_round(own_low, [s for s in low if s not in own_low], low_free)
                if not got:
                    idle = own + ([keys.lane(s, -1) for s in own] if low_free > 0 else [])
                    self._accept(await self.queues.pull(idle, 1, block_ms=self.cfg.poll_ms))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pull failed; retrying")
                await asyncio.sleep(1)

    def _low_capacity(self) -> int:
        """Low-priority jobs this worker may still take: online jobs keep the rest of the batch."""
        cap = max(1, int(self.cfg.max_num_seqs * self.cfg.batch_share))
        return cap - sum(rj.delivery.shard.endswith(keys.LOW_LANE) for rj in self.jobs.values())

    async def _pull_round(self, own: list[str], others: list[str], free: int) -> int:
        """Pull from ``own`` lanes; failing that, steal from ``others`` what waited past ``steal_after_s``."""
        got = await self._pull_each(self._rotate(own), free)
        if not got and others:
            waiting = await self.queues.waiting_since(others)
            now = time.time()
            ripe = [s for s in self._rotate(others) if now - waiting.get(s, now) >= self.cfg.steal_after_s]
            got = await self._pull_each(ripe, free)
        return got

    async def _pull_each(self, shards: list[str], free: int) -> int:
        got = 0
        for s in shards:
            if got >= free:
                break
            got += self._accept(await self.queues.pull([s], free - got))
        return got

    def _accept(self, deliveries: list[Delivery]) -> int:
        for d in deliveries:
            try:
                job = Job.parse(d.raw) if d.raw is not None else None
            except JobValidationError as e:
                self._refuse_entry(d, f"invalid job: {e}")
                continue
            if job is None:
                self._write(drop=[d])
            elif job.id in self.jobs:
                if self.jobs[job.id].delivery.entry_id != d.entry_id:
                    self._write(drop=[d])         # the same id queued twice: one run serves both
            else:
                rj = self.jobs[job.id] = RunningJob(job, d)
                self._spawn(self._start(rj))
        return len(deliveries)

    def _refuse_entry(self, d: Delivery, error: str) -> None:
        try:
            job_id = json.loads(d.raw).get("id")
        except (ValueError, AttributeError):
            job_id = None
        if isinstance(job_id, str) and JOB_ID_RE.match(job_id):
            res = failed_result(job_id, "error", error, d, self.cfg.worker_id)
            self._write(finished=[(d, res, Chunk(0, "", [], finish_reason="error", error=error))])
        else:
            self._write(dead=[(d, error)], drop=[d])

    async def _start(self, rj: RunningJob) -> None:
        try:
            done, cancelled, prior = await self.queues.preflight(rj.id)
        except Exception:
            log.exception("preflight of %s failed; leaving it for reclaim", rj.id)
            self._forget(rj)
            return
        if done:                                     # a duplicate delivery of a finished job
            self._forget(rj)
            self._write(drop=[rj.delivery])
            return
        rj.set_prior(prior)
        req = check(rj, self.cfg, cancelled) or await engine_request(rj, self.host, self.loader)
        if not isinstance(req, Refusal) and rj.stop_reason:
            req = Refusal(rj.stop_reason)            # cancelled while its adapter loaded
        if isinstance(req, Refusal):
            return self._finish_now(rj, req.reason, req.error, req.dead)
        if rj.job.deadline is not None:
            loop = asyncio.get_running_loop()
            rj.timer = loop.call_at(loop.time() + rj.job.deadline - time.time(), self._abort, rj.id, "deadline")
        rj.state = "submitted"
        self.thread.add(req)

    # -- stopping jobs -----------------------------------------------------------------------
    def _abort(self, job_id: str, reason: str) -> None:
        rj = self.jobs.get(job_id)
        if rj is None or rj.stop_reason or rj.state == "finishing":
            return
        rj.stop_reason = reason
        if rj.state in ("submitted", "running"):
            self.thread.abort(job_id)

    async def _cancel_listener(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as ps:
                    await ps.subscribe(keys.CANCEL_CHANNEL)
                    async for msg in ps.listen():
                        if msg["type"] == "message":
                            self._abort(text(msg["data"]), "cancelled")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancel listener lost its connection; resubscribing")
                await asyncio.sleep(1)

    # -- engine events -----------------------------------------------------------------------
    def _on_events(self, events: list[tuple]) -> None:
        chunks, finished = [], []
        for ev in events:
            kind, rj = ev[0], self.jobs.get(ev[1]) if len(ev) > 1 and isinstance(ev[1], str) else None
            if kind == "accepted" and rj is not None:
                rj.state, rj.prompt_tokens, rj.echo = "running", ev[2], ev[3]
            elif kind == "rejected" and rj is not None:
                self._finish_now(rj, "error", ev[2])
            elif kind == "prompt_logprobs" and rj is not None:
                rj.on_prompt_logprobs(ev[2], ev[3])
            elif kind == "outputs":
                for out in ev[1]:
                    rj = self.jobs.get(out.request_id)
                    if rj is None or rj.abandoned:
                        continue
                    chunk = rj.on_output(out)
                    if not out.finished:
                        if chunk is not None:
                            chunks.append((rj.id, chunk))
                        continue
                    rj.state = "finishing"
                    if rj.timer is not None:
                        rj.timer.cancel()
                    res = rj.result(chunk.finish_reason, self.cfg.worker_id, out.error)
                    finished.append((rj.delivery, res, chunk))
            elif kind == "residency":
                self.resident, self.host = ev[1], set(ev[2])
            elif kind == "cache":
                self.cache_stats = ev[1]
            elif kind == "crashed":
                self.exit_code = 1
                self.request_stop()
        if chunks or finished:
            self._write(chunks=chunks, finished=finished)

    def _finish_now(self, rj: RunningJob, reason: str, error: str | None = None, dead: bool = False) -> None:
        """End a job that will not (or no longer) run in the engine."""
        rj.state = "finishing"
        res = rj.result(reason, self.cfg.worker_id, error)
        self._write(finished=[(rj.delivery, res, rj.closing_chunk(reason, error))],
                    dead=[(rj.delivery, error or reason)] if dead else [])

    def _forget(self, rj: RunningJob) -> None:
        if self.jobs.get(rj.id) is rj:
            del self.jobs[rj.id]
            self._capacity.set()

    # -- writing -----------------------------------------------------------------------------
    def _write(self, chunks=(), finished=(), dead=(), drop=()) -> None:
        self._writes.put_nowait((list(chunks), list(finished), list(dead), list(drop)))

    async def _writer(self) -> None:
        while True:
            chunks, finished, dead, drop = await self._writes.get()
            try:
                await asyncio.shield(self.queues.write(chunks, finished, dead, drop))
                self.completed += len(finished)
            except Exception:   # unacked jobs come back through reclaim
                log.exception("writing outputs failed")
            finally:
                for d, res, _ in finished:
                    rj = self.jobs.get(res.id)
                    if rj is not None and rj.delivery.entry_id == d.entry_id:
                        if self.usage is not None and (res.prompt_tokens or res.completion_tokens):
                            self.usage.add(rj.job.tenant or "default", res.adapter, res.prompt_tokens,
                                           res.completion_tokens)
                        self._forget(rj)
                self._writes.task_done()

    # -- upkeep ------------------------------------------------------------------------------
    async def _upkeep_loop(self) -> None:
        period = self.cfg.heartbeat_ttl_s / 3
        while True:
            try:
                await self._upkeep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("upkeep failed")
            await asyncio.sleep(period)

    async def _flush_usage(self) -> None:
        if self.usage is not None:
            try:
                await asyncio.to_thread(self.usage.flush)
            except Exception:       # the counts stay pending for the next flush
                log.exception("writing the usage ledger failed")

    async def _upkeep(self) -> None:
        await self._flush_usage()
        live = [rj for rj in self.jobs.values() if not rj.abandoned]
        await self.queues.heartbeat({
            "worker": self.cfg.worker_id, "adapters": list(self.resident), "host_adapters": sorted(self.host),
            "shards": self.own_shards(), "inflight": len(live), "capacity": self.cfg.max_num_seqs,
            "completed": self.completed, "stopping": int(self.stopping), "at": round(time.time(), 3),
            **{f"cache_{k}": v for k, v in self.cache_stats.items()}})
        by_shard: dict[str, list[str]] = {}
        for rj in live:
            by_shard.setdefault(rj.delivery.shard, []).append(rj.delivery.entry_id)
        await self.queues.touch(by_shard)
        running = [rj.id for rj in live if rj.state in ("submitted", "running")]
        for job_id in await self.queues.cancelled(running) if running else []:
            self._abort(job_id, "cancelled")
        self._reclaim_due = True          # the pull loop reclaims, before it pulls new jobs

    async def _reclaim(self, free: int) -> int:
        """Take over jobs idle past the heartbeat TTL (their worker died), up to ``free``; while that
        fills ``free`` there may be more, so the reclaim stays due."""
        self._reclaim_due, got = False, 0            # (not due again after an error: upkeep re-arms it)
        for shard in self._rotate(self.router.all_lanes()):
            if self.stopping or got >= free:
                break
            got += self._accept(await self.queues.reclaim(shard, free - got))
        self._reclaim_due = got >= free
        return got

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

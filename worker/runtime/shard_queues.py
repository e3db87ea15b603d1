"""The worker's side of the Redis queues: pull, steal, reclaim, heartbeat, and write outputs.

Every write a job's end needs (last chunk, result, ack, delete) is one MULTI, so a
job is never acknowledged without its result, nor has a result and stays queued.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys
from producer.cursor import field, text
from producer.protocol import Chunk, JobResult
from producer.scripts import PUBLISH_CHUNK
from worker.runtime.config import RuntimeConfig
from worker.runtime.job_state import Delivery

log = logging.getLogger("openlora.worker")
OUTAGE_S = 60.0          # how long writes ride out an unreachable Redis before the job is left for reclaim


class ShardQueues:
    def __init__(self, redis: aredis.Redis, cfg: RuntimeConfig):
        self.redis, self.cfg = redis, cfg
        self.group, self.me = cfg.fleet, cfg.worker_id
        self._publish_sha: str | None = None

    async def setup(self, shards: list[str]) -> None:
        for s in shards:
            await self.ensure_group(s)
        self._publish_sha = await self.redis.script_load(PUBLISH_CHUNK)

    async def ensure_group(self, shard: str) -> None:
        try:
            await self.redis.xgroup_create(keys.jobs(shard), self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- taking jobs -------------------------------------------------------------------------
    async def pull(self, shards: list[str], count: int, block_ms: int | None = None) -> list[Delivery]:
        """New entries of ``shards``; with ``block_ms``, wait for the first (at most one per shard)."""
        if not shards or count < 1:
            return []
        streams = {keys.jobs(s): ">" for s in shards}
        try:
            reply = await self.redis.xreadgroup(self.group, self.me, streams, count=count, block=block_ms)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            for s in shards:                   # the stream was deleted under us: recreate
                await self.ensure_group(s)
            return []
        by_key = {keys.jobs(s): s for s in shards}
        return [Delivery(by_key[text(k)], text(eid), _job_field(f)) for k, entries in reply or () for eid, f in entries]

    async def waiting_since(self, shards: list[str]) -> dict[str, float]:
        """shard -> enqueue time (unix s) of its oldest job no worker has taken yet."""
        async with self.redis.pipeline(transaction=False) as p:
            for s in shards:
                p.xinfo_groups(keys.jobs(s))
            infos = await p.execute(raise_on_error=False)
        last = {}
        for s, groups in zip(shards, infos):
            if isinstance(groups, Exception):
                continue
            for g in groups:
                if text(g["name"]) == self.group:
                    last[s] = text(g["last-delivered-id"])
        async with self.redis.pipeline(transaction=False) as p:
            for s, lid in last.items():
                p.xrange(keys.jobs(s), min=f"({lid}", count=1)
            firsts = await p.execute()
        return {s: int(text(e[0][0]).split("-")[0]) / 1000 for s, e in zip(last, firsts) if e}

    async def reclaim(self, shard: str, count: int) -> list[Delivery]:
        """Take over entries idle past the heartbeat TTL (their worker died), with delivery counts.

        XPENDING IDLE finds them anywhere in the pending list; XAUTOCLAIM from 0-0 with a small
        COUNT only looks at the first 10*COUNT entries, which under load are live workers' — the
        dead worker's jobs behind them were never found."""
        key = keys.jobs(shard)
        try:
            idle = await self.redis.xpending_range(key, self.group, min="-", max="+", count=count,
                                                   idle=self.cfg.reclaim_idle_ms)
            claimed = await self.redis.xclaim(key, self.group, self.me, self.cfg.reclaim_idle_ms,
                                              [e["message_id"] for e in idle]) if idle else []
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group(shard)     # Redis lost the stream or its group (a restart without AOF)
            return []
        entries = [(text(eid), f) for eid, f in claimed if f is not None]
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as p:
            for eid, _ in entries:
                p.xpending_range(key, self.group, min=eid, max=eid, count=1)
            pending = await p.execute()
        return [Delivery(shard, eid, _job_field(f), (pe[0]["times_delivered"] if pe else 2))
                for (eid, f), pe in zip(entries, pending)]

    async def touch(self, entries: dict[str, list[str]]) -> None:
        """Reset the idle time of the entries this worker still runs, so nobody reclaims them."""
        async with self.redis.pipeline(transaction=False) as p:
            for shard, ids in entries.items():
                if ids:
                    p.xclaim(keys.jobs(shard), self.group, self.me, 0, ids, justid=True)
            await p.execute(raise_on_error=False)

    async def release(self, deliveries: list[Delivery]) -> None:
        """Hand entries back at once (shutdown past grace): mark them idle enough to be reclaimed."""
        async with self.redis.pipeline(transaction=False) as p:
            for d in deliveries:
                p.xclaim(keys.jobs(d.shard), self.group, self.me, 0, [d.entry_id], idle=self.cfg.reclaim_idle_ms,
                         justid=True)
            await p.execute(raise_on_error=False)

    async def preflight(self, job_id: str) -> tuple[bool, bool, list[Chunk]]:
        """(result already written, cancel requested, chunks already in the replay stream)."""
        return await _riding_out_outage(self._preflight_once, job_id)

    async def _preflight_once(self, job_id: str) -> tuple[bool, bool, list[Chunk]]:
        async with self.redis.pipeline(transaction=False) as p:
            p.exists(keys.result(job_id))
            p.exists(keys.cancel_flag(job_id))
            p.xrange(keys.replay(job_id))
            done, cancelled, entries = await p.execute()
        return bool(done), bool(cancelled), [Chunk.from_json(field(f, "data")) for _, f in entries]

    async def cancelled(self, job_ids: list[str]) -> list[str]:
        async with self.redis.pipeline(transaction=False) as p:
            for j in job_ids:
                p.exists(keys.cancel_flag(j))
            flags = await p.execute()
        return [j for j, f in zip(job_ids, flags) if f]

    # -- writing outputs ---------------------------------------------------------------------
    async def write(self, chunks: list[tuple[str, Chunk]] = (), finished: list[tuple[Delivery, JobResult, Chunk]] = (),
                    dead: list[tuple[Delivery, str]] = (), drop: list[Delivery] = ()) -> None:
        """In one transaction: a step's chunks; the ends of finished jobs (last chunk, result, ack);
        dead letters; and entries to drop unread (ack only). Re-running it is harmless: chunks
        dedupe by seq, the first result stays, acks are idempotent — so while Redis is unreachable (a restart)
        it is retried, for up to ``OUTAGE_S``: a step's chunks dropped would leave clients a gap."""
        await _riding_out_outage(self._write_once, chunks, finished, dead, drop)

    async def _write_once(self, chunks, finished, dead, drop) -> None:
        for _ in range(2):
            async with self.redis.pipeline(transaction=True) as p:
                for job_id, c in chunks:
                    self._publish(p, job_id, c)
                for d, res, c in finished:
                    self._publish(p, res.id, c)
                    for name, value in res.to_hash().items():   # the first end wins, as for the final
                        p.hsetnx(keys.result(res.id), name, value)  # chunk: a zombie's late end is dropped
                    p.expire(keys.result(res.id), self.cfg.result_ttl_s)
                    p.delete(keys.cancel_flag(res.id))
                for d, reason in dead:
                    p.xadd(keys.dead_letter(d.shard), {"job": d.raw or "", "entry": d.entry_id, "reason": reason,
                                                       "deliveries": d.deliveries, "worker": self.me,
                                                       "at": f"{time.time():.3f}"}, maxlen=100_000, approximate=True)
                for d in [f[0] for f in finished] + list(drop):
                    p.xack(keys.jobs(d.shard), self.group, d.entry_id)
                    p.xdel(keys.jobs(d.shard), d.entry_id)
                replies = await p.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            self._publish_sha = await self.redis.script_load(PUBLISH_CHUNK)   # Redis lost its script cache
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise errors[0]

    def _publish(self, p, job_id: str, c: Chunk) -> None:
        marker = json.dumps({"finish_reason": c.finish_reason, **({"error": c.error} if c.error else {})})[1:]
        p.evalsha(self._publish_sha, 1, keys.replay(job_id), c.seq, c.end, c.to_json(), self.cfg.replay_maxlen,
                  self.cfg.replay_ttl_s, keys.tokens(job_id), int(c.final), marker)

    # -- presence ----------------------------------------------------------------------------
    async def heartbeat(self, info: dict) -> None:
        key = keys.worker(self.group, self.me)
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(key)
            p.hset(key, mapping={k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in info.items()})
            p.pexpire(key, int(self.cfg.heartbeat_ttl_s * 1000))
            p.sadd(keys.workers(self.group), self.me)
            await p.execute()

    async def leave(self) -> None:
        await self.redis.delete(keys.worker(self.group, self.me))
        await self.redis.srem(keys.workers(self.group), self.me)


async def _riding_out_outage(fn, *args):
    """``fn(*args)``, retried on connection errors (Redis restarting) for up to ``OUTAGE_S``."""
    end, backoff = time.monotonic() + OUTAGE_S, 0.05
    while True:
        try:
            return await fn(*args)
        except (RedisConnectionError, RedisTimeoutError) as e:
            if time.monotonic() > end:
                raise
            log.warning("redis unreachable (%s); retrying in %.2f s", e, backoff)
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)


def _job_field(fields) -> str | None:
    if fields is None:
        return None
    v = field(fields, "job")
    return text(v) if v is not None else None

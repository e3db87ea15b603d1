"""Many followers of job replay streams over one Redis connection.

``AsyncClient.stream`` holds a Redis connection per follower (its XREAD BLOCK), which caps a relay
at its pool size (redis-py's default: 100 connections) and costs Redis a client per websocket.
``StreamHub`` gives each follower a catch-up read (XRANGE) and then feeds it from one XREAD BLOCK
loop over every stream still followed, so 1,000 websocket clients cost one blocked connection.
Chunks go through ``ChunkCursor``, so a follower sees each chunk once, in order, as with ``stream``.
Connection errors (a Redis restart) are retried; followers simply wait.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys
from producer.cursor import ChunkCursor, text
from producer.protocol import Chunk, JobResult

log = logging.getLogger("openlora.relay")
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


@dataclass(eq=False)
class _Follower:
    key: str
    last_id: str
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)


class StreamHub:
    def __init__(self, redis: aredis.Redis, *, block_ms: int = 100, count: int = 512, outage_s: float = 60.0):
        self.redis, self.block_ms, self.count, self.outage_s = redis, block_ms, count, outage_s
        self._by_key: dict[str, set[_Follower]] = {}
        self._task: asyncio.Task | None = None

    @property
    def following(self) -> int:
        return sum(len(f) for f in self._by_key.values())

    async def follow(self, job_id: str, from_seq: int = 0) -> AsyncIterator[Chunk]:
        """The job's chunks from token ``from_seq`` on, each once and in order, up to the final one."""
        key, cur = keys.replay(job_id), ChunkCursor(from_seq)
        while not cur.done:                                   # catch up on what is stored
            entries = await self._retry(self.redis.xrange, key, min=f"({cur.last_id}", count=self.count)
            if not entries:
                break
            for c in cur.feed(entries):
                yield c
        if cur.done:
            return
        res = await self._retry(self._result, job_id)
        if res is not None:                    # finished, and its replay stream expired or was trimmed
            for c in cur.feed(await self._retry(self.redis.xrange, key, min=f"({cur.last_id}")):
                yield c
            if not cur.done:
                yield cur.from_result(res)
            return
        f = _Follower(key, cur.last_id)
        self._by_key.setdefault(key, set()).add(f)
        self._start()
        try:
            while not cur.done:
                for c in cur.feed(await f.inbox.get()):
                    yield c
        finally:
            followers = self._by_key.get(key)
            if followers is not None:
                followers.discard(f)
                if not followers:
                    del self._by_key[key]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- the one reader ------------------------------------------------------------------------
    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:   # (a client reused
            self._task = loop.create_task(self._read_loop())                                # across asyncio.run)

    async def _read_loop(self) -> None:
        backoff = 0.05
        while self._by_key:
            streams = {k: min((f.last_id for f in fs), key=_id) for k, fs in self._by_key.items()}
            try:
                reply = await self.redis.xread(streams, count=self.count, block=self.block_ms)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except TRANSIENT as e:
                log.warning("relay stream reader: %s; retrying in %.2f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            for k, entries in reply or ():
                k = text(k)
                for f in list(self._by_key.get(k, ())):
                    last = _id(f.last_id)
                    mine = [(eid, fl) for eid, fl in entries if _id(text(eid)) > last]
                    if mine:
                        f.last_id = text(mine[-1][0])
                        f.inbox.put_nowait(mine)
        self._task = None

    async def result(self, job_id: str) -> JobResult | None:
        """The job's result (None while it runs), riding out a Redis restart like the reads."""
        return await self._retry(self._result, job_id)

    async def _result(self, job_id: str) -> JobResult | None:
        return JobResult.from_hash(await self.redis.hgetall(keys.result(job_id)))

    async def _retry(self, fn, *args, **kw):
        """``fn`` riding out a Redis restart: connection errors are retried for up to ``outage_s``."""
        loop = asyncio.get_running_loop()
        end, backoff = loop.time() + self.outage_s, 0.05
        while True:
            try:
                return await fn(*args, **kw)
            except TRANSIENT:
                if loop.time() > end:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)

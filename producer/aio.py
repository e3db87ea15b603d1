"""The asyncio Python client, the same surface as ``Client`` over ``redis.asyncio``."""
from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import redis.asyncio as aredis

from producer import keys
from producer.client import (CANCEL_TTL_S, DEFAULT_QUEUE_LIMIT, DEFAULT_REDIS_URL, DEFAULT_SUBMIT_TTL_S, JobHandle,
                             first_submit, guard_record, prepare)
from producer.cursor import ChunkCursor, is_final, text
from producer.errors import JobNotFoundError, JobTimeoutError, QueueFullError
from producer.protocol import Chunk, Job, JobResult
from producer.scripts import SUBMIT


class AsyncJobHandle(JobHandle):
    def stream(self, **kw):
        return self.client.stream(self.id, **kw)

    async def result(self):
        return await self.client.result(self.id)

    async def wait(self, timeout: float | None = None):
        return await self.client.wait(self.id, timeout)

    async def cancel(self):
        return await self.client.cancel(self.id)


class AsyncClient:
    def __init__(self, url: str | None = None, *, redis_client: aredis.Redis | None = None,
                 router: keys.ShardRouter | None = None, queue_limit: int = DEFAULT_QUEUE_LIMIT,
                 submit_ttl_s: int = DEFAULT_SUBMIT_TTL_S, block_ms: int = 1000):
        self.redis = redis_client or aredis.Redis.from_url(url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
        self.router = router or keys.ShardRouter.from_env()
        self.queue_limit, self.submit_ttl_s, self.block_ms = queue_limit, submit_ttl_s, block_ms
        self._submit = self.redis.register_script(SUBMIT)

    async def submit(self, job: Job | dict | str | None = None, /, **fields) -> AsyncJobHandle:
        job, shard = prepare(job, fields, self.router)       # the same two steps as Client.submit
        prev = await self.redis.set(keys.submitted(job.id), guard_record(job, shard), nx=True, get=True,
                                    ex=self.submit_ttl_s)
        shard, data = first_submit(prev, job, shard)
        status, value = await self._submit(keys=[keys.jobs(shard), keys.enqueued(shard, job.id)],
                                           args=[data, self.queue_limit, self.submit_ttl_s])
        if int(status) < 0:
            if prev is None:
                await self.redis.delete(keys.submitted(job.id))
            raise QueueFullError(shard, int(value), self.queue_limit)
        return AsyncJobHandle(job.id, shard, text(value), prev is None and int(status) == 1,
                              job if prev is None else Job.parse(data), self)

    async def result(self, job_id: str) -> JobResult | None:
        return JobResult.from_hash(await self.redis.hgetall(keys.result(job_id)))

    async def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        end = None if timeout is None else time.monotonic() + timeout
        key = keys.replay(job_id)
        last = await self.redis.xrevrange(key, count=1)
        last_id = text(last[0][0]) if last else "0-0"
        while True:
            res = await self.result(job_id)
            if res is not None:
                return res
            if last and is_final(last[0][1]):
                raise JobNotFoundError(f"job {job_id!r} finished but its result has expired")
            reply = await self.redis.xread({key: last_id}, count=1000, block=self._block_ms(end, job_id))
            for _, entries in reply or ():
                if entries:
                    last = entries[-1:]
                    last_id = text(entries[-1][0])

    async def stream(self, job_id: str, *, from_seq: int = 0, timeout: float | None = None) -> AsyncIterator[Chunk]:
        end = None if timeout is None else time.monotonic() + timeout
        key, cur = keys.replay(job_id), ChunkCursor(from_seq)
        while not cur.done:
            entries = await self.redis.xrange(key, min=f"({cur.last_id}", count=512)
            if not entries:
                break
            for c in cur.feed(entries):
                yield c
        while not cur.done:
            reply = await self.redis.xread({key: cur.last_id}, count=512, block=self._block_ms(end, job_id))
            if reply:
                for _, entries in reply:
                    for c in cur.feed(entries):
                        yield c
                continue
            res = await self.result(job_id)
            if res is not None and not await self.redis.xrange(key, min=f"({cur.last_id}", count=1):
                yield cur.from_result(res)

    async def cancel(self, job_id: str) -> bool:
        if await self.redis.exists(keys.result(job_id)):
            return False
        async with self.redis.pipeline(transaction=False) as p:
            p.set(keys.cancel_flag(job_id), "1", ex=CANCEL_TTL_S)
            p.publish(keys.CANCEL_CHANNEL, job_id)
            await p.execute()
        return True

    async def aclose(self) -> None:
        await self.redis.aclose()

    def _block_ms(self, end: float | None, job_id: str) -> int:
        if end is None:
            return self.block_ms
        left = end - time.monotonic()
        if left <= 0:
            raise JobTimeoutError(f"job {job_id!r} did not finish in time")
        return max(1, min(self.block_ms, int(left * 1000)))

"""The asyncio Python client, the same surface as ``Client`` over ``redis.asyncio``.

Its streams share one XREAD BLOCK (``StreamHub``): following 1,000 jobs at once costs one blocked
Redis connection, not 1,000, and a Redis restart pauses them instead of raising."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import redis.asyncio as aredis

from producer import keys
from producer.client import (CANCEL_TTL_S, DEFAULT_QUEUE_LIMIT, DEFAULT_REDIS_URL, DEFAULT_SUBMIT_TTL_S, JobHandle,
                             first_submit, guard_record, prepare)
from producer.cursor import text
from producer.errors import JobNotFoundError, JobTimeoutError, QueueFullError
from producer.protocol import Chunk, Job, JobResult
from producer.scripts import SUBMIT
from producer.stream_hub import StreamHub


_PAST_THE_END = 1 << 62                 # a from_seq past every token: a stream of the final marker alone


def async_redis(url: str, max_connections: int = 100, wait_s: float = 30.0) -> aredis.Redis:
    """A client whose pool waits (up to ``wait_s``) for a free connection: redis-py's plain pool
    raises MaxConnectionsError as soon as ``max_connections`` commands are in flight, so a burst
    of 1,000 concurrent submits (or HTTP requests) failed instead of queueing."""
    return aredis.Redis(connection_pool=aredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=wait_s))


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
        self.redis = redis_client or async_redis(url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
        self.router = router or keys.ShardRouter.from_env()
        self.queue_limit, self.submit_ttl_s, self.block_ms = queue_limit, submit_ttl_s, block_ms
        self._submit = self.redis.register_script(SUBMIT)
        self.hub = StreamHub(self.redis, block_ms=min(block_ms, 100))   # short: new followers join the next read

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
        """Until the job is finished: follows its replay stream (on the shared reader) to the final chunk."""
        res = await self.hub.result(job_id)
        if res is not None:
            return res
        async for _ in self.stream(job_id, from_seq=_PAST_THE_END, timeout=timeout):
            pass                                    # only the final marker comes past the end
        res = await self.hub.result(job_id)         # written in the final chunk's transaction
        if res is None:
            raise JobNotFoundError(f"job {job_id!r} finished but its result has expired")
        return res

    async def stream(self, job_id: str, *, from_seq: int = 0, timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Yield the job's chunks in order, each once: replay what is stored, then follow live."""
        end = None if timeout is None else time.monotonic() + timeout
        chunks = self.hub.follow(job_id, from_seq)
        try:
            while True:
                try:
                    if end is None:
                        c = await anext(chunks)
                    else:
                        c = await asyncio.wait_for(anext(chunks), max(0.0, end - time.monotonic()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise JobTimeoutError(f"job {job_id!r} did not finish in time") from None
                yield c
        finally:
            await chunks.aclose()

    async def cancel(self, job_id: str) -> bool:
        if await self.redis.exists(keys.result(job_id)):
            return False
        async with self.redis.pipeline(transaction=False) as p:
            p.set(keys.cancel_flag(job_id), "1", ex=CANCEL_TTL_S)
            p.publish(keys.CANCEL_CHANNEL, job_id)
            await p.execute()
        return True

    async def aclose(self) -> None:
        await self.hub.aclose()
        await self.redis.aclose()

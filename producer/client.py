"""The synchronous Python client: submit jobs, stream their tokens, fetch results, cancel.

    client = Client("redis://localhost:6379/0")
    h = client.submit(prompt="Hello", adapter="support-bot", params={"max_tokens": 64})
    for chunk in h.stream():
        print(chunk.text, end="")
    print(h.result().finish_reason)
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from producer import keys
from producer.cursor import ChunkCursor, is_final, text
from producer.errors import JobNotFoundError, JobTimeoutError, QueueFullError
from producer.protocol import Chunk, Job, JobResult
from producer.scripts import SUBMIT

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE_LIMIT = 10_000          # jobs (queued + running) per shard before submit refuses
DEFAULT_SUBMIT_TTL_S = 24 * 3600      # how long a job id stays taken (idempotency window)
CANCEL_TTL_S = 24 * 3600
OUTAGE_S = 60.0                       # how long reads ride out an unreachable Redis (a restart) before raising
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


@dataclass
class JobHandle:
    id: str
    shard: str
    entry_id: str
    created: bool                      # False: this id was already submitted; nothing was enqueued
    job: Job | None = None             # the job as enqueued (seed pinned); the first one's on a resubmit
    client: Any = None

    def stream(self, **kw):
        return self.client.stream(self.id, **kw)

    def result(self):
        return self.client.result(self.id)

    def wait(self, timeout: float | None = None):
        return self.client.wait(self.id, timeout)

    def cancel(self):
        return self.client.cancel(self.id)


def prepare(job: Job | dict | str | None, fields: dict, router: keys.ShardRouter) -> tuple[Job, str]:
    """Validate (raises JobValidationError), pin the seed, pick the shard (its low lane below priority 0)."""
    if job is None:
        job = fields
    elif fields:
        raise TypeError("pass a job or keyword fields, not both")
    job = Job.parse(job).pinned()
    return job, keys.lane(router.shard_of(job.route_key), job.priority)


def guard_record(job: Job, shard: str) -> str:
    return json.dumps({"shard": shard, "job": job.to_json()})


def first_submit(prev, job: Job, shard: str) -> tuple[str, str]:
    """(shard, job json) to enqueue: ours, or those of the first submit of this id."""
    if prev is None:
        return shard, job.to_json()
    rec = json.loads(prev)
    return rec["shard"], rec["job"]


class Client:
    def __init__(self, url: str | None = None, *, redis_client: redis.Redis | None = None,
                 router: keys.ShardRouter | None = None, queue_limit: int = DEFAULT_QUEUE_LIMIT,
                 submit_ttl_s: int = DEFAULT_SUBMIT_TTL_S, block_ms: int = 1000):
        self.redis = redis_client or redis.Redis.from_url(url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
        self.router = router or keys.ShardRouter.from_env()
        self.queue_limit, self.submit_ttl_s, self.block_ms = queue_limit, submit_ttl_s, block_ms
        self._submit = self.redis.register_script(SUBMIT)

    def submit(self, job: Job | dict | str | None = None, /, **fields) -> JobHandle:
        """Enqueue a job; resubmitting an id returns the existing job. Raises JobValidationError, QueueFullError."""
        job, shard = prepare(job, fields, self.router)
        # two steps, each inside one Redis Cluster slot: claim the id (job slot), then enqueue once
        # (shard slot). A resubmit replays step two with the first submit's job, which also
        # finishes a submit whose client died between the steps.
        prev = self.redis.set(keys.submitted(job.id), guard_record(job, shard), nx=True, get=True,
                              ex=self.submit_ttl_s)
        shard, data = first_submit(prev, job, shard)
        status, value = self._submit(keys=[keys.jobs(shard), keys.enqueued(shard, job.id)],
                                     args=[data, self.queue_limit, self.submit_ttl_s])
        if int(status) < 0:
            if prev is None:
                self.redis.delete(keys.submitted(job.id))
            raise QueueFullError(shard, int(value), self.queue_limit)
        return JobHandle(job.id, shard, text(value), prev is None and int(status) == 1,
                         job if prev is None else Job.parse(data), self)

    def result(self, job_id: str) -> JobResult | None:
        """The final result, or None while the job is queued or running (or unknown)."""
        return JobResult.from_hash(self.redis.hgetall(keys.result(job_id)))

    def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Block until the job is finished; follows its replay stream instead of polling."""
        end = None if timeout is None else time.monotonic() + timeout
        key = keys.replay(job_id)
        last = self._read(self.redis.xrevrange, key, count=1)
        last_id = text(last[0][0]) if last else "0-0"
        while True:
            res = self._read(self.result, job_id)
            if res is not None:
                return res
            if last and is_final(last[0][1]):     # the result lands in the same transaction
                raise JobNotFoundError(f"job {job_id!r} finished but its result has expired")
            block = self._block_ms(end, job_id)
            reply = self._read(self.redis.xread, {key: last_id}, count=1000, block=block)
            for _, entries in reply or ():
                if entries:
                    last = entries[-1:]
                    last_id = text(entries[-1][0])

    def stream(self, job_id: str, *, from_seq: int = 0, timeout: float | None = None) -> Iterator[Chunk]:
        """Yield the job's chunks in order, each once: replay what is stored, then follow live."""
        end = None if timeout is None else time.monotonic() + timeout
        key, cur = keys.replay(job_id), ChunkCursor(from_seq)
        while not cur.done:                                  # replay
            entries = self._read(self.redis.xrange, key, min=f"({cur.last_id}", count=512)
            if not entries:
                break
            yield from cur.feed(entries)
        while not cur.done:                                  # follow
            reply = self._read(self.redis.xread, {key: cur.last_id}, count=512, block=self._block_ms(end, job_id))
            if reply:
                for _, entries in reply:
                    yield from cur.feed(entries)
                continue
            res = self._read(self.result, job_id)
            if res is not None and not self._read(self.redis.xrange, key, min=f"({cur.last_id}", count=1):
                yield cur.from_result(res)

    def cancel(self, job_id: str) -> bool:
        """Ask the fleet to stop the job (queued or running); False if it had already finished."""
        if self.redis.exists(keys.result(job_id)):
            return False
        with self.redis.pipeline(transaction=False) as p:
            p.set(keys.cancel_flag(job_id), "1", ex=CANCEL_TTL_S)
            p.publish(keys.CANCEL_CHANNEL, job_id)
            p.execute()
        return True

    def queue_lengths(self) -> dict[str, int]:
        shards = self.router.all_lanes()
        with self.redis.pipeline(transaction=False) as p:
            for s in shards:
                p.xlen(keys.jobs(s))
            return dict(zip(shards, p.execute()))

    def workers(self, fleet: str = "default") -> list[dict]:
        """Live workers of a fleet with what they hold (from their heartbeat hashes)."""
        ids = sorted(text(w) for w in self.redis.smembers(keys.workers(fleet)))
        with self.redis.pipeline(transaction=False) as p:
            for w in ids:
                p.hgetall(keys.worker(fleet, w))
            hashes = p.execute()
        return [{text(k): text(v) for k, v in h.items()} for h in hashes if h]

    def close(self) -> None:
        self.redis.close()

    @staticmethod
    def _read(fn, *args, **kw):
        """A read that rides out a Redis restart: connection errors are retried for up to ``OUTAGE_S``."""
        end, backoff = time.monotonic() + OUTAGE_S, 0.05
        while True:
            try:
                return fn(*args, **kw)
            except TRANSIENT:
                if time.monotonic() > end:
                    raise
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    def _block_ms(self, end: float | None, job_id: str) -> int:
        if end is None:
            return self.block_ms
        left = end - time.monotonic()
        if left <= 0:
            raise JobTimeoutError(f"job {job_id!r} did not finish in time")
        return max(1, min(self.block_ms, int(left * 1000)))


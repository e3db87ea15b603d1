"""Client and queue semantics against a real redis-server, with no worker running."""
from __future__ import annotations

import asyncio
import json

import pytest

from producer import AsyncClient, Client, JobTimeoutError, QueueFullError, ShardRouter, keys
from producer.protocol import Chunk
from producer.scripts import PUBLISH_CHUNK


@pytest.fixture
def fresh(rds):
    rds.flushall()
    return rds


def test_submit_is_idempotent_on_id(fresh, redis_url):
    c = Client(redis_url, router=ShardRouter(8))
    h1 = c.submit(id="job-1", prompt="hello", adapter="ad0", params={"max_tokens": 4})
    h2 = c.submit(id="job-1", prompt="something else", adapter="ad0")
    h3 = c.submit(id="job-1", prompt="hello", adapter="another")          # another shard: still no second job
    assert h1.created and not h2.created and not h3.created
    assert h1.entry_id == h2.entry_id == h3.entry_id and h3.shard == h1.shard
    assert h3.job.prompt == "hello"                                       # the first submit's job
    assert sum(c.queue_lengths().values()) == 1
    stored = json.loads(fresh.xrange(keys.jobs(h1.shard))[0][1][b"job"])
    assert stored["id"] == "job-1" and stored["params"]["seed"] is not None   # seed pinned at submit


def test_submit_finishes_a_half_done_submit(fresh, redis_url):
    c = Client(redis_url)
    # a client that died between claiming the id and enqueueing it
    h = c.submit(id="half", prompt="x")
    fresh.xdel(keys.jobs(h.shard), h.entry_id)
    fresh.delete(keys.enqueued(h.shard, "half"))
    again = c.submit(id="half", prompt="x")
    assert again.shard == h.shard and fresh.xlen(keys.jobs(h.shard)) == 1


def test_queue_full_refuses(fresh, redis_url):
    c = Client(redis_url, queue_limit=3)
    for i in range(3):
        c.submit(id=f"q{i}", prompt="x", adapter="ad1")
    with pytest.raises(QueueFullError) as e:
        c.submit(id="q3", prompt="x", adapter="ad1")
    assert e.value.limit == 3 and e.value.length == 3
    assert not fresh.exists(keys.submitted("q3"))                         # the id is free again
    c.submit(id="q4", prompt="x", adapter=None)                           # other shards are not full


def _publish(r, job_id, chunk: Chunk, maxlen=1000):
    script = r.register_script(PUBLISH_CHUNK)
    marker = json.dumps({"finish_reason": chunk.finish_reason})[1:]
    return script(keys=[keys.replay(job_id)], args=[chunk.seq, chunk.end, chunk.to_json(), maxlen, 60,
                                                    keys.tokens(job_id), int(chunk.final), marker])


def test_replay_dedupes_reruns_and_streams_in_order(fresh, redis_url):
    # a first run publishes 3 tokens and dies; the re-run publishes all 5 and finishes
    first = [Chunk(i, f"t{i}", [i]) for i in range(3)]
    rerun = [Chunk(i, f"t{i}", [i]) for i in range(5)] + [Chunk(5, "", [], finish_reason="length")]
    assert [_publish(fresh, "j", c) for c in first] == [1, 1, 1]
    assert [_publish(fresh, "j", c) for c in rerun] == [0, 0, 0, 1, 1, 1]
    assert _publish(fresh, "j", Chunk(6, "late", [9])) == 0                # nothing after the end
    fresh.hset(keys.result("j"), mapping={"status": "done", "data": json.dumps({"id": "j", "status": "done"})})
    c = Client(redis_url, block_ms=50)
    chunks = list(c.stream("j", timeout=5))
    assert [x.seq for x in chunks] == [0, 1, 2, 3, 4, 5] and chunks[-1].finish_reason == "length"
    assert [x.seq for x in c.stream("j", from_seq=3, timeout=5)] == [3, 4, 5]   # a reconnecting client


def test_rerun_that_ends_early_still_closes_the_stream(fresh, redis_url):
    for i in range(4):
        _publish(fresh, "k", Chunk(i, "x", [i]))
    assert _publish(fresh, "k", Chunk(2, "", [7], finish_reason="stop")) == 1   # diverged, ended at seq 2
    chunks = list(Client(redis_url, block_ms=50).stream("k", timeout=5))
    assert [x.seq for x in chunks] == [0, 1, 2, 3, 4] and chunks[-1].final and chunks[-1].token_ids == []


def test_stream_and_wait_time_out(fresh, redis_url):
    c = Client(redis_url, block_ms=50)
    with pytest.raises(JobTimeoutError):
        list(c.stream("never", timeout=0.2))
    with pytest.raises(JobTimeoutError):
        c.wait("never", timeout=0.2)
    assert c.result("never") is None
    assert c.cancel("never") and fresh.exists(keys.cancel_flag("never"))


def test_async_client(fresh, redis_url):
    async def main():
        c = AsyncClient(redis_url, block_ms=50)
        h = await c.submit(id="a1", prompt="x", adapter="ad2")
        again = await c.submit(id="a1", prompt="x", adapter="ad2")
        for i in range(2):
            _publish(fresh, "a1", Chunk(i, "y", [i], finish_reason="stop" if i == 1 else None))
        fresh.hset(keys.result("a1"), mapping={"status": "done", "data": json.dumps({"id": "a1", "status": "done"})})
        seqs = [ch.seq async for ch in c.stream("a1", timeout=5)]
        res = await c.wait("a1", timeout=5)
        await c.aclose()
        return h, again, seqs, res
    h, again, seqs, res = asyncio.run(main())
    assert h.created and not again.created and seqs == [0, 1] and res.status == "done"

"""Regression tests for two chaos-suite findings on reclaiming a dead (or stalled) worker's jobs:

- they were reclaimed only when a surviving worker had free capacity at its upkeep tick; under
  sustained load the survivors are always full, so the orphans starved until the queue drained.
  Now a due reclaim goes before new pulls.
- with the little capacity a loaded worker frees, XAUTOCLAIM 0-0 COUNT 1 looked at the first 10
  pending entries only — live workers' — and never reached the orphans behind them (full run:
  SIGSTOP past the TTL, no job re-run). Now XPENDING IDLE finds them anywhere.
- once reclaimed, the re-run finished first and the zombie, woken by SIGCONT, then overwrote the
  job's result with its own (attempts 1 — or "expired" if its deadline timer fired meanwhile,
  under a stream that had ended "length"). Now the first end written stays, like the final chunk.
"""
from __future__ import annotations

import asyncio
import signal

import json

import pytest
import redis

from producer import Client, ShardRouter, keys
from tests.chaos.harness import RedisServer
from tests.fleet.conftest import WorkerProc, wait_until
from worker.runtime.config import RuntimeConfig
from worker.runtime.shard_queues import ShardQueues

SEQS = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny):
    r = RedisServer(tmp_path_factory.mktemp("reclaim-redis")).start()
    model_dir, adapters = tiny
    root, logs = next(iter(adapters.values())).parent, tmp_path_factory.mktemp("logs")
    ws = [WorkerProc(r.url, model_dir, root, wid, logs, max_num_seqs=SEQS)
          for wid in ("rp", "rq")]
    yield r, [w.wait_ready() for w in ws]
    for w in ws:
        w.stop()
    r.stop()


def test_orphans_of_a_dead_worker_run_before_the_backlog(fleet):
    r, (p, q) = fleet
    client = Client(r.url, router=ShardRouter(), block_ms=200)
    rds = redis.Redis.from_url(r.url)
    params = {"max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    first = [client.submit(id=f"orphan-{i}", prompt=f"seven wizards {i}", params=params) for i in range(2 * SEQS)]

    def held_by(w):
        return [e["message_id"].decode() for e in rds.xpending_range(keys.jobs("base"), "default", "-", "+", 100,
                                                                      consumername=w.id)]
    assert wait_until(lambda: len(held_by(p)) == SEQS and len(held_by(q)) == SEQS, timeout=60)
    assert wait_until(lambda: all(rds.xlen(keys.replay(h.id)) >= 2 for h in first), timeout=60)
    orphans = [h for h in first if h.entry_id in held_by(p)]
    p.kill(signal.SIGKILL)              # before the backlog goes in: none of its jobs can finish first
    assert p.proc.wait(10) == -9
    # q stays full with the backlog from now on (all of it queued long before p's heartbeat expires)
    backlog = [client.submit(id=f"backlog-{i}", prompt="jolly kings", params={**params, "max_tokens": 48})
               for i in range(300)]
    done = {h.id: client.wait(h.id, timeout=180) for h in orphans + backlog}
    assert all(res.status == "done" for res in done.values())
    orphan_end = max(done[h.id].finished_at for h in orphans)
    backlog_ends = sorted(done[h.id].finished_at for h in backlog)
    assert all(done[h.id].attempts == 2 for h in orphans)
    p75 = backlog_ends[len(backlog_ends) * 3 // 4]
    print(f"orphans done {orphan_end - backlog_ends[0]:.2f} s after the first backlog job; backlog p75 "
          f"{p75 - backlog_ends[0]:.2f} s, last {backlog_ends[-1] - backlog_ends[0]:.2f} s")
    assert orphan_end < p75, \
        "the dead worker's jobs waited for the backlog to drain before anyone reclaimed them"
    client.close()
    rds.close()


def test_reclaim_finds_orphans_behind_many_live_entries(fleet, tiny):
    r, _ = fleet
    rds = redis.Redis.from_url(r.url)
    key = keys.jobs("pel-test")
    rds.xgroup_create(key, "pel", id="0", mkstream=True)
    ids = [rds.xadd(key, {"job": json.dumps({"id": f"pel-{i}", "prompt": "x"})}).decode() for i in range(40)]
    rds.xreadgroup("pel", "live", {key: ">"}, count=30)         # a live worker's 30, at the head
    rds.xreadgroup("pel", "dead", {key: ">"}, count=10)         # a dead worker's 10, behind them
    rds.xclaim(key, "pel", "dead", 0, ids[30:], idle=60_000, justid=True)   # silent for a minute

    async def reclaim():
        from redis.asyncio import Redis
        a = Redis.from_url(r.url)
        cfg = RuntimeConfig(model_dir=str(tiny[0]), fleet="pel", worker_id="survivor", heartbeat_ttl_s=2.0)
        try:
            return await ShardQueues(a, cfg).reclaim("pel-test", 1)    # a loaded worker frees one slot
        finally:
            await a.aclose()
    got = asyncio.run(reclaim())
    assert [d.entry_id for d in got] == [ids[30]] and got[0].deliveries == 2, got
    rds.close()


def test_a_zombies_late_end_does_not_overwrite_the_result(fleet, tiny):
    from producer.protocol import Chunk, JobResult
    from worker.runtime.job_state import Delivery
    r, _ = fleet
    rds = redis.Redis.from_url(r.url)
    key = keys.jobs("zombie-test")
    rds.xgroup_create(key, "zombie", id="0", mkstream=True)
    eid = rds.xadd(key, {"job": json.dumps({"id": "zombie-1", "prompt": "x"})}).decode()

    async def end(worker_id, status, finish, attempts):
        from redis.asyncio import Redis
        a = Redis.from_url(r.url)
        cfg = RuntimeConfig(model_dir=str(tiny[0]), fleet="zombie", worker_id=worker_id)
        try:
            q = ShardQueues(a, cfg)
            await q.setup([])
            res = JobResult(id="zombie-1", status=status, token_ids=[1, 2], finish_reason=finish,
                            attempts=attempts, worker=worker_id)
            await q.write(finished=[(Delivery("zombie-test", eid, "{}", attempts), res,
                                     Chunk(2, "", [], finish_reason=finish))])
        finally:
            await a.aclose()
    asyncio.run(end("rerun", "done", "length", 2))           # the re-run ends first
    asyncio.run(end("zombie", "expired", "deadline", 1))     # then the woken zombie
    res = JobResult.from_hash(rds.hgetall(keys.result("zombie-1")))
    assert (res.status, res.worker, res.attempts) == ("done", "rerun", 2), res
    finals = [f for _, f in rds.xrange(keys.replay("zombie-1")) if b"final" in f]
    assert len(finals) == 1 and json.loads(finals[0][b"data"])["finish_reason"] == "length"
    rds.close()

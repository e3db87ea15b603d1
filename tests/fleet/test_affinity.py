"""Two workers with different adapters: jobs go where their adapter is; idle workers steal;
SIGTERM drains in-flight jobs."""
from __future__ import annotations

import signal

import pytest

from producer import Client, ShardRouter
from tests.fleet.conftest import wait_until

SHARD_MAP = {"ad0": "g0", "ad1": "g1", "ad2": "g2", "ad3": "g3"}
HOLDER = {"ad0": "A", "ad1": "A", "ad2": "B", "ad3": "B"}


@pytest.fixture(scope="module")
def pair(start_worker):
    opts = dict(shard_map=SHARD_MAP, max_num_seqs=8, extra=["--steal-after", "0.25"])
    a = start_worker("A", preload=["ad0", "ad1"], **opts)
    b = start_worker("B", preload=["ad2", "ad3"], **opts)
    return a.wait_ready(), b.wait_ready()


@pytest.fixture(scope="module")
def mapped_client(redis_url):
    c = Client(redis_url, router=ShardRouter(8, SHARD_MAP), block_ms=200)
    yield c
    c.close()


def test_jobs_go_to_the_worker_holding_their_adapter(pair, mapped_client):
    c, hits, total = mapped_client, 0, 0
    for _ in range(5):                                  # bursts both workers have room for
        handles = [(a, c.submit(prompt=f"round trip {i}", adapter=a, params={"max_tokens": 8, "temperature": 0}))
                   for i in range(2) for a in HOLDER]
        for adapter, h in handles:
            res = h.wait(30)
            assert res.status == "done"
            hits += res.worker == HOLDER[adapter]
            total += 1
    share = hits / total
    print(f"\naffinity share: {hits}/{total} = {share:.0%}")
    assert share >= 0.9


def test_idle_worker_steals_instead_of_idling(pair, mapped_client):
    c = mapped_client
    handles = [c.submit(prompt=f"burst {i}", adapter="ad2", params={"max_tokens": 100, "temperature": 0,
                                                                   "ignore_eos": True}) for i in range(32)]
    results = [h.wait(60) for h in handles]
    by = {w: sum(r.worker == w for r in results) for w in ("A", "B")}
    print(f"\nburst of 32 ad2 jobs (held by B, 8 slots): {by}")
    assert all(r.status == "done" and r.completion_tokens == 100 for r in results)
    assert by["A"] >= 1 and by["B"] >= 8


def test_sigterm_finishes_in_flight_jobs(pair, mapped_client):
    a, b = pair
    c = mapped_client
    handles = [c.submit(prompt=f"drain {i}", adapter="ad3", params={"max_tokens": 150, "temperature": 0,
                                                                   "ignore_eos": True}) for i in range(4)]
    streams = [h.stream(timeout=60) for h in handles]
    for s in streams:
        next(s)                                         # every job is running
    b.kill(signal.SIGTERM)
    assert b.proc.wait(30) == 0
    results = [h.wait(10) for h in handles]
    assert all(r.status == "done" and r.worker == "B" and r.attempts == 1 and r.completion_tokens == 150
               for r in results), results
    assert "0 jobs left for reclaim" in b.output()
    assert wait_until(lambda: [w["worker"] for w in c.workers()] == ["A"])   # B left the fleet

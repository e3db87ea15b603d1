"""Regression tests for what the chaos suite found when Redis restarts (AOF on) or when many clients
follow at once — each against a real redis-server and real worker / API / relay processes:

- the worker dropped a step's chunks when its write failed during a Redis restart, leaving a gap
  in the replay stream that every client then saw (now: the write is retried while Redis is down);
- ``Client.stream`` / ``AsyncClient.stream`` raised ConnectionError mid-stream on a restart (now:
  they ride it out and continue where they were);
- ``AsyncClient.stream`` (and so the relay) held one Redis connection per follower and failed past
  redis-py's pool of 100 with MaxConnectionsError (now: one shared XREAD, ``StreamHub``); and a
  burst of concurrent submits (or API requests) failed the same way (now: a pool that waits);
- the API answered 500 with a traceback and the relay dropped the socket without a close frame
  while Redis was down (now: 503 + Retry-After, and a close 1013 after an ``unavailable`` error).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import redis
from websockets.sync.client import connect

from producer import AsyncClient, Client, ShardRouter, keys
from tests.chaos.harness import RedisServer, ServiceProc
from tests.fleet.conftest import WorkerProc, assert_stream_consistent, wait_until

LONG = {"max_tokens": 900, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("aof-redis")).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def worker(aof_redis, tiny, tmp_path_factory):
    model_dir, adapters = tiny
    root = next(iter(adapters.values())).parent
    w = WorkerProc(aof_redis.url, model_dir, root, "outage-w", tmp_path_factory.mktemp("logs"),
                   preload=["ad0", "ad1"], max_num_seqs=16, extra=["--heartbeat-ttl", "3"])
    yield w.wait_ready()
    w.stop()


@pytest.fixture
def client(aof_redis):
    c = Client(aof_redis.url, router=ShardRouter(), block_ms=200)
    yield c
    c.close()


def test_redis_restart_mid_decode_leaves_no_gap(aof_redis, worker, client):
    h = client.submit(id="outage-1", prompt="the quick brown fox", adapter="ad0", params=LONG)
    sync_chunks, async_chunks, errors = [], [], []

    def follow_sync():
        try:
            sync_chunks.extend(client.stream(h.id, timeout=120))
        except Exception as e:              # the bug: ConnectionError raised mid-stream
            errors.append(repr(e))

    def follow_async():
        async def go():
            c = AsyncClient(aof_redis.url, router=ShardRouter())
            try:
                async for chunk in c.stream(h.id, timeout=120):
                    async_chunks.append(chunk)
            finally:
                await c.aclose()
        try:
            asyncio.run(go())
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=follow_sync), threading.Thread(target=follow_async)]
    for t in threads:
        t.start()
    assert wait_until(lambda: client.redis.xlen(keys.replay(h.id)) >= 30, timeout=60, every=0.01)
    aof_redis.restart(down_s=1.5)                 # crash mid-decode: the worker's writes fail meanwhile
    for t in threads:
        t.join(150)
    res = client.wait(h.id, timeout=60)
    assert res.status == "done" and res.completion_tokens == LONG["max_tokens"], res
    fresh = redis.Redis.from_url(aof_redis.url)
    seqs = [(int(f[b"seq"]), int(f[b"end"])) for _, f in fresh.xrange(keys.replay(h.id))]
    fresh.close()
    expect = 0
    for seq, end in seqs:
        assert seq == expect, f"replay stream has a gap or a duplicate at token {expect}: next chunk starts at {seq}"
        expect = end
    assert not errors, errors
    assert_stream_consistent(sync_chunks, res)
    assert_stream_consistent(async_chunks, res)


def test_async_client_follows_more_jobs_than_the_redis_pool_holds(aof_redis, worker, client):
    n = 160                                            # redis-py's default pool holds 100 connections
    handles = [client.submit(id=f"many-{i}", prompt="seven wizards", adapter=f"ad{i % 2}",
                             params={"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}) for i in range(n)]

    async def go():
        c = AsyncClient(aof_redis.url, router=ShardRouter())
        try:
            async def one(job_id):
                return [x async for x in c.stream(job_id, timeout=120)]
            return await asyncio.gather(*(one(h.id) for h in handles))
        finally:
            await c.aclose()
    streams = asyncio.run(go())
    for h, chunks in zip(handles, streams):
        assert_stream_consistent(chunks, client.wait(h.id, timeout=10))


def test_a_burst_of_async_submits_queues_for_connections(aof_redis, worker, client):
    """1,000 concurrent submits on one AsyncClient: the pool waits for free connections."""
    async def go():
        c = AsyncClient(aof_redis.url, router=ShardRouter())
        try:
            return await asyncio.gather(*(c.submit(id=f"burst-{i}", prompt="hex", params={"max_tokens": 1})
                                          for i in range(1000)))
        finally:
            await c.aclose()
    handles = asyncio.run(go())
    assert all(h.created for h in handles)
    assert client.wait("burst-999", timeout=60).status == "done"


def test_redis_that_lost_its_data_does_not_stall_the_worker(aof_redis, worker, client):
    """A Redis restarted without its data (no AOF) has no consumer groups: NOGROUP is recreated,
    not a failing upkeep or pull every tick."""
    before = worker.output().count("NOGROUP")
    fresh = redis.Redis.from_url(aof_redis.url)
    fresh.flushall()
    fresh.close()
    time.sleep(2.5)                                       # a few upkeep ticks (TTL 3 s / 3) meet no groups
    h = client.submit(id="after-flush", prompt="lazy dog", adapter="ad1", params={"max_tokens": 4, "temperature": 0})
    assert client.wait(h.id, timeout=30).status == "done"
    assert worker.output().count("NOGROUP") == before, worker.output()[-3000:]


@pytest.fixture(scope="module")
def services(aof_redis, tiny, tmp_path_factory, worker):
    model_dir, adapters = tiny
    root = next(iter(adapters.values())).parent
    logs = tmp_path_factory.mktemp("svc-logs")
    api = ServiceProc("api", aof_redis.url, model_dir, root, logs)
    relay = ServiceProc("relay", aof_redis.url, model_dir, root, logs)
    yield api.wait_ready(), relay.wait_ready()
    api.stop()
    relay.stop()


def test_api_and_relay_say_unavailable_while_redis_is_down(aof_redis, services, client):
    api, relay = services
    h = client.submit(id="down-1", prompt="jolly kings", adapter="ad1", params={"max_tokens": 4, "temperature": 0})
    client.wait(h.id, timeout=60)
    aof_redis.kill()
    try:
        req = urllib.request.Request(api.url + "/v1/jobs", data=json.dumps({"prompt": "x"}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
        assert json.loads(e.value.read())["error"]["code"] == "unavailable"
        with connect(f"{relay.ws_url}/v1/jobs/{h.id}/stream", open_timeout=30) as ws:
            msg = json.loads(ws.recv(timeout=30))
            assert msg["type"] == "error" and msg["error"]["code"] == "unavailable", msg
            with pytest.raises(Exception):
                ws.recv(timeout=30)
            assert ws.close_code == 1013
    finally:
        aof_redis.start()
    time.sleep(0.5)
    with connect(f"{relay.ws_url}/v1/jobs/{h.id}/stream", open_timeout=30) as ws:   # back: the job replays
        msgs = [json.loads(ws.recv(timeout=30))]
        while msgs[-1]["type"] == "chunk":
            msgs.append(json.loads(ws.recv(timeout=30)))
    assert msgs[-1]["type"] == "result" and msgs[-1]["status"] == "done", msgs[-1]
    assert [t for m in msgs[:-1] for t in m["token_ids"]] == msgs[-1]["token_ids"]
    assert "Traceback" not in api.output(), api.output()[-2000:]

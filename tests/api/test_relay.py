"""The websocket relay with a real ``websockets`` client: late join gets every chunk once, a
reconnect with ``after`` gets no duplicate, auth and tenancy hold, and a worker SIGKILLed
mid-stream (its job re-run elsewhere) shows the client no duplicate and no gap."""
from __future__ import annotations

import json
import threading

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from producer import keys
from tests.fleet.conftest import wait_until

ALICE = {"Authorization": "Bearer key-alice"}
PARAMS = {"max_tokens": 120, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def pair(start_worker):
    p = start_worker("relay-P", preload=["ad0", "ad1", "ad2", "ad3"], max_num_seqs=8)
    q = start_worker("relay-Q", max_num_seqs=8, extra=["--steal-after", "60", "--grace", "0.3"])   # only reclaims
    return p.wait_ready(), q.wait_ready()


def ws_url(relay, job_id, **query):
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return relay.url.replace("http", "ws") + f"/v1/jobs/{job_id}/stream" + (f"?{qs}" if qs else "")


def read_all(ws, limit=None):
    """Messages until the result (or ``limit`` chunks): (chunks, result or None)."""
    chunks = []
    while True:
        msg = json.loads(ws.recv(timeout=60))
        if msg["type"] == "result":
            return chunks, msg
        assert msg["type"] == "chunk", msg
        chunks.append(msg)
        if limit is not None and len(chunks) >= limit:
            return chunks, None


def assert_gapless(chunks, result, start=0):
    seq = start
    for c in chunks:
        assert c["seq"] == seq, [x["seq"] for x in chunks]
        seq = c["end"]
    assert chunks[-1].get("finish_reason") and not any(c.get("finish_reason") for c in chunks[:-1])
    assert [t for c in chunks for t in c["token_ids"]] == result["token_ids"][start:]


def test_late_join_gets_every_chunk_once_in_order(pair, relay, client, rds):
    h = client.submit(id="late-1", tenant="alice", adapter="ad0", prompt="the quick", params=PARAMS)
    assert wait_until(lambda: rds.xlen(keys.replay(h.id)) >= 10, timeout=30, every=0.01)
    with connect(ws_url(relay, h.id), additional_headers=ALICE) as ws:
        chunks, result = read_all(ws)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1000
    assert result["status"] == "done" and result["completion_tokens"] == 120
    assert_gapless(chunks, result)


def test_reconnect_with_after_has_no_duplicates(pair, relay, client):
    h = client.submit(id="resume-1", tenant="alice", adapter="ad1", prompt="SELECT", params=PARAMS)
    with connect(ws_url(relay, h.id, api_key="key-alice")) as ws:      # key as a query parameter
        first, _ = read_all(ws, limit=5)
    after = first[-1]["end"]
    with connect(ws_url(relay, h.id, after=after), additional_headers=ALICE) as ws:
        rest, result = read_all(ws)
    assert rest[0]["seq"] == after
    assert_gapless(first + rest, result)


@pytest.mark.parametrize("headers,query,code", [
    ({"Authorization": "Bearer wrong"}, {}, 4401), ({}, {}, 4401),
    ({"Authorization": "Bearer key-bob"}, {}, 4404),          # alice's job, bob asks
    (ALICE, {"after": "x"}, 4400)])
def test_refusals_close_with_a_code(pair, relay, client, headers, query, code):
    client.submit(id="alice-only", tenant="alice", adapter="ad2", prompt="x", params={"max_tokens": 2})
    with connect(ws_url(relay, "alice-only", **query), additional_headers=headers) as ws:
        msg = json.loads(ws.recv(timeout=10))
        assert msg["type"] == "error" and msg["error"]["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == code


def test_worker_sigkill_mid_stream_no_duplicate_no_gap(pair, relay, client, rds):
    p, q = pair
    h = client.submit(id="crash-ws", tenant="alice", adapter="ad3", prompt="seven wizards",
                      params={**PARAMS, "max_tokens": 200})
    got: dict = {}

    def follow():
        with connect(ws_url(relay, h.id), additional_headers=ALICE) as ws:
            got["chunks"], got["result"] = read_all(ws)
    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert wait_until(lambda: rds.xlen(keys.replay(h.id)) >= 5, timeout=30, every=0.01)
    p.kill()                                   # SIGKILL mid-generation; Q reclaims after the heartbeat TTL
    assert p.proc.wait(10) == -9
    assert rds.xlen(keys.replay(h.id)) < 200
    t.join(90)
    result = got["result"]
    assert result["status"] == "done" and result["worker"] == q.id and result["attempts"] == 2
    assert_gapless(got["chunks"], result)

"""One real worker process on the tiny model: the job lifecycle end to end."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from producer import AsyncClient, keys
from tests.fleet.conftest import assert_stream_consistent, collect, wait_until

PROMPTS = ["the quick brown fox", "adapters serve many tenants", "SELECT name FROM users", "def main():",
           "Bonjour, ça va?"]


@pytest.fixture(scope="module")
def worker(start_worker):
    # ad0, ad1 preloaded; ad2, ad3 are loaded from the adapter directory on first use
    return start_worker("w1", preload=["ad0", "ad1"], extra=["--steal-after", "0.1", "--max-attempts", "2",
                                                            "--engine-options", '{"max_lora_rank": 32}']).wait_ready()


def test_jobs_stream_in_order_and_match_offline_generate(worker, client, reference):
    jobs = list(zip(PROMPTS, ["ad0", "ad1", "ad2", "ad3", None]))
    handles = [client.submit(prompt=p, adapter=a, params={"max_tokens": 12, "temperature": 0}) for p, a in jobs]
    for h, (prompt, adapter) in zip(handles, jobs):
        chunks = collect(client, h.id)
        res = client.wait(h.id, timeout=30)
        ref = reference(prompt, adapter, max_tokens=12, temperature=0.0)
        assert res.status == "done" and res.worker == "w1" and res.adapter == adapter
        assert_stream_consistent(chunks, res)
        assert res.token_ids == ref.token_ids and res.text == ref.text
        assert res.finish_reason == ref.finish_reason and res.completion_tokens == len(ref.token_ids)
    # the heartbeat hash tells others which adapters this worker holds
    assert wait_until(lambda: set(json.loads(client.workers()[0]["host_adapters"])) == {"ad0", "ad1", "ad2", "ad3"})
    assert set(json.loads(client.workers()[0]["adapters"])) <= {"ad0", "ad1", "ad2", "ad3"}


def test_async_client_streams_live(worker, redis_url, reference):
    async def main():
        c = AsyncClient(redis_url, block_ms=200)
        h = await c.submit(prompt="the quick", adapter="ad1", params={"max_tokens": 10, "temperature": 0,
                                                                     "logprobs": 2})
        chunks = [ch async for ch in c.stream(h.id, timeout=30)]
        res = await c.wait(h.id, timeout=30)
        await c.aclose()
        return chunks, res
    chunks, res = asyncio.run(main())
    assert_stream_consistent(chunks, res)
    assert res.token_ids == reference("the quick", "ad1", max_tokens=10, temperature=0.0).token_ids
    assert len(res.logprobs) == 10 and all(len(lp["top"]) >= 2 for lp in res.logprobs)
    assert [lp["token_id"] for lp in res.logprobs] == res.token_ids


def test_echo_and_score_modes(worker, client, reference):
    h = client.submit(prompt="hello world", params={"max_tokens": 4, "temperature": 0, "echo": True})
    res = h.wait(30)
    ref = reference("hello world", None, max_tokens=4, temperature=0.0, echo=True)
    assert res.text == ref.text and res.text.startswith("hello world")
    s = client.submit(prompt="the quick brown fox", adapter="ad0", mode="score", params={"logprobs": 1}).wait(30)
    assert s.status == "done" and s.prompt_tokens == len(s.prompt_logprobs) and s.prompt_logprobs[0] is None
    assert all(lp["logprob"] <= 0 for lp in s.prompt_logprobs[1:]) and s.token_ids == []


def test_ensembles_and_loglik_scoring_match_the_engine(worker, client, reference):
    engine = reference.engine
    members = [("ad0", 0.7), ("ad2", 0.3)]
    ens = engine.ensemble(members, "linear")
    for merge in ("linear", "cat"):
        res = client.submit(prompt="the quick", adapters=[{"id": a, "weight": w} for a, w in members], merge=merge,
                            params={"max_tokens": 8, "temperature": 0}).wait(30)
        assert res.status == "done", res.error
        assert res.token_ids == reference("the quick", ens, max_tokens=8, temperature=0.0).token_ids
    ties = client.submit(prompt="the quick", adapters=[{"id": a, "weight": w} for a, w in members], merge="ties",
                         merge_params={"density": 0.5}, params={"max_tokens": 8, "temperature": 0}).wait(30)
    ties_ref = reference("the quick", engine.ensemble(members, "ties", density=0.5), max_tokens=8, temperature=0.0)
    assert ties.status == "done" and ties.token_ids == ties_ref.token_ids
    # loglik of a completion, alone and under an ensemble
    (want,) = engine.score(["the quick brown"], [" fox jumps"], "ad1", per_token=True)
    got = client.submit(prompt="the quick brown", completion=" fox jumps", adapter="ad1", mode="score",
                        params={"logprobs": 0}).wait(30)
    assert got.status == "done" and got.score["tokens"] == want.tokens
    assert abs(got.score["logprob_sum"] - want.logprob_sum) < 1e-4 and got.score["greedy"] == want.greedy
    assert got.score["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-4)
    (want,) = engine.score(["the quick brown"], [" fox jumps"], ens)
    got = client.submit(prompt="the quick brown", completion=" fox jumps", mode="score",
                        adapters=[{"id": a, "weight": w} for a, w in members]).wait(30)
    assert abs(got.score["logprob_sum"] - want.logprob_sum) < 1e-4 and got.prompt_logprobs is None


def test_cancel_stops_generation(worker, client):
    h = client.submit(prompt="the quick", adapter="ad0", params={"max_tokens": 900, "temperature": 0,
                                                                 "ignore_eos": True})
    seen = []
    for chunk in h.stream(timeout=30):
        seen.append(chunk)
        if len(seen) == 5:
            t0 = time.monotonic()
            assert h.cancel()
    took = time.monotonic() - t0
    res = h.result()
    assert res.status == "cancelled" and res.finish_reason == "cancelled" and seen[-1].finish_reason == "cancelled"
    assert res.completion_tokens < 100 and took < 2.0, (res.completion_tokens, took)
    assert_stream_consistent(seen, res)
    assert not h.cancel()                                   # already finished
    queued = client.submit(prompt="x", adapter="ad0", params={"max_tokens": 5})
    client.cancel(queued.id)                                # may be cancelled before or while it runs
    assert client.wait(queued.id, 30).status in ("cancelled", "done")


def test_deadlines(worker, client):
    deadline = time.time() + 0.5
    h = client.submit(prompt="the quick", adapter="ad1", deadline=deadline,
                      params={"max_tokens": 900, "temperature": 0, "ignore_eos": True})
    res = h.wait(30)
    assert res.status == "expired" and res.finish_reason == "deadline" and 0 < res.completion_tokens < 900
    assert res.finished_at - deadline < 0.5
    late = client.submit(prompt="the quick", deadline=time.time() - 1, params={"max_tokens": 5}).wait(30)
    assert late.status == "expired" and late.completion_tokens == 0 and "before the job started" in late.error


def test_bad_jobs_get_clear_errors_and_the_worker_survives(worker, client, rds):
    cases = {
        client.submit(prompt="x", adapter="no-such-adapter").id: "unknown adapter 'no-such-adapter'",
        client.submit(input_ids=[5] * 1500, adapter="ad0").id: "prompt is 1500 tokens",
        client.submit(input_ids=[10**6], params={"max_tokens": 2}).id: "token ids out of range",
        client.submit(prompt="x", adapters=[{"id": "ad0", "weight": 0.5}, {"id": "nope", "weight": 0.5}]).id:
            "unknown adapter 'nope'",
        client.submit(prompt="x", adapters=[{"id": "ad0", "weight": 0.5}, {"id": "ad3", "weight": 0.5}]).id:
            "over the server's limit",       # k_proj ranks 8 + 32 concatenated: 40 > 32
        client.submit(prompt="x", mode="score", completion=" y" * 1500).id: "prompt is",
    }
    # jobs written by a producer that skipped validation
    base = keys.jobs(keys.BASE_SHARD)
    rds.xadd(base, {"job": json.dumps({"id": "raw-bad-params", "prompt": "x", "params": {"top_p": 0}})})
    cases["raw-bad-params"] = "params.top_p"
    rds.xadd(base, {"job": '{"id": "raw-broken", "prompt": 5}'})
    cases["raw-broken"] = "invalid job: prompt"
    rds.xadd(base, {"job": "not even json"})
    dead_before = rds.xlen(keys.dead_letter(keys.BASE_SHARD))
    for job_id, message in cases.items():
        res = client.wait(job_id, timeout=30)
        assert res.status == "failed" and res.finish_reason == "error" and message in res.error, (job_id, res)
        chunks = collect(client, job_id, 10)
        assert chunks[-1].finish_reason == "error" and message in chunks[-1].error
    deadline = time.monotonic() + 10
    while rds.xlen(keys.dead_letter(keys.BASE_SHARD)) == dead_before and time.monotonic() < deadline:
        time.sleep(0.05)
    dead = rds.xrange(keys.dead_letter(keys.BASE_SHARD))[-1][1]
    assert dead[b"job"] == b"not even json" and b"invalid job" in dead[b"reason"]
    assert worker.proc.poll() is None
    ok = client.submit(prompt="still alive", params={"max_tokens": 3, "temperature": 0}).wait(30)
    assert ok.status == "done" and ok.completion_tokens == 3
    assert rds.xlen(base) == 0                              # every entry acknowledged and deleted


def test_resubmitted_job_runs_once(worker, client, rds):
    h1 = client.submit(id="once", prompt="the quick", params={"max_tokens": 6, "temperature": 0})
    h2 = client.submit(id="once", prompt="the quick", params={"max_tokens": 6, "temperature": 0})
    res = h1.wait(30)
    h3 = client.submit(id="once", prompt="the quick", params={"max_tokens": 6, "temperature": 0})
    assert h1.created and not h2.created and not h3.created
    assert res.status == "done" and res.attempts == 1
    assert rds.xlen(keys.replay("once")) == 6 and sum(client.queue_lengths().values()) == 0


def test_job_that_keeps_dying_goes_to_dead_letter(worker, client, rds):
    # a job delivered to a consumer that never finished it, as often as max_attempts (2) allows
    shard = keys.BASE_SHARD
    stream = keys.jobs(shard)
    rds.xgroup_createconsumer(stream, "default", "ghost")
    job = json.dumps({"id": "poison", "prompt": "x", "params": {"max_tokens": 2}})
    with rds.pipeline(transaction=True) as p:              # enqueue and hand it to the ghost at once
        p.xadd(stream, {"job": job})
        p.xreadgroup("default", "ghost", {stream: ">"}, count=1)
        _, reply = p.execute()
    eid = reply[0][1][0][0]
    rds.xclaim(stream, "default", "ghost", 0, [eid])      # second delivery (a reclaim), then left idle
    rds.xclaim(stream, "default", "ghost", 0, [eid], idle=60_000, justid=True)
    res = client.wait("poison", timeout=30)
    assert res.status == "failed" and "gave up after 2 attempts" in res.error and res.attempts == 3
    dead = rds.xrange(keys.dead_letter(shard))[-1][1]
    assert json.loads(dead[b"job"])["id"] == "poison" and dead[b"deliveries"] == b"3"
    assert rds.xpending(stream, "default")["pending"] == 0

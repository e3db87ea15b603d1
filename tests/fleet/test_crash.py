"""SIGKILL a worker mid-generation: another reclaims its jobs, and every client still sees each
chunk exactly once and in order (the re-run reproduces the tokens and skips what was published)."""
from __future__ import annotations

import json
import signal
import threading

import pytest
import redis

from producer import keys
from tests.fleet.conftest import assert_stream_consistent, wait_until

JOBS = [("the quick brown fox", "ad0", 0.0), ("SELECT name FROM users", "ad1", 0.0), ("def main():", "ad2", 0.0),
        ("Bonjour, ça va?", "ad3", 0.0), ("adapters serve many tenants", "ad0", 0.8),   # sampled, seed pinned
        ("seven wizards", "ad3", 0.0)]
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def pair(start_worker):
    p = start_worker("P", preload=["ad0", "ad1", "ad2", "ad3"], max_num_seqs=8)
    q = start_worker("Q", max_num_seqs=8, extra=["--steal-after", "60", "--grace", "0.3"])   # Q only reclaims
    return p.wait_ready(), q.wait_ready()


def test_sigkill_mid_generation_every_job_completes_exactly_once(pair, client, redis_url, rds, reference):
    p, q = pair
    # a pub/sub listener (what the websocket relay will be) and a streaming client per job
    ids = [f"crash-{i}" for i in range(len(JOBS))]
    ps = redis.Redis.from_url(redis_url).pubsub()
    ps.subscribe(*[keys.tokens(i) for i in ids])
    handles = [client.submit(id=i, prompt=pr, adapter=ad, params={"max_tokens": MAX_TOKENS, "temperature": t,
                                                                  "ignore_eos": True}) for i, (pr, ad, t) in zip(ids, JOBS)]
    live: dict[str, list[int]] = {h.id: [] for h in handles}

    def listen():
        while not all(v and v[-1] == MAX_TOKENS - 1 for v in live.values()):
            msg = ps.get_message(timeout=0.2)
            if msg and msg["type"] == "message":
                job_id = msg["channel"].decode().split("{job:")[1].rstrip("}")
                live[job_id].append(json.loads(msg["data"])["seq"])
    streamed: dict[str, list] = {}

    def consume(h):
        streamed[h.id] = list(h.stream(timeout=90))
    threads = [threading.Thread(target=consume, args=(h,), daemon=True) for h in handles]
    threads.append(threading.Thread(target=listen, daemon=True))
    for t in threads:
        t.start()

    def p_is_mid_generation():
        held_by_p = sum(c["pending"] for s in client.router.all_shards()
                        for c in rds.xinfo_consumers(keys.jobs(s), "default") if c["name"] == b"P")
        return held_by_p == len(JOBS) and all(rds.xlen(keys.replay(h.id)) >= 3 for h in handles)
    assert wait_until(p_is_mid_generation, timeout=30, every=0.01)
    p.kill()                                                   # SIGKILL: no goodbye, nothing acked
    assert p.proc.wait(10) == -9
    published = {h.id: rds.xlen(keys.replay(h.id)) for h in handles}
    assert all(n < MAX_TOKENS for n in published.values()), published

    for t in threads:
        t.join(90)
    for h, (prompt, adapter, temp) in zip(handles, JOBS):
        res = client.wait(h.id, timeout=30)
        assert res.status == "done" and res.worker == "Q" and res.attempts == 2, res
        chunks = streamed[h.id]
        assert_stream_consistent(chunks, res)                  # once each, in order, adds up to the result
        seqs = [int(f[b"seq"]) for _, f in rds.xrange(keys.replay(h.id))]
        assert seqs == list(range(MAX_TOKENS)), "replay stream has a duplicate or a gap"
        ref = reference(prompt, adapter, max_tokens=MAX_TOKENS, temperature=temp, seed=h.job.params.seed,
                        ignore_eos=True)
        assert res.token_ids == ref.token_ids, f"{adapter} t={temp}: the re-run diverged"
    ps.close()
    for job_id, seqs in live.items():                           # pub/sub subscribers saw no repeats either
        assert seqs == list(range(MAX_TOKENS)), f"{job_id}: repeated or missing chunks on pub/sub"
    assert "Traceback" not in q.output()


def test_sigterm_past_grace_hands_jobs_over_at_once(pair, start_worker, client, rds):
    p, q = pair
    p.kill()                                          # (if the test above did not)
    r = start_worker("R", preload=["ad0", "ad1", "ad2", "ad3"], max_num_seqs=8,
                     extra=["--steal-after", "60", "--grace", "0.3"]).wait_ready()
    handles = [client.submit(prompt=f"long {i}", adapter=f"ad{i}", params={"max_tokens": 400, "temperature": 0,
                                                                          "ignore_eos": True}) for i in range(4)]
    streams = {h.id: h.stream(timeout=60) for h in handles}
    firsts = {job_id: [next(s)] for job_id, s in streams.items()}       # all running
    owner = {}
    for shard in client.router.all_shards():
        for e in rds.xpending_range(keys.jobs(shard), "default", "-", "+", 100):
            owner[shard, e["message_id"].decode()] = e["consumer"].decode()   # ids are per stream
    victim, survivor = (q, r) if list(owner.values()).count("Q") >= 2 else (r, q)
    victim.kill(signal.SIGTERM)
    assert victim.proc.wait(15) == 0
    assert "jobs left for reclaim" in victim.output()
    for h in handles:
        chunks = firsts[h.id] + list(streams[h.id])
        res = h.wait(30)
        assert res.status == "done" and res.worker == survivor.id and res.completion_tokens == 400
        assert_stream_consistent(chunks, res)
    handed_over = [h.wait(1).attempts for h in handles if owner.get((h.shard, h.entry_id)) == victim.id]
    assert handed_over and all(a == 2 for a in handed_over)

"""Relay load: ``clients`` websocket clients held open at once on the relay, one per streaming job,
each checked for duplicate or missing chunks; chunk latency is the time from the worker's publish
(the replay entry's id is its Redis timestamp) to the client's receipt; the relay's RSS is sampled."""
from __future__ import annotations

import asyncio
import json
import random
import resource
import time

from redis.exceptions import RedisError
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from producer import AsyncClient, keys
from tests.chaos.harness import Fleet
from tests.chaos.load import WORDS, replay_entries, results
from tests.chaos.tally import check_chunks, percentile


def raise_open_files(need: int) -> int:
    """Raise this process' soft open-file limit towards ``need`` (up to the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need)) if hard != resource.RLIM_INFINITY else max(soft, need)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def relay_load(fleet: Fleet, clients: int, *, max_tokens: int = 64, timeout_s: float = 300,
                     seed: int = 0) -> dict:
    limit = raise_open_files(2 * clients + 256)
    if limit < clients + 128:
        raise RuntimeError(f"open-file limit {limit} is too low for {clients} websocket clients")
    rng = random.Random(seed)
    ids = [f"relay-{seed}-{i}" for i in range(clients)]
    chunks: dict[str, list] = {j: [] for j in ids}
    recv: dict[str, list] = {j: [] for j in ids}
    got_result: dict[str, dict] = {}
    t_submit: dict[str, float] = {}
    errors: list[str] = []
    open_now = peak_open = 0
    rss = [fleet.relay.rss_mb()]
    idle_rss = rss[0]
    deadline = time.monotonic() + timeout_s

    async def follow(job_id: str, submitter: AsyncClient) -> None:
        nonlocal open_now, peak_open
        body = {"id": job_id, "prompt": " ".join(rng.choices(WORDS, k=4)), "adapter": rng.choice(fleet.adapters),
                "params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
        t = time.time()
        try:
            await submitter.submit(body)
        except RedisError as e:
            errors.append(f"submit: {e!r}"[:200])
            return
        t_submit[job_id] = t
        after = 0
        while time.monotonic() < deadline:
            try:
                async with connect(f"{fleet.relay.ws_url}/v1/jobs/{job_id}/stream" + (f"?after={after}" if after else ""),
                                   open_timeout=60, ping_interval=None, max_queue=None, compression=None) as ws:
                    open_now += 1
                    peak_open = max(peak_open, open_now)
                    try:
                        async for raw in ws:
                            msg = json.loads(raw)
                            if msg["type"] == "chunk":
                                chunks[job_id].append((msg["seq"], msg["end"], msg["token_ids"],
                                                       msg.get("finish_reason")))
                                recv[job_id].append((msg["seq"], time.time()))
                                after = msg["end"]
                            elif msg["type"] == "result":
                                got_result[job_id] = msg
                                return
                            elif msg.get("error", {}).get("code") == "unavailable":
                                break
                            else:
                                errors.append(str(msg)[:200])
                                return
                    finally:
                        open_now -= 1
            except (WebSocketException, OSError, asyncio.TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
            await asyncio.sleep(0.2)

    async def sample_rss() -> None:
        while True:
            rss.append(fleet.relay.rss_mb())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_rss())
    blockers = await _fill_workers(fleet, f"relay-{seed}-blocker", deadline)
    t0 = time.monotonic()
    submitter = AsyncClient(fleet.redis.url)
    try:
        tasks = [asyncio.create_task(follow(j, submitter)) for j in ids]
        while peak_open < clients and time.monotonic() < deadline and not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        t_all_open = time.monotonic() - t0
        await _release(fleet, blockers)        # every client waits on its queued job: now let them run
        _, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await submitter.aclose()
    wall = time.monotonic() - t0
    await asyncio.sleep(1.0)
    sampler.cancel()
    after_rss = fleet.relay.rss_mb()

    res = results(fleet.redis.url, ids)
    replay = replay_entries(fleet.redis.url, ids)
    dups = missing = 0
    latency, ttfc = [], []
    for j in ids:
        r = res[j]
        d, m = check_chunks(chunks[j], 0, r["token_ids"] if r else None)
        dups, missing = dups + d, missing + m
        at = {}
        for seq, _, t in replay[j]:
            at.setdefault(seq, t)
        latency += [(t - at[seq]) * 1000 for seq, t in recv[j] if seq in at]
        if recv[j]:
            ttfc.append((recv[j][0][1] - t_submit[j]) * 1000)
    tokens = sum(len(c[2]) for cs in chunks.values() for c in cs)
    return {
        "system": "openlora-relay", "scenario": f"relay_{clients}_clients", "jobs": clients,
        "submitted": len(t_submit), "completed": sum(1 for r in res.values() if r and r["status"] == "done"),
        "failed": sum(1 for r in res.values() if r and r["status"] != "done"),
        "lost": sum(1 for j in t_submit if res[j] is None), "dup_chunks": dups, "missing_chunks": missing,
        "hung_clients": sum(1 for j in t_submit if j not in got_result), "client_errors": len(errors),
        "clients_peak_open": peak_open, "tokens_received": tokens,
        "chunk_latency_ms_p50": _r(percentile(latency, 50)), "chunk_latency_ms_p99": _r(percentile(latency, 99)),
        "ttfc_ms_p50": _r(percentile(ttfc, 50)), "ttfc_ms_p99": _r(percentile(ttfc, 99)),
        "relay_rss_mb_idle": round(idle_rss, 1), "relay_rss_mb_peak": round(max(rss), 1),
        "relay_rss_mb_after": round(after_rss, 1), "connect_all_s": round(t_all_open, 1), "wall_s": round(wall, 1),
        "note": "; ".join(sorted(set(errors)))[:300],
    }


async def _fill_workers(fleet: Fleet, prefix: str, deadline: float) -> list[str]:
    """Fill every worker's batch with long jobs, so that the clients' jobs queue until ``_release``:
    then all clients are connected at once, waiting, when their tokens start to flow."""
    client = AsyncClient(fleet.redis.url)
    try:
        n = fleet.max_num_seqs * len(fleet.live_workers())
        ids = [f"{prefix}-{i}" for i in range(n)]
        for j in ids:
            await client.submit(id=j, prompt="the quick brown fox", params={"max_tokens": 900, "ignore_eos": True})
        while time.monotonic() < deadline:
            async with client.redis.pipeline(transaction=False) as p:
                for j in ids:
                    p.exists(keys.replay(j))
                if all(await p.execute()):
                    return ids
            await asyncio.sleep(0.05)
        raise TimeoutError("the workers did not take the blocking jobs")
    finally:
        await client.aclose()


async def _release(fleet: Fleet, blockers: list[str]) -> None:
    client = AsyncClient(fleet.redis.url)
    try:
        for j in blockers:
            await client.cancel(j)
    finally:
        await client.aclose()


def _r(x):
    return None if x is None else round(x, 1)

"""The fault scenarios: each runs a fresh batch of jobs through the fleet and injects one fault
while they run (or shapes the load so that clients hang up, cancel, or let deadlines pass)."""
from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import redis.asyncio as aredis
from redis.exceptions import RedisError

from producer import keys
from producer.cursor import field as entry_field, text
from producer.protocol import Job
from tests.chaos.harness import Fleet
from tests.chaos.load import LoadRun, make_plans
from tests.chaos.tally import score


async def worker_mid_decode(fleet: Fleet, run: LoadRun, min_jobs: int = 2, timeout: float = 60):
    """A live worker that holds ``min_jobs`` jobs which have already streamed chunks (None: timed out)."""
    router, end = keys.ShardRouter(), time.monotonic() + timeout
    r = aredis.Redis.from_url(run.redis_url)
    try:
        while time.monotonic() < end:
            try:
                for w in fleet.live_workers():
                    async with r.pipeline(transaction=False) as p:
                        for s in router.all_shards():
                            p.xpending_range(keys.jobs(s), "default", "-", "+", 64, consumername=w.id)
                        pending = await p.execute(raise_on_error=False)
                    held = [(s, text(e["message_id"])) for s, es in zip(router.all_shards(), pending)
                            if not isinstance(es, Exception) for e in es]
                    if len(held) < min_jobs:
                        continue
                    async with r.pipeline(transaction=False) as p:
                        for s, eid in held:
                            p.xrange(keys.jobs(s), min=eid, max=eid)
                        entries = await p.execute()
                    jobs = [Job.parse(text(entry_field(e[0][1], "job"))).id for e in entries if e]
                    async with r.pipeline(transaction=False) as p:
                        for j in jobs:
                            p.xlen(keys.replay(j))
                        streamed = await p.execute()
                    if sum(n >= 2 for n in streamed) >= min_jobs:
                        return w
            except RedisError:
                pass
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()
    return None


async def sigkill_worker(fleet: Fleet, run: LoadRun) -> str:
    """SIGKILL a worker mid-decode; a supervisor starts a replacement (the others reclaim its jobs)."""
    w = await worker_mid_decode(fleet, run)
    if w is None:
        return "no worker was mid-decode: nothing killed"
    w.kill(signal.SIGKILL)
    await asyncio.to_thread(w.proc.wait, 10)
    fleet.retire(w)
    new = await asyncio.to_thread(fleet.start_worker, True)
    return f"SIGKILL {w.id} mid-decode; replacement {new.id}"


async def sigstop_worker(fleet: Fleet, run: LoadRun) -> str:
    """SIGSTOP a worker mid-decode past its heartbeat TTL (its jobs are reclaimed), then SIGCONT: the
    zombie finishes its steps and writes, and must not show clients a chunk twice."""
    w = await worker_mid_decode(fleet, run)
    if w is None:
        return "no worker was mid-decode: nothing stopped"
    stopped = fleet.ttl * 2.5
    w.kill(signal.SIGSTOP)
    await asyncio.sleep(stopped)
    w.kill(signal.SIGCONT)
    return f"SIGSTOP {w.id} for {stopped:.1f} s (TTL {fleet.ttl:g} s), then SIGCONT"


async def restart_redis(fleet: Fleet, run: LoadRun) -> str:
    """Crash Redis (SIGKILL) mid-run and start it again from its AOF on the same port."""
    w = await worker_mid_decode(fleet, run)
    while run.submitted_count < len(run.plans) // 3 and time.monotonic() < run.deadline:
        await asyncio.sleep(0.02)
    down = await asyncio.to_thread(fleet.redis.restart, 1.5)
    return f"redis SIGKILL + restart from AOF ({down:.1f} s down){'' if w else '; no worker was mid-decode'}"


@dataclass
class Scenario:
    name: str
    fault: Callable[[Fleet, LoadRun], Awaitable[str]] | None = None
    load: dict = field(default_factory=dict)       # make_plans options
    pubsub_lossy: bool = False                      # pub/sub is at-most-once across a Redis restart


SCENARIOS = [
    Scenario("baseline"),
    Scenario("worker_sigkill", sigkill_worker),
    Scenario("worker_sigstop", sigstop_worker),
    Scenario("redis_restart", restart_redis, pubsub_lossy=True),
    Scenario("ws_reconnect", load=dict(cut_frac=1.0, follow_weights=(0.8, 0.1, 0.0, 0.1))),
    Scenario("cancel", load=dict(cancel_frac=0.4)),
    Scenario("deadline", load=dict(deadline_frac=0.4)),
]
BY_NAME = {s.name: s for s in SCENARIOS}


async def run_scenario(fleet: Fleet, sc: Scenario, jobs: int, *, seed: int = 0, submit_span_s: float = 2.0,
                       timeout_s: float = 120.0) -> tuple[dict, LoadRun]:
    plans = make_plans(jobs, fleet.adapters, random.Random(f"{sc.name}-{seed}"), sc.name, **sc.load)
    run = LoadRun(fleet.redis.url, fleet.api.url, fleet.relay.ws_url, plans, submit_span_s=submit_span_s,
                  timeout_s=timeout_s)
    t0 = time.monotonic()
    note = await run.run((lambda r: sc.fault(fleet, r)) if sc.fault else None)
    return score(run, sc.name, time.monotonic() - t0, pubsub_lossy=sc.pubsub_lossy, note=note), run

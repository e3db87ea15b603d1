"""The load: jobs across many adapters, submitted through the HTTP API or the Python client, and
followed the ways users follow them — the relay websocket, ``AsyncClient.stream``, ``Client.stream``
in a thread, or not at all (wait for the result) — while one pub/sub subscriber sees every chunk
as published. Afterwards each client's chunks are checked against the job's result.

A client retries what a real one would: a submit that failed (same id: idempotent), a websocket
the relay dropped (reconnect with ``?after=<tokens received>``). Errors a client saw are counted.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import redis
import redis.asyncio as aredis
from redis.exceptions import RedisError
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from producer import AsyncClient, Client, keys
from producer.cursor import field as entry_field, text

FOLLOWS = ("ws", "stream", "sync_stream", "none")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly kings".split()


@dataclass
class Plan:
    id: str
    body: dict                      # the job as submitted
    via: str = "client"             # api | client
    follow: str = "none"            # ws | stream | sync_stream | none
    cancel_at: float | None = None  # seconds after submit
    cut_after: int | None = None    # ws: hang up after this many chunks, reconnect with ?after=


@dataclass
class Seen:
    """What one client saw of one job."""
    submitted: bool = False
    submit_retries: int = 0
    t_submit: float = 0.0
    chunks: list[tuple[int, int, list[int], str | None]] = field(default_factory=list)  # seq, end, ids, finish
    recv: list[tuple[int, float]] = field(default_factory=list)                         # seq, unix time
    result: dict | None = None
    reconnects: int = 0
    cuts: int = 0                   # hang-ups done (a planned cut never comes when the job ends first)
    errors: list[str] = field(default_factory=list)
    hung: bool = False


def make_plans(n: int, adapters: list[str], rng: random.Random, prefix: str, *, cancel_frac: float = 0.0,
               deadline_frac: float = 0.0, cut_frac: float = 0.0, ensemble_frac: float = 0.05,
               follow_weights=(0.35, 0.25, 0.05, 0.35), max_tokens=(16, 48), sync_cap: int = 12) -> list[Plan]:
    plans, n_sync = [], 0
    for i in range(n):
        follow = rng.choices(FOLLOWS, follow_weights)[0]
        if follow == "sync_stream":
            n_sync += 1
            follow = "sync_stream" if n_sync <= sync_cap else "stream"
        params = {"max_tokens": rng.randint(*max_tokens), "temperature": rng.choice([0.0, 0.7]),
                  "ignore_eos": rng.random() < 0.5}
        body = {"id": f"{prefix}-{i}", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(2, 8))), "params": params}
        r = rng.random()
        if r < ensemble_frac:
            a, b = rng.sample(adapters, 2)
            body["adapters"] = [{"id": a, "weight": 0.6}, {"id": b, "weight": 0.4}]
        elif r < ensemble_frac + 0.05:
            pass                                           # the base model
        else:
            body["adapter"] = rng.choice(adapters)
        plan = Plan(body["id"], body, via=rng.choice(["api", "client", "client"]), follow=follow)
        if rng.random() < cancel_frac:                     # queued or mid-decode
            params["max_tokens"] = rng.randint(128, 256)
            plan.cancel_at = rng.uniform(0.0, 0.6)
        if rng.random() < deadline_frac:                   # in the queue or mid-decode
            params["max_tokens"] = rng.randint(128, 256)
            body["deadline"] = rng.uniform(0.02, 0.6)      # made absolute at submit time
        if follow == "ws" and rng.random() < cut_frac:
            plan.cut_after = rng.randint(1, 4)
        plans.append(plan)
    return plans


class LoadRun:
    """Submit ``plans`` against the fleet and follow each job; ``seen[id]`` is what its client saw."""

    def __init__(self, redis_url: str, api_url: str, relay_ws_url: str, plans: list[Plan], *,
                 submit_span_s: float = 2.0, timeout_s: float = 120.0):
        self.redis_url, self.api_url, self.relay_ws_url = redis_url, api_url, relay_ws_url
        self.plans, self.span, self.timeout = plans, submit_span_s, timeout_s
        self.seen = {p.id: Seen() for p in plans}
        self.published: dict[str, list[tuple[int, int]]] = {p.id: [] for p in plans}   # pub/sub: seq, end
        self.pubsub_errors = 0
        self.submitted_count = 0

    async def run(self, fault=None) -> str:
        """Run the load with ``fault(self)`` alongside; returns the fault's note."""
        self.client = AsyncClient(self.redis_url, block_ms=500)
        self.sync_client = Client(self.redis_url, block_ms=500)
        self.http = httpx.AsyncClient(base_url=self.api_url, timeout=30,
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self.threads = ThreadPoolExecutor(max_workers=max(1, sum(p.follow == "sync_stream" for p in self.plans)))
        self.deadline = time.monotonic() + self.timeout
        listener_ready = asyncio.Event()
        listener = asyncio.create_task(self._pubsub(listener_ready))
        await asyncio.wait_for(listener_ready.wait(), 10)
        fault_task = asyncio.create_task(fault(self)) if fault else None
        tasks = [asyncio.create_task(self._job(p, i * self.span / max(1, len(self.plans))))
                 for i, p in enumerate(self.plans)]
        try:
            done, pending = await asyncio.wait(tasks, timeout=max(1.0, self.deadline - time.monotonic()))
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            note = await asyncio.wait_for(fault_task, 60) if fault_task else ""
            await asyncio.sleep(0.3)               # the last publishes reach the subscriber
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            self.threads.shutdown(wait=False, cancel_futures=True)
            await self.http.aclose()
            await self.client.aclose()
            self.sync_client.close()
        for t, p in zip(tasks, self.plans):
            if t.cancelled() or not t.done():
                self.seen[p.id].hung = True
            elif t.exception() is not None:
                self.seen[p.id].errors.append(f"{type(t.exception()).__name__}: {t.exception()}")
        return note or ""

    # -- one job ---------------------------------------------------------------------------------
    async def _job(self, p: Plan, delay: float) -> None:
        await asyncio.sleep(delay)
        s = self.seen[p.id]
        body = dict(p.body)
        if "deadline" in body:
            body["deadline"] = time.time() + body["deadline"]
        s.t_submit = time.time()
        await self._submit(p, body, s)
        if not s.submitted:
            return
        self.submitted_count += 1
        canceller = asyncio.create_task(self._cancel(p, s)) if p.cancel_at is not None else None
        try:
            if p.follow == "ws":
                await self._follow_ws(p, s)
            elif p.follow == "stream":
                await self._follow_stream(p, s)
            elif p.follow == "sync_stream":
                await asyncio.get_running_loop().run_in_executor(self.threads, self._follow_sync, p, s)
            else:
                await self._wait(p, s)
        finally:
            if canceller is not None:
                await asyncio.gather(canceller, return_exceptions=True)

    async def _submit(self, p: Plan, body: dict, s: Seen) -> None:
        while time.monotonic() < self.deadline:
            try:
                if p.via == "api":
                    r = await self.http.post("/v1/jobs", json=body)
                    if r.status_code in (200, 201):
                        s.submitted = True
                        return
                    if r.status_code < 500 and r.status_code != 429:
                        s.errors.append(f"submit refused: {r.status_code} {r.text[:200]}")
                        return
                else:
                    await self.client.submit(body)
                    s.submitted = True
                    return
            except (RedisError, httpx.HTTPError, OSError):
                pass
            s.submit_retries += 1
            await asyncio.sleep(0.2)

    async def _cancel(self, p: Plan, s: Seen) -> None:
        await asyncio.sleep(p.cancel_at)
        while time.monotonic() < self.deadline:
            try:
                if p.via == "api":
                    r = await self.http.delete(f"/v1/jobs/{p.id}")
                    if r.status_code == 200:
                        return
                else:
                    await self.client.cancel(p.id)
                    return
            except (RedisError, httpx.HTTPError, OSError):
                pass
            await asyncio.sleep(0.2)

    def _chunk(self, s: Seen, seq: int, end: int, ids: list[int], finish: str | None) -> None:
        s.chunks.append((seq, end, ids, finish))
        s.recv.append((seq, time.time()))

    async def _follow_ws(self, p: Plan, s: Seen) -> None:
        after, cut = 0, p.cut_after
        while time.monotonic() < self.deadline:
            url = f"{self.relay_ws_url}/v1/jobs/{p.id}/stream" + (f"?after={after}" if after else "")
            try:
                async with connect(url, open_timeout=20, ping_interval=None, max_queue=None) as ws:
                    n = 0
                    async for raw in ws:
                        msg = json.loads(raw)
                        if msg["type"] == "chunk":
                            self._chunk(s, msg["seq"], msg["end"], msg["token_ids"], msg.get("finish_reason"))
                            after, n = msg["end"], n + 1
                            if cut is not None and n >= cut and not msg.get("finish_reason"):
                                cut = None
                                s.cuts += 1
                                break                          # hang up mid-stream; reconnect below
                        elif msg["type"] == "result":
                            s.result = msg
                            return
                        elif msg.get("error", {}).get("code") == "unavailable":
                            break                              # Redis restarting: come back (close 1013)
                        else:
                            s.errors.append(f"relay: {msg}")
                            return
            except (WebSocketException, OSError, asyncio.TimeoutError) as e:
                s.errors.append(f"ws: {type(e).__name__}: {e}")
            s.reconnects += 1
            await asyncio.sleep(0.1)

    async def _follow_stream(self, p: Plan, s: Seen) -> None:
        after = 0
        while time.monotonic() < self.deadline:
            try:
                async for c in self.client.stream(p.id, from_seq=after, timeout=self.deadline - time.monotonic()):
                    self._chunk(s, c.seq, c.end, c.token_ids, c.finish_reason)
                    after = c.end
                    if c.final:
                        return
                return
            except RedisError as e:            # a client that rides out a Redis restart resumes here
                s.errors.append(f"stream: {type(e).__name__}: {e}")
                s.reconnects += 1
                await asyncio.sleep(0.2)

    def _follow_sync(self, p: Plan, s: Seen) -> None:
        after = 0
        while time.monotonic() < self.deadline:
            try:
                for c in self.sync_client.stream(p.id, from_seq=after, timeout=self.deadline - time.monotonic()):
                    self._chunk(s, c.seq, c.end, c.token_ids, c.finish_reason)
                    after = c.end
                    if c.final:
                        return
                return
            except RedisError as e:
                s.errors.append(f"sync stream: {type(e).__name__}: {e}")
                s.reconnects += 1
                time.sleep(0.2)

    async def _wait(self, p: Plan, s: Seen) -> None:
        while time.monotonic() < self.deadline:
            try:
                if p.via == "api":
                    r = await self.http.get(f"/v1/jobs/{p.id}")
                    if r.status_code == 200 and r.json().get("result"):
                        s.result = r.json()["result"]
                        return
                    await asyncio.sleep(0.25)
                else:
                    res = await self.client.wait(p.id, timeout=self.deadline - time.monotonic())
                    s.result = res.__dict__
                    return
            except (RedisError, httpx.HTTPError, OSError) as e:
                s.errors.append(f"wait: {type(e).__name__}: {e}")
                await asyncio.sleep(0.2)

    # -- every chunk as published --------------------------------------------------------------
    async def _pubsub(self, ready: asyncio.Event) -> None:
        """One subscriber on every job's token channel; reconnects (and misses what it was away for)."""
        while True:
            r = aredis.Redis.from_url(self.redis_url)
            try:
                async with r.pubsub() as ps:
                    await ps.psubscribe(keys.tokens("*"))
                    ready.set()
                    async for msg in ps.listen():
                        if msg["type"] != "pmessage":
                            continue
                        job = text(msg["channel"]).split("{job:", 1)[1][:-1]
                        if job in self.published:
                            c = json.loads(msg["data"])
                            self.published[job].append((c["seq"], c["seq"] + len(c["token_ids"])))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                self.pubsub_errors += 1
                await asyncio.sleep(0.2)
            finally:
                await r.aclose()


def _per_job(redis_url: str, job_ids: list[str], call, parse) -> dict:
    """job -> parse(reply of call(pipeline, job)), pipelined 200 jobs at a time."""
    r = redis.Redis.from_url(redis_url)
    out = {}
    try:
        for i in range(0, len(job_ids), 200):
            with r.pipeline(transaction=False) as p:
                for j in job_ids[i:i + 200]:
                    call(p, j)
                for j, reply in zip(job_ids[i:i + 200], p.execute()):
                    out[j] = parse(reply)
    finally:
        r.close()
    return out


def replay_entries(redis_url: str, job_ids: list[str]) -> dict[str, list[tuple[int, int, float]]]:
    """job -> [(seq, end, unix time of the XADD)] of its replay stream (the copy clients read)."""
    return _per_job(redis_url, job_ids, lambda p, j: p.xrange(keys.replay(j)),
                    lambda entries: [(int(text(entry_field(f, "seq"))), int(text(entry_field(f, "end"))),
                                      int(text(eid).split("-")[0]) / 1000) for eid, f in entries])


def results(redis_url: str, job_ids: list[str]) -> dict[str, dict | None]:
    return _per_job(redis_url, job_ids, lambda p, j: p.hget(keys.result(j), "data"),
                    lambda data: json.loads(data) if data else None)

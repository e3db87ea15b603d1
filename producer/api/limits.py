"""Per-tenant limits kept in Redis, so that every API process enforces the same ones.

- Rate: a token bucket per tenant (``rate_limit`` requests/s, ``rate_burst`` at once), refilled
  on Redis's clock; a request past it is HTTP 429 with ``Retry-After``.
- Queue share: a tenant holds at most ``tenant_max_queued`` queued or running jobs. Its job ids
  sit in a sorted set; when the set is full, members whose job has finished (a result exists, by
  whichever worker wrote it: a re-run after a crash counts), was cancelled, or never got enqueued
  are pruned before refusing. Results are written by workers, so a dead worker's jobs leave the
  count when another worker re-runs them, or at the latest after the idempotency window.
"""
from __future__ import annotations

import logging
import math
import time

import redis.asyncio as aredis
from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from producer import keys
from producer.api.auth import AuthError, bearer
from producer.api.errors import ApiError, error_body
from producer.cursor import text
from producer.scripts import RESERVE_SLOT, TAKE_TOKEN

log = logging.getLogger("openlora.api")
UNSUBMITTED_GRACE_S = 60      # a reservation whose job never got enqueued (API died between the steps)
SHARE_RETRY_AFTER_S = 1
UNLIMITED_PATHS = ("/healthz", "/metrics")


class TenantLimits:
    def __init__(self, redis: aredis.Redis, *, rate: float, burst: int, max_queued: int, window_s: int):
        self.redis, self.rate, self.burst, self.max_queued, self.window_s = redis, rate, burst, max_queued, window_s
        self._take = redis.register_script(TAKE_TOKEN)
        self._reserve = redis.register_script(RESERVE_SLOT)

    # -- rate --------------------------------------------------------------------------------------
    async def take(self, tenant: str) -> float | None:
        """None if ``tenant`` may make a request now, else the seconds until it may. Fails open
        when Redis is unreachable (the request then fails on its own, or works without Redis)."""
        if self.rate <= 0:
            return None
        try:
            ok, wait_ms = await self._take(keys=[keys.tenant_rate(tenant)], args=[self.rate, self.burst])
        except RedisError as e:
            log.warning("rate limit not checked (Redis: %s)", e)
            return None
        return None if int(ok) else int(wait_ms) / 1000

    def refusal(self, tenant: str, wait_s: float) -> ApiError:
        return ApiError(429, f"tenant {tenant!r} is over its rate limit of {self.rate:g} requests/s "
                             f"(burst {self.burst}); retry in {wait_s:.2f} s", None, "rate_limit_exceeded",
                        headers={"Retry-After": str(max(1, math.ceil(wait_s)))})

    # -- queue share -------------------------------------------------------------------------------
    async def reserve(self, tenant: str, job_id: str) -> bool:
        """Count ``job_id`` against the tenant's share; True if this call added it (release it if
        the job is then not enqueued). Raises ApiError(429) when the tenant's share is full."""
        if self.max_queued <= 0:
            return False
        key = keys.tenant_inflight(tenant)
        for attempt in range(2):
            status, n = await self._reserve(keys=[key], args=[job_id, self.max_queued, self.window_s])
            if int(status) >= 0:
                return int(status) == 1
            if attempt == 0:
                await self.prune(tenant)
        raise ApiError(429, f"tenant {tenant!r} already has {int(n)} jobs queued or running (limit "
                            f"{self.max_queued}); wait for some to finish", None, "tenant_queue_full",
                       headers={"Retry-After": str(SHARE_RETRY_AFTER_S)})

    async def release(self, tenant: str, job_id: str) -> None:
        await self.redis.zrem(keys.tenant_inflight(tenant), job_id)

    async def in_flight(self, tenant: str, prune: bool = True) -> int:
        if prune:
            await self.prune(tenant)
        return await self.redis.zcard(keys.tenant_inflight(tenant))

    async def prune(self, tenant: str) -> int:
        """Drop the tenant's jobs that are over: a result exists, a cancel was asked, or (past a
        grace period) the job was never enqueued or its record expired. One key per command, so
        this works on a Redis Cluster; a member added meanwhile is not touched."""
        key = keys.tenant_inflight(tenant)
        members = [(text(m), s) for m, s in await self.redis.zrange(key, 0, -1, withscores=True)]
        if not members:
            return 0
        async with self.redis.pipeline(transaction=False) as p:
            for job_id, _ in members:
                p.exists(keys.result(job_id))
                p.exists(keys.cancel_flag(job_id))
                p.exists(keys.submitted(job_id))
            found = await p.execute()
        now = time.time()
        over = [job_id for i, (job_id, score) in enumerate(members)
                if found[3 * i] or found[3 * i + 1] or (not found[3 * i + 2] and now - score > UNSUBMITTED_GRACE_S)]
        if over:
            await self.redis.zrem(key, *over)
        return len(over)


class RateLimitMiddleware:
    """ASGI middleware: a request with a valid API key first takes a token from its tenant's
    bucket (HTTP 429 + Retry-After when empty). Requests without a valid key pass through to
    the route, which answers 401; ``/healthz`` and ``/metrics`` are not limited."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        limits = self.service.limits
        if scope["type"] != "http" or limits.rate <= 0 or scope["path"] in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        try:
            tenant = self.service.keys.tenant(bearer(Headers(scope=scope).get("authorization")))
        except AuthError:
            return await self.app(scope, receive, send)
        wait = await limits.take(tenant)
        if wait is None:
            return await self.app(scope, receive, send)
        self.service.metrics.refused.labels("429").inc()
        err = limits.refusal(tenant, wait)
        await JSONResponse(error_body(429, err.message, None, err.code), status_code=429,
                           headers=err.headers)(scope, receive, send)

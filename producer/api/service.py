"""What the HTTP routes share: tenant checks, adapter checks, per-tenant limits, enqueueing, and
reading jobs back.

The API enqueues through ``AsyncClient`` and reads the replay stream; it never runs the engine.
With a database (``DATABASE_URL``) it also holds the adapter registry, and an adapter that is
another tenant's private one is "not found" for every route.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

import redis.asyncio as aredis

from producer import keys
from producer.aio import AsyncClient, async_redis
from producer.api.auth import OPEN_TENANT, ApiKeys, AuthError, bearer
from producer.api.errors import ApiError
from producer.api.fleet_view import FleetView, adapter_dir_names
from producer.api.limits import TenantLimits
from producer.api.metrics import ApiMetrics
from producer.api.settings import ApiSettings
from producer.api.tokens import BaseModelInfo
from producer.client import DEFAULT_SUBMIT_TTL_S
from producer.errors import JobValidationError, QueueFullError
from producer.protocol import Job

log = logging.getLogger("openlora.api")


class JobService:
    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.redis = async_redis(settings.redis_url)      # waits for a free connection under a burst
        self.client = AsyncClient(redis_client=self.redis, queue_limit=settings.queue_limit,
                                  block_ms=settings.block_ms)
        self.fleet = FleetView(self.redis, self.client.router, settings.fleet)
        self.keys = ApiKeys(settings.api_keys)
        self.info = BaseModelInfo(settings.model_dir)
        self.metrics = ApiMetrics()
        self.static_adapters = set(settings.adapters)
        self.adapter_dirs = settings.adapter_dirs
        self.limits = TenantLimits(self.redis, rate=settings.rate_limit, burst=settings.rate_burst,
                                   max_queued=settings.tenant_max_queued, window_s=DEFAULT_SUBMIT_TTL_S)
        self.registry = None
        if settings.database_url:
            from producer.api.adapter_registry import AdapterRegistry   # SQLAlchemy only when used
            self.registry = AdapterRegistry(settings.database_url, settings.store_root, settings.model_dir,
                                            settings.max_lora_rank)

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self.registry is not None:
            self.registry.close()

    # -- who is asking -------------------------------------------------------------------------
    def tenant(self, authorization: str | None, api_key: str | None = None) -> str:
        try:
            return self.keys.tenant(bearer(authorization) or api_key)
        except AuthError as e:
            self.metrics.refused.labels("401").inc()
            raise ApiError(401, str(e), None, "invalid_api_key") from e

    async def check_owner(self, job_id: str, tenant: str) -> None:
        """404 unless ``job_id`` was submitted by ``tenant`` (another tenant's job does not exist for you)."""
        known, owner = await self.fleet.owner(job_id)
        if not known or (owner or OPEN_TENANT) != tenant:
            raise ApiError(404, f"job {job_id!r} not found", "id", "job_not_found")

    # -- adapters --------------------------------------------------------------------------------
    async def system_adapters(self) -> set[str]:
        """Adapter ids from the API's config (list, adapter dirs) and the workers' heartbeats."""
        return self.static_adapters | adapter_dir_names(self.adapter_dirs) | await self.fleet.worker_adapters()

    async def known_adapters(self, tenant: str | None = None) -> set[str]:
        """The adapter ids ``tenant`` may use: the system ones and, with a registry, its own and the
        public ones, less other tenants' private ones (a worker may hold those too)."""
        found = await self.system_adapters()
        if self.registry is not None:
            found -= await self.registry.hidden_from(tenant)
            found |= {row.id for row in await self.registry.visible_to(tenant)}
        return found

    async def adapter_for_model(self, model: str, tenant: str | None = None) -> str | None:
        """``model`` -> adapter id (None = the base model). When the API is configured with the
        adapters (OPENLORA_ADAPTERS / OPENLORA_ADAPTER_DIRS) an unknown one is a 404 here; without
        that the workers decide (their adapter dirs may hold more) and their error comes back."""
        if model == self.settings.base_model:
            return None
        await self.check_adapter(model, "model", tenant)
        return model

    async def check_adapter(self, adapter: str, param: str = "adapter", tenant: str | None = None) -> None:
        """404 unless ``tenant`` may run ``adapter``. A registered adapter is decided by the registry
        (another tenant's private one does not exist for you); ``tenant=None`` sees only public and
        system adapters."""
        row = await self.registry.get(adapter) if self.registry is not None else None
        if row is not None:
            if self.registry.visible(row, tenant):
                return
        elif not (self.static_adapters or self.adapter_dirs) or adapter in await self.system_adapters():
            return
        self.metrics.refused.labels("404").inc()
        raise ApiError(404, f"the model {adapter!r} does not exist: it is neither the base model "
                            f"{self.settings.base_model!r} nor a known adapter", param, "model_not_found")

    # -- submitting ------------------------------------------------------------------------------
    def check_length(self, prompt: str | list[int], param: str = "prompt") -> int | None:
        limit, vocab = self.info.max_context, self.info.vocab_size
        if isinstance(prompt, str) and self.info.surely_too_long(prompt):
            self.metrics.refused.labels("400").inc()
            raise ApiError(400, f"the prompt is {len(prompt)} characters, more than this model's context of "
                                f"{limit} tokens can hold", param, "context_length_exceeded")
        if isinstance(prompt, list) and vocab and not all(0 <= t < vocab for t in prompt):
            self.metrics.refused.labels("400").inc()
            raise ApiError(400, f"{param}: token ids must be in [0, {vocab}) for this model", param, "invalid_value")
        n = self.info.count(prompt)
        if n is not None and limit is not None and n >= limit:
            self.metrics.refused.labels("400").inc()
            raise ApiError(400, f"the prompt is {n} tokens; this model's context holds {limit} tokens",
                           param, "context_length_exceeded")
        return n

    async def submit(self, job: dict, tenant: str, endpoint: str):
        job = {**job, "tenant": tenant}
        try:
            parsed = Job.parse(job)
        except JobValidationError as e:
            self.metrics.refused.labels("400").inc()
            raise ApiError(400, str(e), e.field or None, "invalid_value") from e
        if parsed.priority > 0:     # above online traffic: for the operator's own services (Client), not tenants
            self.metrics.refused.labels("400").inc()
            raise ApiError(400, f"priority must be <= 0 through the API (0 = online, below 0 = batch), got "
                                f"{parsed.priority}", "priority", "invalid_value")
        known, owner = await self.fleet.owner(parsed.id)
        if known and (owner or OPEN_TENANT) != tenant:
            self.metrics.refused.labels("409").inc()
            raise ApiError(409, f"job id {parsed.id!r} is already in use; choose another id", "id", "id_in_use")
        try:
            reserved = False if known else await self.limits.reserve(tenant, parsed.id)   # a resubmit adds nothing
        except ApiError:
            self.metrics.refused.labels("429").inc()
            raise
        handle = None
        try:
            handle = await self.client.submit(parsed)
        except QueueFullError as e:
            self.metrics.refused.labels("429").inc()
            raise ApiError(429, str(e), None, "queue_full") from e
        finally:
            if reserved and (handle is None or not handle.created):
                await self.limits.release(tenant, parsed.id)     # nothing of ours was enqueued
        if handle.created:
            self.metrics.submitted.labels(endpoint).inc()
        return handle

    def status_of_worker_error(self, error: str | None) -> int:
        e = (error or "").lower()
        return 404 if "unknown adapter" in e or "not registered" in e else 400


async def job_state(service: JobService, job_id: str) -> dict:
    res = await service.client.result(job_id)
    if res is not None:
        return {"id": job_id, "status": res.status, "result": asdict(res)}
    n = await service.redis.xlen(keys.replay(job_id))
    return {"id": job_id, "status": "running" if n else "queued", "result": None}

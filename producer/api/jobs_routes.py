"""Native routes: ``/v1/jobs`` (submit, idempotent on id), get, cancel; ``/healthz``; ``/metrics``."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from producer.api.errors import ApiError
from producer.api.request_body import json_body
from producer.api.service import JobService, job_state

router = APIRouter()


@router.post("/v1/jobs")
async def submit_job(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "a job must be a JSON object", None, "invalid_json")
    if isinstance(body.get("adapter"), str):
        await service.check_adapter(body["adapter"], "adapter", tenant)
    for a in body.get("adapters") if isinstance(body.get("adapters"), list) else []:
        if isinstance(a, dict) and isinstance(a.get("id"), str):
            await service.check_adapter(a["id"], "adapters", tenant)
    if isinstance(body.get("prompt"), str) and body["prompt"]:
        service.check_length(body["prompt"])
    elif isinstance(body.get("input_ids"), list) and all(type(t) is int for t in body["input_ids"]):
        service.check_length(body["input_ids"], "input_ids")
    handle = await service.submit(body, tenant, "jobs")
    return JSONResponse({"id": handle.id, "shard": handle.shard, "created": handle.created, "status": "queued"},
                        status_code=201 if handle.created else 200)


@router.get("/v1/jobs/{job_id:path}")
async def get_job(job_id: str, request: Request):
    service: JobService = request.app.state.service
    await service.check_owner(job_id, service.tenant(request.headers.get("authorization")))
    return await job_state(service, job_id)


@router.delete("/v1/jobs/{job_id:path}")
async def cancel_job(job_id: str, request: Request):
    service: JobService = request.app.state.service
    await service.check_owner(job_id, service.tenant(request.headers.get("authorization")))
    return {"id": job_id, "cancelled": await service.client.cancel(job_id)}


@router.get("/healthz")
async def healthz(request: Request):
    service: JobService = request.app.state.service
    try:
        await service.redis.ping()
        workers = len(await service.fleet.workers())
    except RedisError as e:
        return JSONResponse({"status": "unavailable", "redis": f"unreachable: {e}", "workers": None}, status_code=503)
    return {"status": "ok" if workers else "no_workers", "redis": "ok", "workers": workers}


@router.get("/metrics")
async def metrics(request: Request):
    service: JobService = request.app.state.service
    m = service.metrics
    try:
        for shard, n in (await service.fleet.queue_lengths()).items():
            m.queue_depth.labels(shard).set(n)
        workers = await service.fleet.workers()
        m.workers.set(len(workers))
        m.adapter_cache.clear()                 # workers that left drop out
        for w in workers:
            for field, value in w.items():
                if field.startswith("cache_"):
                    m.adapter_cache.labels(w.get("worker", "?"), field.removeprefix("cache_")).set(float(value))
    except RedisError:
        pass    # the counters still render; healthz reports Redis
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)

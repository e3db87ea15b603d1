"""``/v1/batches``: offline scoring or generation runs over a dataset, executed by the Celery batch workers.

    POST /v1/batches                 {"input": [rows...], "mode": "loglik", "chunk_size": 64, "token_logprobs": false}
                                     or a JSONL body (Content-Type application/jsonl) with ?mode=...&chunk_size=...
    GET  /v1/batches                 the tenant's runs
    GET  /v1/batches/{id}            status, counts, progress
    POST /v1/batches/{id}/cancel
    GET  /v1/batches/{id}/output     the output JSONL (input order) once the run completed

Rows are validated one by one: a bad row (or one naming an adapter this tenant may not use)
becomes an error line in the output and the run goes on. Runs need ``DATABASE_URL`` and
run files under ``$OPENLORA_HOME/batches`` shared with the batch workers.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from producer.api.errors import ApiError
from producer.api.request_body import parse_json
from producer.api.service import JobService
from producer.batch_rows import MODES, Row, jsonl_records, rows_from_records
from producer.batches import BATCH_QUEUE, BatchNotFoundError, BatchRuns, run_json

router = APIRouter()
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines")
MAX_ROWS = 1_000_000


def _runs(service: JobService) -> BatchRuns:
    runs = getattr(service, "batch_runs", None)
    if runs is None:
        if not service.settings.database_url:
            raise ApiError(501, "batch runs need a database: start the API with DATABASE_URL", None,
                           "batches_not_configured")
        from db.session import init_db
        runs = service.batch_runs = BatchRuns(init_db(service.settings.database_url))
    return runs


def _celery(service: JobService):
    """A Celery app on the API's Redis, only to send tasks by name (the batch workers run them)."""
    if getattr(service, "celery_app", None) is None:
        from celery import Celery
        url = service.settings.redis_url
        service.celery_app = Celery("openlora-api", broker=os.environ.get("CELERY_BROKER_URL", url))
        service.celery_app.conf.update(task_serializer="json", accept_content=["json"])
    return service.celery_app


def _get(runs: BatchRuns, run_id: str, tenant: str):
    try:
        return runs.get(run_id, tenant)
    except BatchNotFoundError:
        raise ApiError(404, f"batch {run_id!r} not found", "id", "batch_not_found") from None


def _with_links(run) -> dict:
    out = run_json(run)
    if run.status == "completed":
        out["output_url"] = f"/v1/batches/{run.id}/output"
    return out


@router.post("/v1/batches")
async def create_batch(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    runs = _runs(service)
    options, records = await _read_request(request)
    mode = options.get("mode", "loglik")
    if mode not in MODES:
        raise ApiError(400, f"mode must be one of {', '.join(MODES)}, got {mode!r}", "mode", "invalid_value")
    chunk_size, token_logprobs = options.get("chunk_size", 64), options.get("token_logprobs", False)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= 10_000:
        raise ApiError(400, "chunk_size must be an integer in [1, 10000]", "chunk_size", "invalid_value")
    if not isinstance(token_logprobs, bool):
        raise ApiError(400, "token_logprobs must be true or false", "token_logprobs", "invalid_value")
    # validating a large dataset takes seconds: off the event loop
    rows = await asyncio.to_thread(lambda: list(rows_from_records(records, mode, token_logprobs)))
    await _refuse_hidden_adapters(service, rows, tenant)
    run = await asyncio.to_thread(runs.create, rows, mode=mode, tenant=tenant, input_uri="(request body)",
                                  chunk_size=chunk_size, token_logprobs=token_logprobs)
    await asyncio.to_thread(_celery(service).send_task, "openlora.dispatch_run", args=(run.id,),
                            queue=BATCH_QUEUE, ignore_result=True)
    return JSONResponse(_with_links(await asyncio.to_thread(runs.get, run.id)), status_code=201)


@router.get("/v1/batches")
async def list_batches(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    found = await asyncio.to_thread(_runs(service).list, tenant)
    return {"object": "list", "data": [_with_links(r) for r in found]}


@router.get("/v1/batches/{run_id}")
async def get_batch(run_id: str, request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    return _with_links(await asyncio.to_thread(_get, _runs(service), run_id, tenant))


@router.post("/v1/batches/{run_id}/cancel")
async def cancel_batch(run_id: str, request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    runs = _runs(service)
    await asyncio.to_thread(_get, runs, run_id, tenant)
    await asyncio.to_thread(runs.cancel, run_id)
    return _with_links(await asyncio.to_thread(runs.get, run_id))


@router.get("/v1/batches/{run_id}/output")
async def batch_output(run_id: str, request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    run = await asyncio.to_thread(_get, _runs(service), run_id, tenant)
    if run.status != "completed":
        raise ApiError(409, f"batch {run_id!r} is {run.status}: its output is written when it completes", "id",
                       "batch_not_completed")
    return FileResponse(Path(run.output_uri), media_type="application/jsonl", filename=f"{run_id}.jsonl")


# -- reading the request ---------------------------------------------------------------------
async def _read_request(request: Request) -> tuple[dict, list]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if ctype in JSONL_TYPES:
        q = request.query_params
        options: dict = {"mode": q.get("mode", "loglik")}
        if "chunk_size" in q:
            options["chunk_size"] = _int_param(q["chunk_size"], "chunk_size")
        if "token_logprobs" in q:
            options["token_logprobs"] = q["token_logprobs"].lower() in ("1", "true", "yes")
        records = await asyncio.to_thread(lambda: list(jsonl_records(body.splitlines())))
    else:
        doc = parse_json(body)          # strict: deep nesting, lone surrogates, NaN are a 400
        if not isinstance(doc, dict) or not isinstance(doc.get("input"), list):
            raise ApiError(400, "the body must be a JSON object with an 'input' list of rows (or send JSONL with "
                                "Content-Type application/jsonl)", "input", "invalid_value")
        unknown = sorted(set(doc) - {"input", "mode", "chunk_size", "token_logprobs"})
        if unknown:
            raise ApiError(400, f"unknown fields {unknown}", unknown[0], "invalid_value")
        options, records = {k: v for k, v in doc.items() if k != "input"}, doc["input"]
    if not records:
        raise ApiError(400, "the batch holds no rows", "input", "invalid_value")
    if len(records) > MAX_ROWS:
        raise ApiError(400, f"at most {MAX_ROWS:,} rows a batch, got {len(records):,}", "input", "invalid_value")
    return options, records


async def _refuse_hidden_adapters(service: JobService, rows: list[Row], tenant: str) -> None:
    """Rows naming an adapter this tenant may not use fail alone, with the API's own message."""
    verdicts: dict[str, str | None] = {}
    for row in rows:
        if row.job is None:
            continue
        names = [row.job["adapter"]] if row.job.get("adapter") else [a["id"] for a in row.job.get("adapters") or []]
        for name in names:
            if name not in verdicts:
                try:
                    await service.check_adapter(name, "adapter", tenant)
                    verdicts[name] = None
                except ApiError as e:
                    verdicts[name] = e.message
            if verdicts[name] is not None:
                row.job, row.error = None, verdicts[name]
                break


def _int_param(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {value!r}", name, "invalid_value") from None

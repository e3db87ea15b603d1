"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``."""
from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from producer.api import openai_format as fmt
from producer.api.errors import ApiError
from producer.api.openai_schema import ChatRequest, CompletionRequest
from producer.api.request_body import json_body
from producer.api.service import JobService
from producer.errors import JobTimeoutError

CHAT_DEFAULT_MAX_TOKENS = 256
router = APIRouter()


async def read_body(request: Request, schema: type[BaseModel]):
    data = await json_body(request)
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}" if param else msg, param, "invalid_value") from e


def _params(req, max_tokens: int, logprobs: int | None, echo: bool = False) -> dict:
    p = {"max_tokens": max_tokens, "echo": echo, "ignore_eos": req.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed", "stop"):
        v = getattr(req, name)
        if v is not None:
            p[name] = float(v) if name in ("temperature", "top_p") else v
    if logprobs is not None:
        p["logprobs"] = logprobs
    return p


@router.post("/v1/completions")
async def completions(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    req = await read_body(request, CompletionRequest)
    adapter = await service.adapter_for_model(req.model, tenant)
    prompt_tokens = service.check_length(req.prompt)
    field = "input_ids" if isinstance(req.prompt, list) else "prompt"
    job = {"id": f"cmpl-{uuid.uuid4().hex}", "adapter": adapter, field: req.prompt,
           "params": _params(req, req.max_tokens or 16, req.logprobs, req.echo)}
    handle = await service.submit(job, tenant, "completions")
    echo = req.prompt if req.echo and isinstance(req.prompt, str) else None
    if req.stream:
        return await _stream(service, handle.id, req, chat=False, echo=echo, prompt_tokens=prompt_tokens or 0,
                             want_logprobs=req.logprobs is not None)
    res = await _wait(service, handle.id)
    return fmt.completion(res, req.model, service.info, len(echo) if echo else 0)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    req = await read_body(request, ChatRequest)
    adapter = await service.adapter_for_model(req.model, tenant)
    try:
        prompt = service.info.render_chat(req.messages)
    except Exception as e:    # a template's raise_exception, or a template bug
        raise ApiError(400, f"messages: the chat template refused them: {e}", "messages", "invalid_value") from e
    prompt_tokens = service.check_length(prompt)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    job = {"id": f"chatcmpl-{uuid.uuid4().hex}", "adapter": adapter, "prompt": prompt,
           "params": _params(req, req.max_new_tokens(CHAT_DEFAULT_MAX_TOKENS), logprobs)}
    handle = await service.submit(job, tenant, "chat")
    if req.stream:
        return await _stream(service, handle.id, req, chat=True, echo=None, prompt_tokens=prompt_tokens or 0,
                             want_logprobs=req.logprobs)
    res = await _wait(service, handle.id)
    return fmt.chat_completion(res, req.model, service.info)


@router.get("/v1/models")
async def models(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    base = service.settings.base_model
    now = int(time.time())
    data = [{"id": base, "object": "model", "created": now, "owned_by": "openlora", "root": base, "parent": None}]
    data += [{"id": a, "object": "model", "created": now, "owned_by": "openlora", "root": a, "parent": base}
             for a in sorted(await service.known_adapters(tenant))]
    return {"object": "list", "data": data}


async def _wait(service: JobService, job_id: str):
    try:
        res = await service.client.wait(job_id, timeout=service.settings.request_timeout_s)
    except JobTimeoutError as e:
        await service.client.cancel(job_id)
        raise ApiError(504, f"job {job_id} did not finish in {service.settings.request_timeout_s} s; "
                            "it was cancelled", None, "timeout") from e
    if res.status == "failed" and not res.token_ids:
        raise ApiError(service.status_of_worker_error(res.error), res.error or "the job failed", None, "job_failed")
    service.metrics.tokens.inc(res.completion_tokens)
    return res


async def _stream(service: JobService, job_id: str, req, *, chat: bool, echo: str | None, prompt_tokens: int,
                  want_logprobs: bool):
    """Wait for the first chunk before answering, so that a job the workers refuse is a 4xx, not a
    200 stream holding an error; then stream SSE. A client that goes away cancels its job."""
    t0 = time.monotonic()
    chunks = service.client.stream(job_id, timeout=service.settings.request_timeout_s)
    try:
        first = await anext(chunks)
    except JobTimeoutError as e:
        await service.client.cancel(job_id)
        raise ApiError(504, f"job {job_id} produced nothing in time; it was cancelled", None, "timeout") from e
    if first.final and first.error and first.seq == 0 and not first.token_ids:
        await chunks.aclose()
        status = service.status_of_worker_error(first.error)
        return JSONResponse(ApiError(status, first.error, None, "job_failed").body(), status_code=status)
    m = service.metrics
    if first.token_ids:
        m.ttft.observe(time.monotonic() - t0)
    f = fmt.StreamFormatter(job_id, req.model, chat, service.info, req.include_usage)

    async def events():
        done, last = False, time.monotonic()
        try:
            for line in f.start(echo):
                yield line
            c = first
            while True:
                for line in f.chunk(c, want_logprobs):
                    yield line
                m.tokens.inc(len(c.token_ids))
                if c.final:
                    done = True
                    break
                c = await anext(chunks)
                now = time.monotonic()
                if c.token_ids:
                    for _ in c.token_ids:
                        m.per_token.observe((now - last) / len(c.token_ids))
                    last = now
            res = await service.client.result(job_id)
            for line in f.end(res, prompt_tokens):
                yield line
        except JobTimeoutError:
            yield fmt_error("the job did not finish in time; it was cancelled")
            yield "data: [DONE]\n\n"
        finally:
            await chunks.aclose()
            if not done:
                await service.client.cancel(job_id)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def fmt_error(message: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': 'timeout_error', 'param': None, 'code': 'timeout'}})}\n\n"

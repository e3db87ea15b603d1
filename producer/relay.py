"""The websocket relay: ``/v1/jobs/{id}/stream`` replays what a client missed, then follows live.

    ws://host:8001/v1/jobs/<id>/stream?after=<tokens already received>
    -> {"type": "chunk", "seq", "end", "text", "token_ids", ["logprobs"], ["finish_reason"], ["error"]} ...
    -> {"type": "result", ...the JobResult...}, then close 1000

Authenticates like the API (``Authorization: Bearer`` or ``?api_key=``); another tenant's job
is a 404. The replay stream is the gap-free copy (XRANGE, then one XREAD BLOCK shared by every
client: ``StreamHub``), and ``ChunkCursor`` drops what the client already has, so a reconnect or
a worker's re-run shows no duplicate or gap; a Redis restart only pauses the stream.
Errors close the socket with 4400 (bad ``after``), 4401 (auth), 4404 (no such job) or 4429 (the
tenant's rate limit), after a ``{"type": "error", ...}`` message; 1013 while Redis is unreachable.
"""
from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from redis.exceptions import RedisError

from producer.api.auth import install_log_redaction
from producer.api.errors import ApiError, error_body
from producer.api.service import JobService
from producer.api.settings import ApiSettings
from producer.protocol import Chunk


def create_relay_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    install_log_redaction()          # ?api_key= is in the paths uvicorn logs
    service = JobService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.keys.log_mode("relay")
        yield
        await service.aclose()

    app = FastAPI(title="OpenLoRA relay", lifespan=lifespan)
    app.state.service = service
    app.add_api_websocket_route("/v1/jobs/{job_id:path}/stream", relay_job)

    @app.get("/healthz")
    async def healthz():
        await service.redis.ping()
        return {"status": "ok"}
    return app


async def relay_job(websocket: WebSocket, job_id: str):
    service: JobService = websocket.app.state.service
    await websocket.accept()
    try:
        tenant = service.tenant(websocket.headers.get("authorization"), websocket.query_params.get("api_key"))
        after = _after(websocket.query_params.get("after"))
        wait = await service.limits.take(tenant)
        if wait is not None:
            raise service.limits.refusal(tenant, wait)
        await service.check_owner(job_id, tenant)
    except ApiError as e:
        await websocket.send_json({"type": "error", **error_body(e.status, e.message, e.param, e.code)})
        await websocket.close(code=4000 + e.status, reason=e.message[:120])
        return
    except RedisError as e:            # Redis restarting: the client should come back (1013 = try again later)
        await websocket.send_json({"type": "error", **error_body(503, f"redis unavailable: {e}", None, "unavailable")})
        await websocket.close(code=1013, reason="redis unavailable")
        return
    gone = asyncio.create_task(_until_disconnect(websocket))
    forward = asyncio.create_task(_forward(websocket, service, job_id, after))
    done, _ = await asyncio.wait({gone, forward}, return_when=asyncio.FIRST_COMPLETED)
    for t in (gone, forward):
        t.cancel()
    await asyncio.gather(gone, forward, return_exceptions=True)
    if forward in done and forward.exception() is None:
        try:
            await websocket.close(code=1000)
        except (WebSocketDisconnect, RuntimeError):
            pass     # the client left first, having read the result


async def _forward(websocket: WebSocket, service: JobService, job_id: str, after: int) -> None:
    chunks = service.client.stream(job_id, from_seq=after)
    try:
        async for c in chunks:
            await websocket.send_text(_chunk_message(c))
            if c.final:
                break
    finally:
        await chunks.aclose()
    res = await service.client.hub.result(job_id)
    await websocket.send_text(json.dumps({"type": "result", **(asdict(res) if res else {"id": job_id})}))


async def _until_disconnect(websocket: WebSocket) -> None:
    try:
        while True:
            await websocket.receive_text()     # clients need not send anything; this notices them leave
    except (WebSocketDisconnect, RuntimeError):
        return


def _chunk_message(c: Chunk) -> str:
    body = {"type": "chunk", "seq": c.seq, "end": c.end, "text": c.text, "token_ids": c.token_ids}
    for name in ("logprobs", "finish_reason", "error"):
        if getattr(c, name) is not None:
            body[name] = getattr(c, name)
    return json.dumps(body, separators=(",", ":"))


def _after(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if not raw.isdigit():
        raise ApiError(400, f"after must be a non-negative integer (tokens already received), got {raw!r}",
                       "after", "invalid_value")
    return int(raw)

"""Request bodies: a size cap for every route, and the one JSON parser of the JSON routes.

``BodyLimitMiddleware`` refuses a body over ``max_bytes`` with 413 before a route
reads it: at once when Content-Length says so, else as soon as a chunked body
passes the limit, so no request can make the API buffer more than that.
Adapter uploads (``/v1/adapters``, capped by their route) are exempt; batch datasets
(``/v1/batches``) have their own, larger cap.

``json_body`` is how a route reads its JSON: a JSON content type (or none),
then strict RFC 8259 JSON (pydantic-core's parser: UTF-8 only, no NaN or
Infinity literals, no lone surrogates, nesting bounded), every failure a 400.
Python's ``json`` would raise RecursionError on deep nesting (a 500) and hand
lone surrogates to the tokenizer and Redis, which cannot encode them.
"""
from __future__ import annotations

from pydantic_core import from_json
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse

from producer.api.errors import ApiError

# routes whose bodies are uploads, far larger than a request: adapter files (capped by their route at the
# adapter size)
UPLOAD_PATHS = ("/v1/adapters",)
DATASET_PATHS = ("/v1/batches",)          # batch inputs: capped at max_batch_bytes instead
JSON_TYPES = ("application/json",)


async def json_body(request: Request):
    """The request's body as JSON; ApiError 415 for another content type, 400 for bad JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), not {ctype[:100]!r}",
                       None, "invalid_content_type")
    return parse_json(await request.body())


def parse_json(raw: bytes):
    """Strict JSON (see the module's docstring); ApiError 400 when it is not."""
    try:
        return from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        raise ApiError(400, f"malformed JSON body: {e}", None, "invalid_json") from e


class BodyLimitMiddleware:
    """ASGI middleware: at most ``max_bytes`` of request body per request (413 past it)."""

    def __init__(self, app, max_bytes: int, exempt: tuple[str, ...] = UPLOAD_PATHS,
                 max_batch_bytes: int = 256 << 20):
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt
        self.max_batch_bytes = max_batch_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            return await self.app(scope, receive, send)
        limit = self.max_batch_bytes if scope["path"].startswith(DATASET_PATHS) else self.max_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(scope, receive, send, length, limit)
        body, seen, more = [], 0, True
        while more:                       # read (at most the limit) here, then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body.append(message)
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
            if seen > limit:
                return await self._refuse(scope, receive, send, None, limit)
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, scope, receive, send, length: str | None, limit: int) -> None:
        size = f"{length} bytes, " if length and length.isdigit() else ""
        setting = "OPENLORA_MAX_BATCH_BYTES" if limit == self.max_batch_bytes else "OPENLORA_MAX_REQUEST_BYTES"
        err = ApiError(413, f"the request body is {size}over the server's limit of {limit} bytes ({setting})",
                       None, "request_too_large")
        # the unread rest of the body is not drained: uvicorn closes the connection after the answer
        await JSONResponse(err.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)


def _replay(messages: list[dict], receive):
    """``receive`` that first hands out ``messages``, then the real one (a streaming response waits on
    it for the client's disconnect)."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()
    return replayed

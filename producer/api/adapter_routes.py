"""``/v1/adapters``: register (upload), list, show and delete LoRA adapters, per tenant.

    POST /v1/adapters            multipart/form-data
        id               'name' or 'namespace/name' ([a-z0-9._-])
        adapter_config   file: adapter_config.json
        adapter_model    file: adapter_model.safetensors (PEFT, safetensors only)
        public           true | false (default false: only your tenant sees it)
        name             display name (optional)
    GET    /v1/adapters          yours, the public ones and the system ones
    GET    /v1/adapters/{id}
    DELETE /v1/adapters/{id}     yours only (every version, files included)

Uploads, not server paths: a path would let a tenant register (read) any file the API can
reach. The client's file names are never used; the two files are written under their fixed
names into a fresh temporary directory, then go through ``db.store.register``: the same
torch-free validation (``db.adapter_check``: no pickle, safetensors header parsed by hand,
shapes against the base model, no NaN/Inf) as the CLI, then a copy into the store.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from db.adapter_check import CONFIG_FILE, WEIGHTS_FILE, AdapterValidationError
from db.adapters import AdapterOwnershipError, validate_adapter_id
from producer.api.errors import ApiError
from producer.api.service import JobService

log = logging.getLogger("openlora.api")
router = APIRouter()
FILE_FIELDS = {"adapter_config": CONFIG_FILE, "adapter_model": WEIGHTS_FILE}
FORM_OVERHEAD = 64 * 1024          # multipart boundaries and small fields, on top of the file bytes
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def _registry(service: JobService):
    if service.registry is None:
        raise ApiError(501, "this server has no adapter registry: start the API with DATABASE_URL set",
                       None, "registry_not_configured")
    return service.registry


def adapter_json(row, tenant: str, base_model: str) -> dict:
    """What a tenant may know about an adapter: not the store path, not another tenant's name."""
    return {"id": row.id, "object": "adapter", "name": row.name, "version": row.version,
            "owned_by": row.tenant if row.tenant == tenant else "openlora", "visibility": row.visibility,
            "parent": base_model, "rank": row.rank, "alpha": row.alpha, "target_modules": row.target_modules,
            "bytes": row.bytes, "sha256": row.sha256, "created": int(row.created_at.timestamp()),
            "updated": int(row.updated_at.timestamp())}


def _not_found(adapter_id: str) -> ApiError:
    return ApiError(404, f"adapter {adapter_id!r} not found", "id", "adapter_not_found")


def _capped(receive, limit: int):
    """``receive`` that refuses a body over ``limit`` bytes while it streams in (chunked uploads too)."""
    seen = 0

    async def capped():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise ApiError(413, f"the upload is over the server's limit of {limit} bytes", None, "upload_too_large")
        return message
    return capped


async def _read_form(request: Request, limit: int):
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, "upload the adapter as multipart/form-data with fields id, adapter_config "
                            f"({CONFIG_FILE}), adapter_model ({WEIGHTS_FILE}), optional public and name",
                       None, "invalid_content_type")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the upload is {length} bytes, over the server's limit of {limit} bytes",
                       None, "upload_too_large")
    capped = Request(request.scope, receive=_capped(request.receive, limit))
    return await capped.form(max_files=len(FILE_FIELDS), max_fields=8, max_part_size=64 * 1024)


def _text_field(form, name: str, default: str | None = None) -> str | None:
    value = form.get(name, default)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name} must be a text field, not a file", name, "invalid_value")
    return value


def _save_uploads(form, into: Path) -> None:
    """Each expected file under its fixed name (never the client's file name)."""
    for field, fixed_name in FILE_FIELDS.items():
        upload = form.get(field)
        if not isinstance(upload, UploadFile):
            raise ApiError(400, f"{field} is missing: attach {fixed_name} as a file field named {field!r}",
                           field, "invalid_value")
        upload.file.seek(0)
        with open(into / fixed_name, "xb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)


@router.post("/v1/adapters")
async def register_adapter(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    registry = _registry(service)
    form = await _read_form(request, service.settings.max_adapter_bytes + FORM_OVERHEAD)
    try:
        adapter_id = _text_field(form, "id")
        if not adapter_id:
            raise ApiError(400, "id is missing: name the adapter ('name' or 'namespace/name')", "id", "invalid_value")
        try:
            validate_adapter_id(adapter_id)
        except ValueError as e:
            raise ApiError(400, str(e), "id", "invalid_value") from e
        public_raw = (_text_field(form, "public", "false") or "").strip().lower()
        if public_raw not in TRUE + FALSE:
            raise ApiError(400, f"public must be true or false, got {public_raw!r}", "public", "invalid_value")
        name = _text_field(form, "name")
        if name is not None and not 0 < len(name) <= 256:
            raise ApiError(400, "name must be 1-256 characters", "name", "invalid_value")
        await _check_id_free(service, registry, adapter_id)
        with tempfile.TemporaryDirectory(prefix="openlora-upload-") as tmp:
            await asyncio.to_thread(_save_uploads, form, Path(tmp))
            try:
                row = await registry.register(Path(tmp), adapter_id, tenant, public_raw in TRUE, name)
            except AdapterValidationError as e:
                service.metrics.refused.labels("400").inc()
                raise ApiError(400, f"adapter refused: {_strip_tmp(str(e), tmp)}", None, "invalid_adapter") from e
            except AdapterOwnershipError as e:
                raise _taken(adapter_id) from e
            except (OSError, ValueError) as e:
                log.exception("storing adapter %r for tenant %r failed", adapter_id, tenant)
                raise ApiError(500, "the adapter could not be stored; see the server log", None, "store_error") from e
    finally:
        await form.close()
    return JSONResponse(adapter_json(row, tenant, service.settings.base_model), status_code=201)


def _strip_tmp(message: str, tmp: str) -> str:
    return message.replace(tmp + "/", "").replace(tmp, "<upload>")


def _taken(adapter_id: str) -> ApiError:
    # one answer whoever holds the id, so that it tells nothing about another tenant's adapters
    return ApiError(409, f"adapter id {adapter_id!r} is taken; choose another id", "id", "adapter_id_taken")


async def _check_id_free(service: JobService, registry, adapter_id: str) -> None:
    """An id the server already serves outside the registry (base model, adapter dirs, workers)
    must not be shadowed: a tenant's adapter would take over other tenants' requests for it."""
    if await registry.get(adapter_id) is not None:
        return                                  # a new version; the registry checks the owner
    if adapter_id == service.settings.base_model or adapter_id in await service.system_adapters():
        raise _taken(adapter_id)


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    rows = await _registry(service).visible_to(tenant)
    return {"object": "list", "data": [adapter_json(r, tenant, service.settings.base_model) for r in rows]}


async def _visible(registry, adapter_id: str, tenant: str):
    """The registry row of ``adapter_id``; 404 if there is none or ``tenant`` may not see it."""
    row = await registry.get(adapter_id)
    if row is None or not registry.visible(row, tenant):
        raise _not_found(adapter_id)
    return row


@router.get("/v1/adapters/{adapter_id:path}")
async def get_adapter(adapter_id: str, request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    registry = _registry(service)
    row = await _visible(registry, adapter_id, tenant)
    return adapter_json(row, tenant, service.settings.base_model)


@router.delete("/v1/adapters/{adapter_id:path}")
async def delete_adapter(adapter_id: str, request: Request):
    service: JobService = request.app.state.service
    tenant = service.tenant(request.headers.get("authorization"))
    registry = _registry(service)
    row = await _visible(registry, adapter_id, tenant)
    if row.tenant != tenant:
        raise ApiError(403, f"adapter {adapter_id!r} is not yours to delete", "id", "not_owner")
    try:
        await registry.delete(adapter_id, tenant)
    except LookupError as e:                    # deleted meanwhile
        raise _not_found(adapter_id) from e
    return {"id": adapter_id, "object": "adapter", "deleted": True}

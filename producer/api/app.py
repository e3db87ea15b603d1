"""The FastAPI app of the HTTP API: ``create_app(settings)``; run it with ``openlora api``."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from producer.api.adapter_routes import router as adapter_router
from producer.api.auth import install_log_redaction
from producer.api.batch_routes import router as batch_router
from producer.api.errors import install_handlers
from producer.api.jobs_routes import router as jobs_router
from producer.api.limits import RateLimitMiddleware
from producer.api.openai_routes import router as openai_router
from producer.api.request_body import BodyLimitMiddleware
from producer.api.service import JobService
from producer.api.settings import ApiSettings


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    install_log_redaction()
    service = JobService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.keys.log_mode("api")
        yield
        await service.aclose()

    app = FastAPI(title="OpenLoRA", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    install_handlers(app)
    app.include_router(openai_router)
    app.include_router(jobs_router)
    app.include_router(adapter_router)
    app.include_router(batch_router)
    app.add_middleware(RateLimitMiddleware, service=service)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes,
                       max_batch_bytes=settings.max_batch_bytes)
    return app

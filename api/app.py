"""The FastAPI application: `create_app(settings)`; serve with `uvicorn --factory api.app:create_app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from api.deps import Services
from api.errors import install_error_handlers
from api.middleware import HttpMetricsMiddleware
from api.routes import decisions, health, jobs, policies
from api.routes.health import CHECK_TIMEOUT_S
from core import __version__
from core.blobs import LocalBlobStore
from core.broker import make_celery
from core.db import migrate
from core.metrics import set_build_info
from core.settings import Settings, get_settings
from policies import load_policies

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API wired to `settings` (default: the environment). Connections open in the lifespan, not here."""
    settings = settings or get_settings()
    app = FastAPI(
        title="modtag",
        version=__version__,
        summary="Image moderation and product tagging: submit images, read decisions.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(HttpMetricsMiddleware)
    for module in (jobs, decisions, policies, health):
        app.include_router(module.router)
    return app


def run(settings: Settings | None = None) -> None:
    """Serve the API on `settings.api_host:api_port` until interrupted."""
    import uvicorn

    settings = settings or get_settings()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    migrate(settings.resolved_database_url)
    loaded = load_policies([settings.policies_dir] if settings.policies_dir else [])
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
    )
    celery = make_celery(settings)
    app.state.services = Services(
        settings=settings,
        policies=loaded,
        celery=celery,
        blobs=LocalBlobStore(settings.resolved_blob_dir),
        redis=client,
    )
    set_build_info("api")
    logger.info("modtag API ready with policies: %s", ", ".join(sorted(loaded)))
    try:
        yield
    finally:
        celery.close()
        client.close()

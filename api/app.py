"""The FastAPI application: `create_app(settings)`; serve with `uvicorn --factory api.app:create_app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from sqlalchemy.exc import IntegrityError

from api.deps import Services
from api.errors import install_error_handlers
from api.middleware import DashboardHeadersMiddleware, HttpMetricsMiddleware
from api.routes import audit, dashboard, decisions, health, jobs, listings, policies, review, shadow
from api.routes.health import CHECK_TIMEOUT_S
from core import __version__
from core.auth import bootstrap_admin_key
from core.blobs import open_blob_store
from core.broker import make_celery
from core.db import migrate, session_scope
from core.errors import AuthError, ConfigError, Forbidden
from core.metrics import POLICY_RELOADS, set_build_info
from core.settings import Settings, get_settings
from policies.registry import PolicyRegistry

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
    app.add_exception_handler(AuthError, dashboard.refusal)  # type: ignore[arg-type]
    app.add_exception_handler(Forbidden, dashboard.refusal)  # type: ignore[arg-type]
    app.add_middleware(DashboardHeadersMiddleware)
    app.add_middleware(HttpMetricsMiddleware)
    for module in (jobs, listings, decisions, review, audit, policies, shadow, health, dashboard):
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
    if settings.migrate_on_start:
        migrate(settings.resolved_database_url)
    _ensure_admin_key(settings)
    # Re-read when the files change (polled at most every 2 s on access): policy edits need no restart.
    loaded = PolicyRegistry(
        [settings.policies_dir] if settings.policies_dir else [],
        on_reload=lambda outcome: POLICY_RELOADS.labels(outcome).inc(),
    )
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
    )
    celery = make_celery(settings)
    app.state.services = Services(
        settings=settings,
        policies=loaded,
        celery=celery,
        blobs=open_blob_store(settings),
        redis=client,
    )
    set_build_info("api")
    logger.info("modtag API ready with policies: %s", ", ".join(sorted(loaded)))
    try:
        yield
    finally:
        celery.close()
        client.close()


def _ensure_admin_key(settings: Settings) -> None:
    """MODTAG_ADMIN_KEY, when set, exists as an admin key of the default tenant (a deployment's first key)."""
    if not settings.auth or settings.admin_key is None:
        return
    try:
        with session_scope(settings.resolved_database_url) as session:
            row, _ = bootstrap_admin_key(session, settings.admin_key.get_secret_value())
        logger.info("bootstrap admin key %s is present", row.prefix)
    except ConfigError as exc:  # revoked on purpose: stay revoked, but keep serving every other key
        logger.warning("%s", exc.message)
    except IntegrityError:  # another replica starting at the same moment created it
        logger.info("bootstrap admin key created by another process")

"""The FastAPI application: `create_app(settings)`; serve with `uvicorn --factory api.app:create_app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import redis
from fastapi import FastAPI
from sqlalchemy.exc import IntegrityError
from starlette.types import ASGIApp

from api.bodies import UploadBudget
from api.deps import Services
from api.docs import install_docs
from api.errors import install_error_handlers
from api.limits import HeaderDeadlineProtocol, RequestLimitsMiddleware
from api.middleware import DashboardHeadersMiddleware, HttpMetricsMiddleware, RequestIdMiddleware
from api.routes import (
    audit,
    banks,
    calibration,
    dashboard,
    dashboard_banks,
    decisions,
    health,
    jobs,
    labels,
    listings,
    policies,
    quality,
    quotas,
    review,
    shadow,
    webhooks,
)
from api.routes import examples as example_sets
from api.routes import lookup as hash_lookup
from api.routes import sso as dashboard_sso
from api.routes.health import CHECK_TIMEOUT_S
from core import __version__
from core.auth import bootstrap_admin_key
from core.blobs import open_blob_store
from core.broker import make_celery
from core.db import migrate, session_scope
from core.errors import AuthError, ConfigError, Forbidden
from core.metrics import POLICY_RELOADS, set_build_info
from core.quotas import QuotaGate
from core.settings import Settings, get_settings
from policies.registry import PolicyRegistry

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger(__name__)


class ModtagApi(FastAPI):
    """FastAPI with the request id outermost, around Starlette's own error middleware: an unexpected error's 500, its
    log line and its access log line carry the request's id like every other answer."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestIdMiddleware(super().build_middleware_stack())


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API wired to `settings` (default: the environment). Connections open in the lifespan, not here."""
    settings = settings or get_settings()
    app = ModtagApi(
        title="modtag",
        version=__version__,
        summary="Image moderation and product tagging: submit images, read decisions.",
        description=(
            "Limits on every request: the request line and headers together at most `MODTAG_MAX_HEADER_BYTES` "
            f"(default {Settings.model_fields['max_header_bytes'].default} bytes; past it 431 `headers_too_large`); "
            "a body at most "
            f"`MODTAG_MAX_BODY_BYTES` (default {Settings.model_fields['max_body_bytes'].default} bytes; 413 "
            "`body_too_large`) except image uploads, which have their own limits; every call to /v1 has its key "
            "checked before its body is read (401, or 429 past the failure limit)."
        ),
        lifespan=_lifespan,
        docs_url=None,  # served by api.docs with local assets
        redoc_url=None,
        redirect_slashes=False,  # api.errors redirects with a relative Location, never one built from Host
    )
    app.state.settings = settings
    app.state.upload_budget = UploadBudget(settings.upload_bytes_in_flight, settings.upload_wait_s)
    app.state.spool_budget = UploadBudget(
        settings.upload_spool_bytes, settings.upload_wait_s, setting="MODTAG_UPLOAD_SPOOL_BYTES"
    )
    install_error_handlers(app)
    app.add_exception_handler(AuthError, dashboard.refusal)  # type: ignore[arg-type]
    app.add_exception_handler(Forbidden, dashboard.refusal)  # type: ignore[arg-type]
    app.add_middleware(DashboardHeadersMiddleware)
    app.add_middleware(RequestLimitsMiddleware, settings=settings)
    app.add_middleware(HttpMetricsMiddleware)  # inside the request id (ModtagApi), which every answer gets
    for module in (jobs, listings, decisions, review, audit, policies, shadow, banks, webhooks, health, dashboard):
        app.include_router(module.router)
    for module in (calibration, labels, quality):  # review labels: calibration, the export, the Quality page
        app.include_router(module.router)
    app.include_router(hash_lookup.router)  # hash lookups across the tenant's banks, shaped like HMA's
    app.include_router(example_sets.router)  # example sets (image embeddings) and similar images
    app.include_router(example_sets.similar_router)
    app.include_router(quotas.router)  # tenant quotas (admin)
    app.include_router(dashboard_sso.router)  # single sign-on for the dashboard (api/sso.py)
    app.include_router(dashboard_banks.router)  # the dashboard's Banks pages
    install_docs(app)
    return app


def run(settings: Settings | None = None) -> None:
    """Serve the API on `settings.api_host:api_port` until interrupted."""
    import uvicorn

    settings = settings or get_settings()
    uvicorn.Server(server_config(create_app(settings), settings)).run()


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How uvicorn serves `app`: h11 with a header-size limit, client addresses from trusted proxies only."""
    import uvicorn

    trusted = settings.trusted_proxies.strip()
    options: dict[str, Any] = {
        "host": settings.api_host,
        "port": settings.api_port,
        # h11 bounds the request line and headers (httptools accepts megabytes of them), and they must arrive
        # within the keep-alive timeout (HeaderDeadlineProtocol); a body within body_read_timeout_s (api.bodies).
        "http": HeaderDeadlineProtocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.api_max_connections,
        # X-Forwarded-For is believed only from proxies an operator listed: never by default, not even loopback.
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or None,
        # uvicorn's loggers go through the root logger, in MODTAG_LOG_FORMAT (core.logs.configure_logging).
        "log_config": None,
        **overrides,
    }
    return uvicorn.Config(app, **options)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.migrate_on_start:
        migrate(settings.resolved_database_url)
    _ensure_admin_key(settings)
    # Re-read when the files change (polled at most every MODTAG_POLICY_RELOAD_S on access): edits need no restart.
    loaded = PolicyRegistry(
        [settings.policies_dir] if settings.policies_dir else [],
        interval_s=settings.policy_reload_s,
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
        quotas=QuotaGate.for_url(settings.redis_url),
    )
    set_build_info("api")
    logger.info("modtag API ready with policies: %s", ", ".join(sorted(loaded)))
    try:
        yield
    finally:
        celery.close()
        client.close()
        app.state.services.quotas.close()


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

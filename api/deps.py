"""Dependencies the routes declare: settings, a database session and the app's services (the caller: api/auth.py)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from redis import Redis
from sqlmodel import Session

from core.blobs import BlobStore
from core.db import get_engine
from core.errors import NotFound
from core.quotas import QuotaGate
from core.settings import Settings
from policies import Policy


@dataclass
class Services:
    """What the lifespan builds once per process and every request shares."""

    settings: Settings
    policies: Mapping[str, Policy]
    celery: Celery
    blobs: BlobStore
    redis: Redis  # readiness and queue-depth gauges, with short timeouts
    quotas: QuotaGate  # tenant submission quotas, in that Redis (core/quotas.py)
    gauges_refreshed_at: float = float("-inf")  # monotonic time of the last scrape-time gauge refresh


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(settings: Annotated[Settings, Depends(get_app_settings)]) -> Iterator[Session]:
    """A session per request; repository functions in core.jobs commit their own writes."""
    with new_session(settings) as session:
        yield session


def new_session(settings: Settings) -> Session:
    """A session on the app's database, for `with` (what `get_session` gives a route)."""
    return Session(get_engine(settings.resolved_database_url), expire_on_commit=False)


def resolve_policy(policies: Mapping[str, Policy], name: str) -> Policy:
    """The loaded policy called `name`, or 404 `policy_not_found` naming the ones there are."""
    policy = policies.get(name)
    if policy is None:
        available = ", ".join(sorted(policies)) or "none"
        raise NotFound(f"no policy named {name[:64]!r}; available: {available}", code="policy_not_found")
    return policy


def get_policies(services: Annotated[Services, Depends(get_services)]) -> Mapping[str, Policy]:
    return services.policies


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
PoliciesDep = Annotated[Mapping[str, Policy], Depends(get_policies)]

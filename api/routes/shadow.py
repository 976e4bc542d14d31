"""Shadow policies: `GET /v1/policies/{name}/shadow`, how often each shadow agrees with the active policy."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from api.auth import Reader
from api.deps import PoliciesDep, SessionDep, resolve_policy
from api.errors import error_responses
from api.schemas import SLUG_PATTERN
from core.public import ShadowReport
from core.shadow import shadow_agreement
from core.tables import as_utc

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get(
    "/{name}/shadow",
    response_model=ShadowReport,
    responses=error_responses(401, 403, 404, 422),
)
def read_shadow_agreement(
    name: str,
    policies: PoliciesDep,
    session: SessionDep,
    principal: Reader,
    since: Annotated[datetime | None, Query(description="Only decisions from this moment on (ISO 8601).")] = None,
    shadow: Annotated[str | None, Query(max_length=64, pattern=SLUG_PATTERN)] = None,
) -> ShadowReport:
    """Agreement between the active policy and each shadow version that ran beside it, for the caller's tenant."""
    policy = resolve_policy(policies, name)
    shadows = sorted(other.name for other in policies.values() if other.shadows == policy.name)
    return ShadowReport(
        policy=policy.name,
        version=policy.version,
        shadows=shadows,
        data=shadow_agreement(
            session,
            policy.name,
            tenant=principal.tenant,
            since=as_utc(since) if since is not None else None,
            shadow=shadow,
        ),
    )

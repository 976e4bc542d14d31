"""Shadow policies: `GET /v1/policies/{name}/shadow`, how often each shadow agrees with the active policy."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Reader
from api.deps import PoliciesDep, SessionDep
from api.errors import error_responses
from api.schemas import SLUG_PATTERN
from api.submissions import resolve_policy
from core.shadow import shadow_agreement
from core.tables import as_utc

router = APIRouter(prefix="/v1/policies", tags=["policies"])


class ShadowSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    shadow: str
    version: str = Field(description="The shadow policy's version; each version is summarised on its own.")
    compared: int = Field(description="Jobs on which both the active policy and this shadow decided.")
    agreed: int
    agreement: float | None = Field(description="agreed / compared (null when nothing was compared).")
    errors: int = Field(description="Jobs the shadow could not decide (a context field it needs, say).")
    confusion: dict[str, dict[str, int]] = Field(description="Counts by active action, then shadow action.")
    first_at: str | None
    last_at: str | None


class ShadowReport(BaseModel):
    policy: str
    version: str = Field(description="The active policy's current version.")
    shadows: list[str] = Field(description="The policies loaded now that shadow this one.")
    data: list[ShadowSummary]


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
) -> dict[str, Any]:
    """Agreement between the active policy and each shadow version that ran beside it, for the caller's tenant."""
    policy = resolve_policy(policies, name)
    shadows = sorted(other.name for other in policies.values() if other.shadows == policy.name)
    return {
        "policy": policy.name,
        "version": policy.version,
        "shadows": shadows,
        "data": shadow_agreement(
            session,
            policy.name,
            tenant=principal.tenant,
            since=as_utc(since) if since is not None else None,
            shadow=shadow,
        ),
    }

"""The loaded policies: `GET /v1/policies`, `GET /v1/policies/{name}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter

from api.auth import Reader
from api.deps import PoliciesDep, resolve_policy
from api.errors import error_responses
from core.public import PolicyList, PolicyReloadError, PolicySummary
from policies import Policy

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("", response_model=PolicyList, responses=error_responses(401, 403))
def list_policies(policies: PoliciesDep, _: Reader) -> PolicyList:
    """Every loaded policy with its version and category names."""
    return PolicyList(
        data=[
            PolicySummary(
                name=policy.name,
                description=policy.description,
                version=policy.version,
                categories=[category.name for category in policy.categories],
            )
            for _, policy in sorted(policies.items())
        ],
        reload_error=_reload_error(policies),
    )


@router.get(
    "/{name}",
    response_model=dict[str, Any],
    responses={
        200: {"description": "The policy as loaded: categories, checks, thresholds and its version."},
        **error_responses(401, 403, 404, 422),
    },
)
def read_policy(name: str, policies: PoliciesDep, _: Reader) -> dict[str, Any]:
    """One policy in full, with its content-hash version."""
    policy = resolve_policy(policies, name)
    return {**policy.model_dump(mode="json"), "version": policy.version}


def _reload_error(policies: Mapping[str, Policy]) -> PolicyReloadError | None:
    error = getattr(policies, "error", None)  # a PolicyRegistry's last failed reload
    if error is None:
        return None
    return PolicyReloadError(code=error.code, message=error.message, at=error.at.isoformat())

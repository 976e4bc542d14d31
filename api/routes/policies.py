"""The loaded policies: `GET /v1/policies`, `GET /v1/policies/{name}`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import PoliciesDep
from api.errors import error_responses
from api.schemas import PolicyList
from api.submissions import resolve_policy

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("", response_model=PolicyList)
def list_policies(policies: PoliciesDep) -> dict[str, Any]:
    """Every loaded policy with its version and category names."""
    return {
        "data": [
            {
                "name": policy.name,
                "description": policy.description,
                "version": policy.version,
                "categories": [category.name for category in policy.categories],
            }
            for _, policy in sorted(policies.items())
        ]
    }


@router.get(
    "/{name}",
    response_model=dict[str, Any],
    responses={
        200: {"description": "The policy as loaded: categories, checks, thresholds and its version."},
        **error_responses(404, 422),
    },
)
def read_policy(name: str, policies: PoliciesDep) -> dict[str, Any]:
    """One policy in full, with its content-hash version."""
    policy = resolve_policy(policies, name)
    return {**policy.model_dump(mode="json"), "version": policy.version}

"""`GET /v1/lookup`: which of the tenant's banks hold a hash the caller already has, shaped like HMA's lookup.

HMA 2.x (OpenMediaMatch `blueprints/matching.py`) answers `GET /m/raw_lookup?signal_type=pdq&signal=<hex>` with
`{"matches": [...]}` (content ids, with `include_distance` their distances). This route takes the same query
parameters and answers the same envelope, each match naming its bank, the bank's kind, the item (`content_id`)
and the distance as a number. A caller checks a hash before it uploads anything, so every role may ask (a submit
key included: it learns no more than submitting the image would tell it); only the caller's tenant's banks are
searched.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.auth import Reader
from api.deps import SessionDep
from api.errors import error_responses
from core.banks import BankMatcher
from core.hashes import DEFAULT_MAX_DISTANCE, PDQ_BITS, parse_pdq, parse_sha256
from core.hashexchange import SIGNAL_COLUMNS, SignalType
from core.public import BankMatchPublic, LookupResult

router = APIRouter(tags=["banks"])


@router.get("/v1/lookup", response_model=LookupResult, responses=error_responses(401, 403, 422))
def lookup(
    request: Request,
    session: SessionDep,
    principal: Reader,
    signal_type: Annotated[SignalType, Query(description="HMA's signal type name.")],
    signal: Annotated[str, Query(pattern=r"^[0-9a-fA-F]{64}$", description="The hash: 64 hex digits.")],
    max_distance: Annotated[
        int, Query(ge=0, le=PDQ_BITS, description="The largest PDQ Hamming distance that matches.")
    ] = DEFAULT_MAX_DISTANCE,
) -> LookupResult:
    """The tenant's banks holding this hash, each with its closest item and distance (roles admin, review, submit)."""
    column = SIGNAL_COLUMNS[signal_type]
    value = parse_pdq(signal) if column == "pdq" else parse_sha256(signal)
    matches = _matcher(request).match_signal(session, principal.tenant, column, value, max_distance)
    return LookupResult(
        matches=[
            BankMatchPublic(
                bank=match.bank,
                kind=match.kind,
                content_id=match.item or "",
                signal_type=match.by or column,
                distance=match.distance or 0,
                allowed_by=match.allowed_by,
            )
            for match in matches
        ]
    )


def _matcher(request: Request) -> BankMatcher:
    """The app's one matcher: its PDQ index per bank is rebuilt only when the bank changed."""
    matcher: BankMatcher | None = getattr(request.app.state, "bank_matcher", None)
    if matcher is None:
        matcher = request.app.state.bank_matcher = BankMatcher()
    return matcher

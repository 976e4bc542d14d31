"""`hash`: a match of the image against one of the tenant's hash banks (exact SHA-256, or PDQ within a distance).

Not a model output: the worker hashes the image and looks it up before any model runs, and when a
category made of hash checks blocks, the models do not run at all (`policies.evaluate.decide_early`).
The score is 1 on a match and 0 otherwise; the evidence names the bank (`query`), the item
(`matched`) and the distance (`scores.distance`, 0 for an exact SHA-256 match).

An image on one of the tenant's allow-list banks (core/banks.py) is not blocked by a block bank: its match
scores 0, and the evidence keeps the item and distance it matched with `seen` naming the allow-list item
("bank/item") that suppressed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints

from core.hashes import DEFAULT_MAX_DISTANCE, PDQ_BITS, BankMatch
from policies.checks.base import BaseCheck, MissingOutput
from policies.outputs import Evidence, ModelOutputs
from policies.requirements import BankQuery, RequirementsBuilder

BankName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]


class HashCheck(BaseCheck):
    """Score 1 when the image is in bank `bank`: the same bytes, or a PDQ hash at most `max_distance` bits away."""

    kind: Literal["hash"]
    bank: BankName
    max_distance: int = Field(default=DEFAULT_MAX_DISTANCE, ge=0, le=PDQ_BITS)

    model_free: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return f"bank {self.bank}"

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.bank(BankQuery(self.bank, self.max_distance))

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        match = outputs.banks.get(self.bank)
        if match is None:
            raise MissingOutput(f"hash bank {self.bank!r}")
        hit = match.item is not None and match.distance is not None and match.distance <= self.max_distance
        if not hit:
            return self.entry(category, score=0.0, query=self.bank)
        return self.entry(
            category,
            score=0.0 if match.allowed_by is not None else 1.0,
            query=self.bank,
            matched=match.item,
            field=match.by,
            seen=match.allowed_by,
            scores={"distance": float(match.distance or 0)},
        )

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        bank = str(entry.get("query") or str(entry.get("text", "")).removeprefix("bank "))
        scores = entry.get("scores") or {}
        distance = scores.get("distance") if isinstance(scores, Mapping) else None
        item = entry.get("matched")
        allowed = entry.get("seen")
        if item is None or not isinstance(distance, (int, float)) or (score <= 0 and allowed is None):
            return ModelOutputs(banks={bank: BankMatch(bank)})
        match = BankMatch(bank, item=str(item), distance=int(distance), by=entry.get("field"))
        return ModelOutputs(banks={bank: replace(match, allowed_by=None if allowed is None else str(allowed))})

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        if entry.matched is None:
            return ""
        distance = int((entry.scores or {}).get("distance", 0))
        how = "the same bytes" if entry.field == "sha256" else f"PDQ distance {distance}"
        allowed = f"; allow-listed by {entry.seen}, so it does not count" if entry.seen else ""
        return f" (item {entry.matched}, {how}{allowed})"

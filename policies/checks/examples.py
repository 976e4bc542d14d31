"""`examples`: the image's nearest labelled examples in one of the tenant's example sets vote (image embeddings).

The worker embeds the image (BLIP's ITC image feature, `Capability.IMAGE_EMBEDDING`) and looks up the `k`
examples of set `set` nearest to it by cosine similarity (`Capability.EXAMPLE_MATCH`, core/embeddings.py).
Each neighbour votes with a weight that grows sharply with its similarity, w = exp((s - s_max) / temperature),
and a positive one votes with its similarity s (clipped at 0), a negative one with 0:

    score = sum(w * max(s, 0) for positive neighbours) / sum(w for all neighbours)

So an image whose nearest examples are positive scores about their similarity (near 1 for a near copy), one
whose nearest are negative scores near 0, and a set with positives only still scores a far-off image low. A
set with no (embedded) examples, or one the tenant does not have, scores 0. The evidence names the set
(`query`), the nearest example's job id and label (`matched`, `field`), and every voting example as
`scores: {"positive:<job id>": similarity, "negative:<job id>": similarity}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from core.vectors import Neighbour
from policies.checks.base import DECIMALS, BaseCheck, MissingOutput
from policies.outputs import Evidence, ModelOutputs
from policies.requirements import ExampleQuery, RequirementsBuilder

SetName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
MAX_K = 100
LABELS = ("positive", "negative")


class ExamplesCheck(BaseCheck):
    """Score by the similarity-weighted votes of the image's `k` nearest examples in the tenant's set `set`."""

    kind: Literal["examples"]
    set: SetName
    k: int = Field(default=10, ge=1, le=MAX_K)
    temperature: float = Field(default=0.05, gt=0.0, le=1.0, allow_inf_nan=False)

    @property
    def label(self) -> str:
        return f"examples {self.set}"

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.example_set(ExampleQuery(self.set, self.k))

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        found = outputs.examples.get(self.set)
        if found is None:
            raise MissingOutput(f"example set {self.set!r}")
        neighbours = sorted(found, key=lambda n: (-n.similarity, n.job_id))[: self.k]
        if not neighbours:
            return self.entry(category, score=0.0, query=self.set, scores={})
        nearest = neighbours[0]
        return self.entry(
            category,
            score=vote(neighbours, self.temperature),
            query=self.set,
            matched=nearest.job_id,
            field=nearest.label,
            scores={f"{n.label}:{n.job_id}": round(n.similarity, DECIMALS) for n in neighbours},
        )

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        name = str(entry.get("query") or str(entry.get("text", "")).removeprefix("examples "))
        scores = entry.get("scores") or {}
        neighbours = []
        for key, similarity in scores.items() if isinstance(scores, Mapping) else ():
            label, _, job_id = str(key).partition(":")
            if label in LABELS and job_id and isinstance(similarity, int | float):
                neighbours.append(Neighbour(job_id, label, float(similarity)))
        return ModelOutputs(examples={name: tuple(neighbours)})

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        if entry.matched is None:
            return " (no examples)"
        similarity = (entry.scores or {}).get(f"{entry.field}:{entry.matched}")
        shown = f", similarity {similarity:.3f}" if similarity is not None else ""
        return f" (nearest: {entry.field} example {entry.matched}{shown})"


def vote(neighbours: list[Neighbour], temperature: float) -> float:
    """The similarity-weighted vote of `neighbours` (see the module's docstring), in [0, 1]."""
    top = max(n.similarity for n in neighbours)
    weights = [math.exp((n.similarity - top) / temperature) for n in neighbours]
    positive = sum(
        w * max(n.similarity, 0.0) for w, n in zip(weights, neighbours, strict=True) if n.label == "positive"
    )
    return round(min(max(positive / sum(weights), 0.0), 1.0), DECIMALS)

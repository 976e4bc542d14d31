"""`describe`: ITM of the image against text from the job's context (a listing's title and description)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from policies.checks.base import BaseCheck, MissingOutput, best_match, probability, scored
from policies.context import context_value, text_chunks
from policies.fields import ContextPath
from policies.outputs import Contradiction, Evidence, ModelOutputs
from policies.problems import PolicyProblems
from policies.requirements import RequirementsBuilder


class DescribeCheck(BaseCheck):
    """ITM of the image against text from the job's context (a listing's title and description).

    Long texts are cut into sentence-sized chunks (BLIP's ITM was trained on short captions) and the
    best chunk counts: a description is mostly claims a photo cannot show ("ships in two days"), so
    the question is whether any part of it matches the photo, not whether all of it does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, serialize_by_alias=True)

    kind: Literal["describe"]
    from_: list[ContextPath] = Field(alias="from", min_length=1, max_length=8)
    max_chunks: int = Field(default=8, ge=1, le=32)
    required: bool = True
    negate: bool = False

    @model_validator(mode="after")
    def _distinct_fields(self) -> DescribeCheck:
        seen: dict[str, int] = {}
        for i, path in enumerate(self.from_):
            if path in seen:
                raise PolicyProblems([(("from", i), f"'{path}' is already listed at from[{seen[path]}]")])
            seen[path] = i
        return self

    @property
    def label(self) -> str:
        return "describe " + ", ".join(self.from_)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.from_)

    def chunks(self, context: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        """(field, chunk) pairs, in field order, at most `max_chunks` in all; no repeats."""
        pairs: list[tuple[str, str]] = []
        seen: set[str] = set()
        for path in self.from_:
            text = context_value(context, path)
            if text is None:
                continue
            for chunk in text_chunks(text, self.max_chunks):
                if chunk not in seen and len(pairs) < self.max_chunks:
                    seen.add(chunk)
                    pairs.append((path, chunk))
        return pairs

    @property
    def needs_context(self) -> bool:
        return self.required

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.describe = True
        if context is not None:
            for _, chunk in self.chunks(context):
                needs.text(chunk)

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        chunks = self.chunks(context)
        if not chunks:  # nothing to compare with: the check does not apply to this job
            return self.entry(category, score=0.0, negate=self.negate, scores={})
        absent = [chunk for _, chunk in chunks if chunk not in outputs.matches]
        if absent:
            raise MissingOutput(f"describe text {absent[0]!r}")
        scores = {chunk: probability(outputs.matches[chunk], f"the describe text {chunk!r}") for _, chunk in chunks}
        best_field, best_chunk = max(chunks, key=lambda pair: scores[pair[1]])
        return self.entry(
            category,
            score=scored(scores[best_chunk], self.negate),
            negate=self.negate,
            matched=best_chunk,
            field=best_field,
            scores=scores,
        )

    def contradiction(self, category: str, entry: Evidence) -> Contradiction | None:
        if not self.negate or entry.matched is None:
            return None
        return Contradiction(
            category=category, field=", ".join(self.fields), claimed=entry.matched, seen=None, score=entry.score
        )

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        scores = entry.get("scores") or {}
        return ModelOutputs(matches={chunk: float(value) for chunk, value in scores.items()})

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        return best_match(entry)

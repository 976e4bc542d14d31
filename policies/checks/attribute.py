"""`attribute`: an open VQA question whose answer is compared with a claimed value from the job's context."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, StringConstraints, ValidationInfo, model_validator

from core.errors import PolicyError
from policies.checks.base import BaseCheck, MissingOutput, is_log_probability, scored, taxonomy_named
from policies.context import context_value
from policies.fields import ContextPath, Text
from policies.outputs import Contradiction, Evidence, ModelOutputs
from policies.problems import Loc, PolicyProblems
from policies.requirements import AnswerQuery, RequirementsBuilder
from policies.taxonomy import MAX_GROUP_VALUES, TagName, Vocabulary

VocabularyRef = Annotated[str, StringConstraints(min_length=3, max_length=129, pattern=r"^[a-z0-9_-]+\.[a-z0-9_-]+$")]


class AttributeCheck(BaseCheck):
    """An open question whose answer is compared with a claimed value from the context.

    The VQA decoder ranks the vocabulary's values (and the claim, when it is outside the vocabulary)
    by likelihood; the score is the agreement P(claim) / P(best answer): 1 when the claim is the
    model's own best answer, near 0 when the model prefers something else. `negate` turns it into
    disagreement (what a "mismatch" category wants). A job without the claim gets score 0, and the
    model is not asked.
    """

    kind: Literal["attribute"]
    question: Text
    field: ContextPath
    vocabulary: VocabularyRef | None = None
    values: list[TagName] | None = Field(default=None, min_length=2, max_length=MAX_GROUP_VALUES)
    synonyms: dict[TagName, TagName] = Field(default_factory=dict)
    required: bool = True
    negate: bool = False

    _vocabulary: Vocabulary = PrivateAttr()
    _source_version: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> AttributeCheck:
        if (self.vocabulary is None) == (self.values is None):
            raise PolicyProblems(
                [((), "an attribute check needs exactly one of 'vocabulary' (taxonomy.group) or 'values' (a list)")]
            )
        values: list[str]
        synonyms: dict[str, str] = {}
        if self.vocabulary is not None:
            taxonomy_name, group_name = self.vocabulary.split(".", 1)
            taxonomy = taxonomy_named(info, taxonomy_name, ("vocabulary",))
            group = taxonomy.group(group_name)
            if group is None:
                known = ", ".join(g.name for g in taxonomy.groups)
                raise PolicyProblems(
                    [(("vocabulary",), f"taxonomy '{taxonomy_name}' has no group '{group_name}'; its groups: {known}")]
                )
            values, synonyms = list(group.values), dict(group.synonyms)
            self._source_version = taxonomy.version
        else:
            values = list(self.values or [])
        base = Vocabulary.of(values, synonyms)
        problems: list[tuple[Loc, str]] = []
        first: dict[str, int] = {}
        for i, value in enumerate(self.values or []):
            key = base.normalise(value)
            if key in first:
                problems.append((("values", i), f"'{value}' repeats values[{first[key]}]; remove one"))
            first.setdefault(key, i)
        for word, target in self.synonyms.items():
            if base.normalise(target) not in base.values:
                problems.append((("synonyms", word), f"synonym '{word}' maps to '{target}', which is not a value"))
        if problems:
            raise PolicyProblems(problems)
        self._vocabulary = Vocabulary.of(values, {**synonyms, **self.synonyms})
        return self

    @property
    def label(self) -> str:
        return f"{self.question} [{self.field}]"

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,)

    @property
    def vocabulary_values(self) -> Vocabulary:
        return self._vocabulary

    def claim(self, context: Mapping[str, Any] | None) -> str | None:
        """The claimed value, normalised onto the vocabulary ("Crimson" -> "red"); None when there is none."""
        raw = context_value(context, self.field)
        return None if raw is None else self._vocabulary.normalise(raw)

    def candidates(self, claimed: str | None) -> tuple[str, ...]:
        return self._vocabulary.candidates(claimed)

    def answer_query(self, claimed: str | None) -> AnswerQuery:
        """What the engine ranks for this check: the vocabulary (and the claim), the claim scored exactly."""
        candidates = self.candidates(claimed)
        digest = json.dumps([self.question, candidates], separators=(",", ":"), ensure_ascii=False)
        key = hashlib.sha256(digest.encode("utf-8")).hexdigest()[:16]
        return AnswerQuery(key, self.question, candidates, () if claimed is None else (claimed,))

    def agreement(self, claimed: str, log_likelihoods: Mapping[str, float]) -> tuple[float, str]:
        """(P(claim) / P(best answer), the best answer) from the candidates' log-likelihoods.

        The ratio needs no normalisation over all candidates, so the engine may leave out those it
        proved less likely than the best.
        """
        best = max(log_likelihoods, key=lambda answer: (log_likelihoods[answer], answer == claimed))
        return math.exp(log_likelihoods[claimed] - log_likelihoods[best]), best

    @property
    def needs_context(self) -> bool:
        return self.required

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        claimed = self.claim(context) if context is not None else None
        if context is not None and claimed is None:
            return  # nothing claimed: the check scores 0 without asking the model
        needs.answer(self.answer_query(claimed))

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        claimed = self.claim(context)
        if claimed is None:  # no claim: the check does not apply to this job
            return self.entry(category, score=0.0, negate=self.negate, field=self.field)
        query = self.answer_query(claimed)
        likelihoods = outputs.answers.get(query.key)
        if likelihoods is None or claimed not in likelihoods:
            raise MissingOutput(f"the likelihood of {claimed!r} as the answer to {self.question!r}")
        values: dict[str, float] = {}
        for candidate, value in likelihoods.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not is_log_probability(float(value)):
                raise PolicyError(
                    f"the log-likelihood of {candidate!r} for {self.question!r} is {value!r}, not a number <= 0",
                    code="evidence_invalid",
                )
            values[candidate] = float(value)
        agreement, best = self.agreement(claimed, values)
        return self.entry(
            category,
            score=scored(agreement, self.negate),
            negate=self.negate,
            field=self.field,
            claimed=claimed,
            seen=best,
            scores=values,
            query=query.key,
        )

    def contradiction(self, category: str, entry: Evidence) -> Contradiction | None:
        if entry.claimed is None or entry.seen == entry.claimed:
            return None
        return Contradiction(
            category=category, field=self.field, claimed=entry.claimed, seen=entry.seen, score=entry.score
        )

    def taxonomy_versions(self) -> dict[str, str]:
        if self.vocabulary and self._source_version:
            return {self.vocabulary.split(".", 1)[0]: self._source_version}
        return {}

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        scores = entry.get("scores") or {}
        if not entry.get("query") or not scores:
            return ModelOutputs()
        return ModelOutputs(answers={str(entry["query"]): {answer: float(value) for answer, value in scores.items()}})

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        if entry.claimed is not None:
            return f" (claimed {entry.claimed!r}, the model answers {entry.seen!r})"
        return f" ({entry.field} not given)"

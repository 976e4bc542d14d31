"""The contract every check kind fulfils, and the scoring helpers kinds share.

A kind is one pydantic model (its schema fields and validation) whose methods say what it asks of
the models (`require`), how it scores their outputs (`evidence`), how a replay reads its stored
evidence back (`replay`), and how its result reads in a decision's reason (`explain`). Evaluation,
replay and the loader know kinds only through this class and the registry in `policies.checks`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import ValidationInfo

from core.errors import PolicyError
from policies.fields import StrictModel, Weight
from policies.outputs import Contradiction, Evidence, ModelOutputs, Tag
from policies.problems import Loc, PolicyProblems
from policies.requirements import RequirementsBuilder
from policies.taxonomy import Taxonomy, builtin_taxonomies

DECIMALS = 6
# float32 softmax outputs can land a hair outside [0, 1]; anything further out is a bug upstream.
_PROBABILITY_SLACK = 1e-4
_SHOWN_CHARS = 60


class MissingOutput(Exception):
    """An output the check needs is absent (collected, then reported together)."""


class BaseCheck(StrictModel):
    """One check of a category. Subclasses set `kind` to a Literal: it is the tag of the union in a policy."""

    kind: str
    weight: Weight = 1.0

    # A category made only of such checks may have no thresholds: it reports (tags) and never acts.
    reports_only: ClassVar[bool] = False
    # Scored without any model (a hash-bank lookup): a category made only of such checks can decide before the models.
    model_free: ClassVar[bool] = False

    @property
    def label(self) -> str:
        """A stable description of the check: it identifies the check in evidence."""
        raise NotImplementedError

    @property
    def fields(self) -> tuple[str, ...]:
        """The context fields the check reads (`title`, `attributes.color`); none for most kinds."""
        return ()

    @property
    def needs_context(self) -> bool:
        """True when a job without any of `fields` cannot be judged (rather than the check scoring 0)."""
        return False

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        """Ask `needs` for what this check reads; with a job's context, for that job's texts and claims too."""
        raise NotImplementedError

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        """The check's evidence from one image's outputs; MissingOutput when an output it needs is absent."""
        raise NotImplementedError

    def tags_from(self, entry: Evidence) -> list[Tag]:
        """The tags this check's evidence gives the image."""
        return []

    def contradiction(self, category: str, entry: Evidence) -> Contradiction | None:
        """The claim of the context this evidence contradicts, when its category fired."""
        return None

    def taxonomy_versions(self) -> dict[str, str]:
        """Taxonomy name -> version of the taxonomies the check uses: they count in the policy's version."""
        return {}

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        """The model outputs a stored evidence entry of this kind records (`score` already checked numeric)."""
        raise NotImplementedError

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        """What a reason adds after "<kind> '<label>' scored <score>": the detail behind the score."""
        return ""

    def entry(self, category: str, **values: Any) -> Evidence:
        """An evidence entry of this check."""
        return Evidence(category=category, kind=self.kind, text=self.label, weight=self.weight, **values)

    def labelled_output(self, outputs: Mapping[str, float], what: str) -> float:
        """The probability the models gave for this check's label (`what` names it in errors); MissingOutput if none."""
        value = outputs.get(self.label)
        if value is None:
            raise MissingOutput(f"{self.kind} {self.label!r}")
        return probability(value, f"the {what} {self.label!r}")


def scored(value: float, negate: bool) -> float:
    """A model's number as a check score: rounded, and turned around when the check is negated."""
    return round(1.0 - value if negate else value, DECIMALS)


def probability(value: object, what: str) -> float:
    """A model output that must be a probability, clipped into [0, 1]; PolicyError `evidence_invalid` otherwise."""
    # numbers.Real admits numpy scalars (float32 is not a float subclass); bool is a Real but not a probability.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise PolicyError(f"the model output for {what} is {value!r}, not a probability", code="evidence_invalid")
    value = float(value)
    if not -_PROBABILITY_SLACK <= value <= 1.0 + _PROBABILITY_SLACK:
        raise PolicyError(
            f"the model output for {what} is {value}, outside [0, 1]; the engine must return probabilities",
            code="evidence_invalid",
        )
    return min(max(float(value), 0.0), 1.0)


def is_log_probability(value: float) -> bool:
    return math.isfinite(value) and value <= 1e-6


def shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def best_match(entry: Evidence) -> str:
    """The explanation of a check whose evidence names its best match (a chunk, a tag, a caption hit)."""
    return f" (best: {shorten(entry.matched)!r})" if entry.matched is not None else ""


def taxonomy_named(info: ValidationInfo, name: str, where: Loc) -> Taxonomy:
    """The taxonomy a check names, from the loader's validation context (the built-ins when none is given)."""
    taxonomies = (info.context or {}).get("taxonomies") if isinstance(info.context, Mapping) else None
    if taxonomies is None:
        taxonomies = builtin_taxonomies()
    taxonomy = taxonomies.get(name)
    if taxonomy is None:
        known = ", ".join(sorted(taxonomies)) or "none"
        raise PolicyProblems(
            [
                (
                    where,
                    f"no taxonomy named '{name}'; loaded taxonomies: {known} (files in taxonomies/ beside policies)",
                )
            ]
        )
    return taxonomy

"""What the models computed for one image, and what each check made of it (evidence, tags, contradictions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from core.hashes import BankMatch


@dataclass(frozen=True)
class ModelOutputs:
    """What the engine computed for one image.

    `answers`: per answer query key, the log-likelihood of candidate answers (the decoder's sum of token
    log-probabilities, eos included): the required ones and every one that could be the best.
    `tags`: per tag set key, the ITM probability of each tag text the engine re-ranked (the top k of
    each group by ITC similarity).
    `banks`: per bank name, the closest known item to the image (not a model output: the worker's hash step).
    """

    caption: str | None = None
    probes: Mapping[str, float] = field(default_factory=dict)
    matches: Mapping[str, float] = field(default_factory=dict)
    answers: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    tags: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    banks: Mapping[str, BankMatch] = field(default_factory=dict)

    def merged(self, fresh: ModelOutputs) -> ModelOutputs:
        """These outputs completed with `fresh` ones (fresh wins where both have a value)."""
        return ModelOutputs(
            caption=fresh.caption if fresh.caption is not None else self.caption,
            probes={**self.probes, **fresh.probes},
            matches={**self.matches, **fresh.matches},
            answers={**self.answers, **fresh.answers},
            tags={**self.tags, **fresh.tags},
            banks={**self.banks, **fresh.banks},
        )


class Evidence(BaseModel):
    """One check's result. Scores are rounded to 6 decimals so that re-evaluating stored evidence is exact.

    `scores` keeps the model outputs behind the score (describe: ITM per chunk; attribute: log-likelihood
    per ranked answer; tags: ITM per re-ranked tag text), so a replay can reuse them instead of re-running models.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str
    kind: str
    text: str  # the check's label: it identifies the check
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    weight: float = 1.0
    negate: bool = False  # probe, describe, attribute: the score is 1 - the model's number
    matched: str | None = None  # caption: the matched text; describe: the best chunk; tags: the best tag
    field: str | None = None  # describe: the context field of the best chunk; attribute: the claimed field
    claimed: str | None = None  # attribute: the claimed value, normalised onto the vocabulary
    seen: str | None = None  # attribute: the model's most likely answer
    scores: dict[str, float] | None = None
    query: str | None = None  # attribute: the answer query key; tags: the tag set key


class Tag(BaseModel):
    """A tag the image was given: its name, its group in the taxonomy, and its ITM score."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tag: str
    group: str
    score: float


class Contradiction(BaseModel):
    """A claim of the job's context that the photo contradicts, from a category that fired."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str
    field: str  # "attributes.color", or the describe check's fields ("title, description")
    claimed: str  # the claimed value, or the description chunk that matched best
    seen: str | None  # what the model answered instead (attribute checks)
    score: float

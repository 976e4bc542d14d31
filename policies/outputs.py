"""What the models computed for one image, and what each check made of it (evidence, tags, contradictions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.hashes import BankMatch
from core.vectors import Neighbour
from policies.capabilities import Capability


@dataclass(frozen=True)
class TextLine:
    """One line of text read in an image: what it says, the reader's confidence, and where (image pixels)."""

    text: str
    score: float  # the recognition confidence, in [0, 1]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: the axis-aligned bounds of the line, x1 and y1 exclusive

    def public(self) -> dict[str, Any]:
        """The line as a decision stores it: `{"text", "score", "box": [x0, y0, x1, y1]}`."""
        return {"text": self.text, "score": round(self.score, 4), "box": list(self.box)}

    @classmethod
    def from_public(cls, value: Mapping[str, Any]) -> TextLine:
        """A stored line read back (a decision's `text` entry); ValueError when it is not one."""
        box = value.get("box")
        if not isinstance(box, list | tuple) or len(box) != 4:
            raise ValueError(f"a text line's box must be [x0, y0, x1, y1], not {box!r}")
        return cls(str(value.get("text", "")), float(value.get("score", 0.0)), tuple(int(v) for v in box))  # type: ignore[arg-type]


class ModelOutputs:
    """What the models computed for one image, keyed by capability (`policies.capabilities`).

    Built with one keyword per capability's value (`ModelOutputs(caption=..., probes={...})`), read
    through the properties below or `get(capability)`. Mapping-valued capabilities:
    `probes`, `matches`: per question or text, a probability.
    `answers`: per answer query key, the log-likelihood of candidate answers (the decoder's sum of token
    log-probabilities, eos included): the required ones and every one that could be the best.
    `tags`: per tag set key, the ITM probability of each tag text the engine re-ranked (the top k of
    each group by ITC similarity).
    `measures`: per pixel measurement name, its value.
    `banks`: per bank name, the closest known item to the image (not a model output: the worker's hash step).
    `examples`: per example set name, its nearest examples to the image, closest first (not a model output:
    the worker's lookup of `embedding` in the tenant's set).
    Single values: `caption` (str), `text` (the lines read, a tuple of TextLine) and `embedding` (the image's
    L2-normalised ITC embedding, a tuple of floats).

    `position` is not a model output: the image's 0-based place in its subject (a listing's photos),
    None for an image judged alone; checks limited to a listing's main photo read it.
    """

    __slots__ = ("_values", "position")

    def __init__(
        self, values: Mapping[Capability, Any] | None = None, /, *, position: int | None = None, **by_name: Any
    ) -> None:
        merged: dict[Capability, Any] = dict(values or {})
        for name, value in by_name.items():
            try:
                merged[Capability(name)] = value
            except ValueError:
                known = ", ".join(c.value for c in Capability)
                raise TypeError(f"ModelOutputs has no capability {name!r}; the capabilities are {known}") from None
        # An empty mapping is no output (nothing was asked); an empty tuple of lines is one (no text was read).
        self._values: dict[Capability, Any] = {
            c: v for c, v in merged.items() if v is not None and not (isinstance(v, Mapping) and not v)
        }
        self.position = position

    def get(self, capability: Capability) -> Any:
        """The output of `capability`, or None when it was not computed."""
        return self._values.get(capability)

    @property
    def capabilities(self) -> frozenset[Capability]:
        """The capabilities these outputs hold a value for."""
        return frozenset(self._values)

    @property
    def caption(self) -> str | None:
        return self._values.get(Capability.CAPTION)

    @property
    def probes(self) -> Mapping[str, float]:
        return self._values.get(Capability.YES_NO, _EMPTY)

    @property
    def matches(self) -> Mapping[str, float]:
        return self._values.get(Capability.TEXT_MATCH, _EMPTY)

    @property
    def answers(self) -> Mapping[str, Mapping[str, float]]:
        return self._values.get(Capability.ANSWER_RANK, _EMPTY)

    @property
    def tags(self) -> Mapping[str, Mapping[str, float]]:
        return self._values.get(Capability.TAGS, _EMPTY)

    @property
    def text(self) -> tuple[TextLine, ...] | None:
        """The lines read, or None when no text reader ran (an image without text has an empty tuple)."""
        return self._values.get(Capability.TEXT_READ)

    @property
    def measures(self) -> Mapping[str, float]:
        return self._values.get(Capability.PIXELS, _EMPTY)

    @property
    def banks(self) -> Mapping[str, BankMatch]:
        return self._values.get(Capability.BANK_MATCH, _EMPTY)

    @property
    def embedding(self) -> tuple[float, ...] | None:
        return self._values.get(Capability.IMAGE_EMBEDDING)

    @property
    def examples(self) -> Mapping[str, tuple[Neighbour, ...]]:
        return self._values.get(Capability.EXAMPLE_MATCH, _EMPTY)

    def merged(self, fresh: ModelOutputs) -> ModelOutputs:
        """These outputs completed with `fresh` ones (fresh wins where both have a value; mappings merge by key)."""
        values = dict(self._values)
        for capability, value in fresh._values.items():
            known = values.get(capability)
            values[capability] = {**known, **value} if isinstance(known, Mapping) else value
        return ModelOutputs(values, position=fresh.position if fresh.position is not None else self.position)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelOutputs):
            return NotImplemented
        return self._values == other._values and self.position == other.position

    def __repr__(self) -> str:
        shown = ", ".join(f"{c.value}={v!r}" for c, v in self._values.items())
        where = f", position={self.position}" if self.position is not None else ""
        return f"ModelOutputs({shown}{where})"


_EMPTY: Mapping[str, Any] = MappingProxyType({})


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

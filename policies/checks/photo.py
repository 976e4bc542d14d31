"""`photo`: a pixel measurement of the image against limits (`min:`, `max:`); no model.

Measures (computed by the worker's pixels family, `worker/families/pixels/measures.py`, except `text_area`):

- `white_background`: the share of the border (the outer ~3% frame) that is near-white.
- `sharpness`: the variance of a 3x3 Laplacian of the grey image at a fixed working size, mapped to
  [0, 1] by a saturating curve (a blurred photo scores clearly lower than the same photo in focus).
- `product_fill`: the share of the frame covered by the bounding box of what differs from the
  background colour (the border's median).
- `min_side`: the shorter side of the original image, in pixels.
- `text_area`: the share of the image covered by the lines OCR read (the union of their boxes, capped at 1).

The check fires (score 1) when the measure is below `min` or above `max` (with both, outside
[min, max]), else scores 0; the evidence keeps the value (`scores: {measure: value}`). `photos: main`
limits it to a listing's first photo: on any other photo it does not apply (score 0, `field` names the
photo), and a lone image counts as a main photo.
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from core.errors import PolicyError
from policies.checks.base import DECIMALS, BaseCheck, MissingOutput
from policies.outputs import Evidence, ModelOutputs, TextLine
from policies.problems import PolicyProblems, did_you_mean
from policies.requirements import RequirementsBuilder

PIXEL_MEASURES: tuple[str, ...] = ("min_side", "product_fill", "sharpness", "white_background")
"""Measures the pixels family computes (besides `width` and `height`, which it always returns)."""
MEASURES: tuple[str, ...] = (*PIXEL_MEASURES, "text_area")
PIXEL_LIMITS = ("min_side",)  # limits in pixels; every other measure is a share in [0, 1]
MAX_SIDE = 100_000
_MAIN = " on the main photo"
_PHOTO_FIELD = re.compile(r"^photo ([1-9][0-9]{0,5})$")


def _known_measure(name: str) -> str:
    if name not in MEASURES:
        close = did_you_mean(name, MEASURES)
        hint = f"did you mean '{close}'? " if close else ""
        raise ValueError(f"unknown measure '{name}'; {hint}known measures: {', '.join(MEASURES)}")
    return name


Measure = Annotated[str, AfterValidator(_known_measure)]
Limit = Annotated[float, Field(ge=0.0, le=MAX_SIDE, allow_inf_nan=False)]


class PhotoCheck(BaseCheck):
    """Score 1 when the image's `measure` is below `min` or above `max`, else 0."""

    kind: Literal["photo"]
    measure: Measure
    min: Limit | None = None
    max: Limit | None = None
    photos: Literal["all", "main"] = "all"

    @model_validator(mode="after")
    def _limits(self) -> PhotoCheck:
        if self.min is None and self.max is None:
            raise ValueError(f"a photo check needs 'min', 'max' or both: the limits of {self.measure}")
        problems = []
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.measure in PIXEL_LIMITS and (value < 1 or value != int(value)):
                problems.append(((name,), f"{self.measure} is in pixels: a whole number from 1 to {MAX_SIDE}"))
            elif self.measure not in PIXEL_LIMITS and value > 1:
                problems.append(((name,), f"{self.measure} is a share of the image: a number in [0, 1]"))
        if not problems and self.min is not None and self.max is not None and self.min > self.max:
            problems.append((("max",), f"max {self.max:g} is below min {self.min:g}"))
        if problems:
            raise PolicyProblems(problems)  # type: ignore[arg-type]
        return self

    @property
    def label(self) -> str:
        if self.min is not None and self.max is not None:
            rule = f"{self.measure} in [{_exact(self.min)}, {_exact(self.max)}]"
        elif self.min is not None:
            rule = f"{self.measure} >= {_exact(self.min)}"
        else:
            rule = f"{self.measure} <= {_exact(self.max)}"
        return rule + (_MAIN if self.photos == "main" else "")

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        if self.measure == "text_area":
            needs.text_lines()
            needs.measure("width")
            needs.measure("height")
        else:
            needs.measure(self.measure)

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        where = None if outputs.position is None else f"photo {outputs.position + 1}"
        applies = self.photos == "all" or outputs.position in (None, 0)
        try:
            values = self._values(outputs)
        except MissingOutput:
            if applies:
                raise
            values = {}  # not the main photo: nothing to measure, nothing missing
        if not applies:
            return self.entry(category, score=0.0, field=where, scores=values or None)
        value = values[self.measure]
        broken = (self.min is not None and value < self.min) or (self.max is not None and value > self.max)
        return self.entry(category, score=1.0 if broken else 0.0, field=where, scores=values)

    def _values(self, outputs: ModelOutputs) -> dict[str, float]:
        """The measure (text_area: with the width and height it was computed from), rounded as evidence keeps it."""
        if self.measure != "text_area":
            return {self.measure: _measured(outputs.measures, self.measure)}
        width, height = _measured(outputs.measures, "width"), _measured(outputs.measures, "height")
        if "text_area" in outputs.measures:  # a replay: the share stored in the evidence
            share = _measured(outputs.measures, "text_area")
        elif outputs.text is None:
            raise MissingOutput("the lines of text read in the image")
        else:
            share = covered_share(outputs.text, int(width), int(height))
        return {"text_area": share, "width": width, "height": height}

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        scores = entry.get("scores") or {}
        measures = {str(name): float(value) for name, value in scores.items() if isinstance(value, (int, float))}
        found = _PHOTO_FIELD.match(str(entry.get("field") or ""))
        position = int(found.group(1)) - 1 if found else None
        return ModelOutputs(measures=measures or None, position=position)

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        found = _PHOTO_FIELD.match(entry.field or "")
        if entry.text.endswith(_MAIN) and found and found.group(1) != "1":
            return " (not the main photo)"
        measure = entry.text.split(" ", 1)[0]
        value = (entry.scores or {}).get(measure)
        if value is None:
            return ""
        limits = _limits_in(entry.text)
        low, high = limits.get("min"), limits.get("max")
        if low is not None and value < low:
            return f" ({measure} {value:g} < min {low:g})"
        if high is not None and value > high:
            return f" ({measure} {value:g} > max {high:g})"
        return f" ({measure} {value:g})"


def covered_share(lines: Iterable[TextLine], width: int, height: int) -> float:
    """The share of a width x height image covered by the lines' boxes: the area of their union, capped at 1."""
    if width <= 0 or height <= 0:
        return 0.0
    boxes = []
    for line in lines:
        x0, y0, x1, y1 = line.box
        x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
        y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    # Sweep over the x edges: in each vertical strip, the union of the y intervals that span it.
    xs = sorted({x for x0, _, x1, _ in boxes for x in (x0, x1)})
    area = 0
    for left, right in itertools.pairwise(xs):
        spans = sorted((y0, y1) for x0, y0, x1, y1 in boxes if x0 <= left and x1 >= right)
        covered, reach = 0, -1
        for y0, y1 in spans:
            if y1 <= reach:
                continue
            covered += y1 - max(y0, reach)
            reach = y1
        area += covered * (right - left)
    return round(min(1.0, area / (width * height)), DECIMALS)


def _measured(measures: Mapping[str, float], name: str) -> float:
    value = measures.get(name)
    if value is None:
        raise MissingOutput(f"the pixel measure {name!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise PolicyError(f"the pixel measure {name!r} is {value!r}, not a number", code="evidence_invalid")
    return round(float(value), DECIMALS)


def _exact(limit: float | None) -> str:
    """A limit as the label states it: exactly (a label identifies the check, and `explain` reads it back)."""
    value = float(limit or 0.0)
    return str(int(value)) if value.is_integer() else repr(value)


def _limits_in(label: str) -> dict[str, float]:
    """The limits a photo check's label states ("sharpness in [0.2, 0.9]", "min_side >= 600")."""
    rule = label.removesuffix(_MAIN)
    if found := re.search(r" in \[([0-9.e+-]+), ([0-9.e+-]+)\]$", rule):
        return {"min": float(found.group(1)), "max": float(found.group(2))}
    if found := re.search(r" >= ([0-9.e+-]+)$", rule):
        return {"min": float(found.group(1))}
    if found := re.search(r" <= ([0-9.e+-]+)$", rule):
        return {"max": float(found.group(1))}
    return {}

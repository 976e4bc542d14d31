"""Pixel measurements (white background, sharpness, product fill, size): numpy on the decoded image, no model.

A family like the others so that checks ask for measurements as a capability; it loads nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from core.settings import Settings
from policies import ModelOutputs, Requirements
from policies.capabilities import Capability
from worker.families.base import Family, FamilyBatch, ImageWork, LoadedFamily


class PixelFamily:
    """The measurements of `worker/families/pixels/measures.py` behind the family protocol."""

    def run_batch(self, work: Sequence[ImageWork]) -> FamilyBatch:
        from worker.families.pixels.measures import measure

        started = time.perf_counter()
        outputs = [ModelOutputs(measures=measure(item.image, item.needs.measures)) for item in work]
        return FamilyBatch(outputs=outputs, timings={("pixels", "measures"): time.perf_counter() - started})

    def warm(self, needs: Requirements) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"random": False, "device": "cpu", "dtype": "float32", "roles": {}}

    @property
    def load_seconds(self) -> Mapping[str, float]:
        return {}


def _load(settings: Settings, capabilities: frozenset[Capability]) -> LoadedFamily:
    return PixelFamily()


FAMILY = Family("pixels", frozenset({Capability.PIXELS}), _load)

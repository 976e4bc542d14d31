"""OCR: the lines of text in an image, with RapidOCR's PP-OCR models (ONNX Runtime; shipped in its wheel).

The weights are real and install offline (the `rapidocr-onnxruntime` wheel, Apache-2.0); nothing is
downloaded. The reader runs on the worker's model thread with the one thread budget of the worker
(`worker.families.base.thread_budget`), after or before torch, never beside it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core import metrics
from core.settings import Settings
from policies import ModelOutputs, Requirements
from policies.capabilities import Capability
from worker.families.base import Family, FamilyBatch, ImageWork, LoadedFamily, thread_budget

if TYPE_CHECKING:
    from worker.families.ocr.reader import TextReader


class OcrFamily:
    """A TextReader behind the family protocol."""

    def __init__(self, reader: TextReader, load_seconds: float) -> None:
        self.reader = reader
        self._load_seconds = load_seconds

    def run_batch(self, work: Sequence[ImageWork]) -> FamilyBatch:
        started = time.perf_counter()
        lines = self.reader.read([item.image for item in work])
        return FamilyBatch(
            outputs=[ModelOutputs(text=read) for read in lines],
            timings={("ocr", "text"): time.perf_counter() - started},
        )

    def warm(self, needs: Requirements) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"random": False, "device": "cpu", "dtype": "float32", "roles": {"ocr": self.reader.describe()}}

    @property
    def load_seconds(self) -> Mapping[str, float]:
        return {"ocr": self._load_seconds}


def _load(settings: Settings, capabilities: frozenset[Capability]) -> LoadedFamily:
    from worker.families.ocr.reader import TextReader

    started = time.perf_counter()
    reader = TextReader.from_wheel(threads=thread_budget(settings))
    seconds = time.perf_counter() - started
    metrics.MODEL_LOAD.labels("ocr").set(seconds)
    return OcrFamily(reader, seconds)


FAMILY = Family("ocr", frozenset({Capability.TEXT_READ}), _load)

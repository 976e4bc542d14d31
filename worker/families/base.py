"""The model-family protocol: what a family declares (its capabilities), how it loads, runs a batch, describes itself.

A family is a package under `worker/families/` exposing one `FAMILY` and one line in the registry
(`worker/families/__init__.py`). Checks never name a family: they ask for capabilities
(`policies.capabilities`), and the inference service loads the families that declare the capabilities a
loaded policy needs, on its one model thread, and runs each on the part of a micro-batch that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.settings import Settings
from policies import ModelOutputs, Requirements
from policies.capabilities import Capability

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class ImageWork:
    """One image of a micro-batch and what its policy (and shadows) need computed for it."""

    image: Image.Image
    needs: Requirements


@dataclass
class FamilyBatch:
    """A family's results for its part of a batch: one output per image, and its compute time per (model, stage)."""

    outputs: list[ModelOutputs]
    timings: dict[tuple[str, str], float] = field(default_factory=dict)  # for the whole batch, in seconds


class LoadedFamily(Protocol):
    """A family's models, loaded on the model thread; every method runs there."""

    def run_batch(self, work: Sequence[ImageWork]) -> FamilyBatch:
        """Compute what each image needs of this family's capabilities (the rest of its needs is ignored)."""
        ...

    def warm(self, needs: Requirements) -> None:
        """Prepare what every job of the loaded policies will ask (cached text features...), between batches."""
        ...

    def describe(self) -> dict[str, Any]:
        """What a decision's `models` records: `{"random", "device", "dtype", "roles": {role: {...}}}`."""
        ...

    @property
    def load_seconds(self) -> Mapping[str, float]:
        """Seconds each model (role) took to load."""
        ...


@dataclass(frozen=True)
class Family:
    """A model family as the registry knows it: its name, the capabilities it computes, and how it loads.

    `load(settings, capabilities)` loads only what `capabilities` (a subset of the family's) needs, on the
    calling thread (the model thread); it raises ModelError or ConfigError with what to do.
    """

    name: str
    capabilities: frozenset[Capability]
    load: Callable[[Settings, frozenset[Capability]], LoadedFamily]


def thread_budget(settings: Settings) -> int:
    """The threads one worker's model thread computes with, shared by every family (they take turns on it).

    MODTAG_TORCH_THREADS when set, else the cores this process may run on: torch and ONNX Runtime each
    size their pool by it, and since both run only on the one model thread, one after the other, the
    pools never compete for the cores.
    """
    if settings.torch_threads:
        return settings.torch_threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)

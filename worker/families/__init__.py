"""The model families a worker can load, and which of them a set of capabilities needs.

A new family is a package beside these, exposing `FAMILY` (worker/families/base.py), and one line in
FAMILIES; checks ask for its capabilities (`policies.capabilities`) and never name it.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.errors import ConfigError
from policies.capabilities import MODEL_FREE, Capability
from worker.families import blip, ocr, pixels
from worker.families.base import Family, FamilyBatch, ImageWork, LoadedFamily, thread_budget

FAMILIES: tuple[Family, ...] = (blip.FAMILY, ocr.FAMILY, pixels.FAMILY)


def families_for(
    capabilities: Iterable[Capability], families: Iterable[Family] = FAMILIES
) -> list[tuple[Family, frozenset[Capability]]]:
    """The families that compute `capabilities`, each with its share of them, in registry order (the first wins).

    ConfigError `capability_unknown` when no family computes one of them.
    """
    left = set(capabilities) - MODEL_FREE
    chosen: list[tuple[Family, frozenset[Capability]]] = []
    for family in families:
        share = frozenset(left & family.capabilities)
        if share:
            chosen.append((family, share))
            left -= share
    if left:
        names = ", ".join(sorted(capability.value for capability in left))
        raise ConfigError(f"no model family computes {names}", code="capability_unknown")
    return chosen


__all__ = ["FAMILIES", "Family", "FamilyBatch", "ImageWork", "LoadedFamily", "families_for", "thread_budget"]

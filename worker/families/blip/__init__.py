"""BLIP (caption, VQA and ITM models, Hugging Face transformers): the engine, its int8 layers and native kernels.

Which of the three models a set of capabilities needs is decided here; the engine (engine.py) is a
batch calculator that knows no policy, and adapter.py is the one place that maps policy requirements
onto its requests and its results back. Importing this package does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.settings import Settings
from policies.capabilities import Capability
from worker.families.base import Family, LoadedFamily

CAPABILITY_ROLES: dict[Capability, str] = {
    Capability.CAPTION: "caption",
    Capability.YES_NO: "vqa",
    Capability.ANSWER_RANK: "vqa",
    Capability.TEXT_MATCH: "itm",
    Capability.TAGS: "itm",
    Capability.IMAGE_EMBEDDING: "itm",
}
"""The BLIP model (role) that computes each capability."""


def roles_for(capabilities: Iterable[Capability]) -> set[str]:
    """The BLIP models `capabilities` run on (capabilities of other families are ignored)."""
    return {CAPABILITY_ROLES[capability] for capability in capabilities if capability in CAPABILITY_ROLES}


def _load(settings: Settings, capabilities: frozenset[Capability]) -> LoadedFamily:
    from worker.families.blip.adapter import BlipFamily, build_engine

    return BlipFamily(build_engine(settings, roles_for(capabilities)))


FAMILY = Family("blip", frozenset(CAPABILITY_ROLES), _load)

"""The model-family registry: which families a set of capabilities needs, and the one thread budget they share."""

from __future__ import annotations

import os

import pytest

from core.errors import ConfigError
from core.settings import Settings
from policies.capabilities import Capability
from worker.families import FAMILIES, Family, families_for, thread_budget


def named(chosen: list[tuple[Family, frozenset[Capability]]]) -> list[tuple[str, set[str]]]:
    return [(family.name, {c.value for c in share}) for family, share in chosen]


def test_each_capability_goes_to_the_first_family_that_declares_it() -> None:
    wanted = {Capability.CAPTION, Capability.YES_NO, Capability.TEXT_READ, Capability.PIXELS}
    assert named(families_for(wanted)) == [
        ("blip", {"caption", "probes"}),
        ("ocr", {"text"}),
        ("pixels", {"measures"}),
    ]
    assert named(families_for({Capability.TEXT_READ})) == [("ocr", {"text"})]  # BLIP is not loaded for text


def test_the_workers_own_steps_need_no_family() -> None:
    assert families_for({Capability.BANK_MATCH, Capability.EXAMPLE_MATCH}) == []


def test_a_capability_no_registered_family_computes_is_refused_by_name() -> None:
    without_ocr = [family for family in FAMILIES if family.name != "ocr"]
    with pytest.raises(ConfigError, match="no model family computes text") as refused:
        families_for({Capability.CAPTION, Capability.TEXT_READ}, without_ocr)
    assert refused.value.code == "capability_unknown"


def test_every_family_shares_one_thread_budget() -> None:
    assert thread_budget(Settings(_env_file=None, torch_threads=3)) == 3
    assert thread_budget(Settings(_env_file=None)) == len(os.sched_getaffinity(0))

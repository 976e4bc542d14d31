"""The `hash` check kind: a bank match decides before the models; without one the models are still asked."""

from __future__ import annotations

import pytest

from core.errors import PolicyError
from core.hashes import BankMatch
from policies import ModelOutputs, Policy, load_policies
from policies.evaluate import decide_early

MATCH = BankMatch("known_bad", item="0123abcd", distance=12, by="pdq")


@pytest.fixture(scope="module")
def moderation() -> Policy:
    return load_policies([])["moderation"]


def test_moderation_asks_for_its_known_bad_bank(moderation: Policy) -> None:
    needs = moderation.requirements()
    assert [(query.bank, query.max_distance) for query in needs.banks] == [("known_bad", 31)]
    assert needs.probes  # the models are still needed when the bank does not decide


def test_a_bank_match_blocks_before_any_model(moderation: Policy) -> None:
    decision = decide_early(moderation, ModelOutputs(banks={"known_bad": MATCH}))
    assert decision is not None and decision.action == "block"
    assert set(decision.categories) == {"known_bad"} and decision.policy_version == moderation.version
    [entry] = decision.evidence
    assert (entry.kind, entry.query, entry.matched, entry.field, entry.scores) == (
        "hash",
        "known_bad",
        "0123abcd",
        "pdq",
        {"distance": 12.0},
    )
    assert "item 0123abcd, PDQ distance 12" in decision.reason


def test_no_match_or_too_far_leaves_it_to_the_models(moderation: Policy) -> None:
    assert decide_early(moderation, ModelOutputs(banks={"known_bad": BankMatch("known_bad")})) is None
    far = BankMatch("known_bad", item="0123abcd", distance=40, by="pdq")
    assert decide_early(moderation, ModelOutputs(banks={"known_bad": far})) is None
    with pytest.raises(PolicyError) as absent:
        decide_early(moderation, ModelOutputs())
    assert absent.value.code == "evidence_missing"


def test_policies_without_hash_checks_never_decide_early() -> None:
    assert decide_early(load_policies([])["tagging"], ModelOutputs()) is None

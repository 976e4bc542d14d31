"""The contract every registered check kind keeps: it asks for what it scores, and replays from its own evidence.

A new kind in policies/checks/ adds its example here; the rest of this module then holds it to the contract.
"""

from __future__ import annotations

import json

import pytest

from core.errors import PolicyError
from core.hashes import BankMatch
from core.vectors import Neighbour
from policies import ModelOutputs, Policy, Requirements, decide, load_policy_text
from policies.checks import KINDS
from policies.outputs import TextLine
from policies.replay import missing_requirements, outputs_from_evidence

EXAMPLES: dict[str, dict[str, object]] = {
    "attribute": {"question": "what color is the item?", "field": "attributes.color", "values": ["red", "blue"]},
    "caption": {"words": ["mug"], "score": 0.7},
    "describe": {"from": ["title", "description"], "negate": True},
    "examples": {"set": "fakes", "k": 3},
    "hash": {"bank": "known_bad", "max_distance": 31},
    "match": {"text": "a photo of a mug"},
    "photo": {"measure": "white_background", "min": 0.6, "photos": "main"},
    "probe": {"question": "is there a mug in the picture?", "negate": True},
    "tags": {"tags": ["mug", "teapot", "kettle"], "top_k": 2},
    "text": {"detect": ["phone"], "terms": ["whatsapp"], "min_score": 0.5},
}
CONTEXT = {"title": "A red mug", "description": "Ceramic. Holds 300 ml.", "attributes": {"color": "Crimson"}}


def policy_of(kind: str) -> Policy:
    check = {"kind": kind, **EXAMPLES[kind]}
    document = {
        "name": f"only-{kind}",
        "description": f"One {kind} check.",
        "categories": [{"name": "concern", "description": "Anything.", "review": 0.05, "checks": [check]}],
    }
    return load_policy_text(json.dumps(document))  # JSON is YAML


def outputs_for(needs: Requirements) -> ModelOutputs:
    """Model outputs that answer every requirement, as the engine (and the worker's bank lookup) would shape them."""
    return ModelOutputs(
        caption="a red mug on a table" if needs.caption else None,
        probes={question: 0.25 for question in needs.probes},
        matches={text: 0.1 + 0.1 * i for i, text in enumerate(needs.texts)},
        answers={q.key: {answer: -0.5 * (i + 1) for i, answer in enumerate(q.candidates)} for q in needs.answers},
        tags={t.key: {text: 0.9 - 0.2 * i for i, text in enumerate(t.texts[: t.top_k])} for t in needs.tag_sets},
        banks={q.bank: BankMatch(q.bank, item="0123abcd", distance=7, by="pdq") for q in needs.banks},
        text=(TextLine("CALL 555 0142", 0.9, (10, 10, 200, 40)),) if needs.read_text else None,
        measures={name: {"width": 640.0, "height": 480.0}.get(name, 0.3) for name in needs.measures} or None,
        examples={
            q.set: (Neighbour("0a1b", "positive", 0.91), Neighbour("2c3d", "negative", 0.42))[: q.k]
            for q in needs.examples
        },
    )


def test_every_registered_kind_has_an_example() -> None:
    assert set(EXAMPLES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_kind_asks_for_what_it_scores_and_replays_from_its_own_evidence(kind: str) -> None:
    policy = policy_of(kind)
    needs = policy.requirements(CONTEXT)
    outputs = outputs_for(needs)
    decision = decide(policy, outputs, CONTEXT)
    [entry] = decision.evidence
    assert entry.kind == kind and 0.0 < entry.score <= 1.0
    assert decision.reason.startswith("review by 'concern': " + kind)  # the explanation names the check

    stored = [item.model_dump(mode="json") for item in decision.evidence]
    lines = None if outputs.text is None else [line.public() for line in outputs.text]
    replayed = outputs_from_evidence(stored, outputs.caption, lines)  # the caption and lines are stored beside
    assert missing_requirements(needs, replayed).empty  # its evidence records every number it asked for
    assert decide(policy, replayed, CONTEXT) == decision

    with pytest.raises(PolicyError) as absent:
        decide(policy, ModelOutputs(), CONTEXT)
    assert absent.value.code == "evidence_missing"

"""Replay: model outputs rebuilt from stored evidence, and what a new policy still needs the models for.

A stored decision's evidence keeps the model's numbers behind each score (P(yes) of a probe, ITM per
text and per describe chunk, log-likelihoods of an attribute's ranked answers, ITM per re-ranked tag) and the
caption. A new policy version is re-decided from those numbers wherever it asks the models the same
things; only questions, texts, answers or tag sets it adds need inference. Reuse is keyed by what
the model was asked, not by where the check sits, so moving a probe to another category, negating
it or changing a threshold costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.checks import KINDS
from policies.outputs import ModelOutputs, TextLine
from policies.requirements import Requirements


def outputs_from_evidence(
    evidence: Sequence[Mapping[str, Any]], caption: str | None, text: Sequence[Mapping[str, Any]] | None = None
) -> ModelOutputs:
    """The model outputs a stored decision was made from, as far as its evidence records them (per kind).

    The caption and the lines read (`text`) are stored beside the evidence, not in it.
    """
    lines = None if text is None else tuple(TextLine.from_public(line) for line in text)
    outputs = ModelOutputs(caption=caption, text=lines)
    for entry in evidence:
        kind = KINDS.get(str(entry.get("kind")))
        score = entry.get("score")
        if kind is None or not isinstance(score, (int, float)) or isinstance(score, bool):
            continue
        outputs = outputs.merged(kind.replay(entry, float(score)))
    return outputs


def missing_requirements(needs: Requirements, outputs: ModelOutputs) -> Requirements:
    """The part of `needs` that `outputs` does not hold: what inference must still compute."""
    # A ranking is reused whole or not at all: which answers it holds depends on the candidate set.
    answers = [
        query
        for query in needs.answers
        if query.key not in outputs.answers or any(a not in outputs.answers[query.key] for a in query.required)
    ]
    return Requirements(
        caption=needs.caption and outputs.caption is None,
        probes=tuple(q for q in needs.probes if q not in outputs.probes),
        texts=tuple(t for t in needs.texts if t not in outputs.matches),
        answers=tuple(answers),
        tag_sets=tuple(t for t in needs.tag_sets if t.key not in outputs.tags),
        describe=False,
        read_text=needs.read_text and outputs.text is None,
        measures=tuple(m for m in needs.measures if m not in outputs.measures),
    )

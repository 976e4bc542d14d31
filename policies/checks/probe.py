"""`probe`: a yes/no question to the VQA model; score = P(yes), computed by ranking the answers yes/no."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from policies.checks.base import BaseCheck, scored
from policies.fields import Text
from policies.outputs import Evidence, ModelOutputs
from policies.requirements import RequirementsBuilder


class ProbeCheck(BaseCheck):
    """A yes/no question to the VQA model; score = P(yes), or 1 - P(yes) when `negate` is set."""

    kind: Literal["probe"]
    question: Text
    negate: bool = False

    @property
    def label(self) -> str:
        return self.question

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.probe(self.question)

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        p_yes = self.labelled_output(outputs.probes, "probe")
        return self.entry(category, score=scored(p_yes, self.negate), negate=self.negate)

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        text = str(entry.get("text", ""))
        return ModelOutputs(probes={text: round(1.0 - score, 6) if entry.get("negate") else float(score)})

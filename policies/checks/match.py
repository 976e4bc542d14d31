"""`match`: an image-text matching (ITM) score against a fixed text ("a photo of a gun")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from policies.checks.base import BaseCheck, scored
from policies.fields import Text
from policies.outputs import Evidence, ModelOutputs
from policies.requirements import RequirementsBuilder


class MatchCheck(BaseCheck):
    """Image-text matching (ITM) against a fixed text; score = the match probability."""

    kind: Literal["match"]
    text: Text

    @property
    def label(self) -> str:
        return self.text

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.text(self.text)

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        return self.entry(category, score=scored(self.labelled_output(outputs.matches, "match text"), False))

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        return ModelOutputs(matches={str(entry.get("text", "")): float(score)})

"""The field types policy and taxonomy files are written in: strict models, names, single-line texts, thresholds."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from policies.context import check_context_path

MAX_TEXT_CHARS = 300
MAX_DESCRIPTION_CHARS = 2000
MAX_WEIGHT = 1000.0


class StrictModel(BaseModel):
    # strict: YAML's `yes` must not become a threshold of 1.0, nor "0.5" (a quoted string) a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def single_line(text: str) -> str:
    if any(ch in text for ch in "\r\n\t\x00") or not text.isprintable():
        raise ValueError("must be a single line of printable text (no newlines, tabs or control characters)")
    return text


def _printable_paragraphs(text: str) -> str:
    if any(not (ch.isprintable() or ch in "\n\t") for ch in text):
        raise ValueError("must be printable text (control characters are not allowed)")
    return text


Slug = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")]
Text = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(single_line)
]
Description = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_DESCRIPTION_CHARS),
    AfterValidator(_printable_paragraphs),
]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Weight = Annotated[float, Field(gt=0.0, le=MAX_WEIGHT, allow_inf_nan=False)]
ContextPath = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80), AfterValidator(check_context_path)
]

"""Cross-field validation problems with exact locations, shared by the policy and taxonomy schemas."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

Loc = tuple[str | int, ...]
TypeWords = Sequence[tuple[type | tuple[type, ...], str]]


class PolicyProblems(ValueError):
    """Cross-field problems found after the fields themselves validated, each with its own location.

    Pydantic reports a model validator's ValueError at the model's location; carrying the exact
    locations lets the loader point at the offending line instead of the top of the file.
    """

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(f"{format_location(loc)}: {message}" for loc, message in problems))
        self.problems = problems


def format_location(loc: Loc) -> str:
    """A location as a user reads it: `categories[2].checks[0].question`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def type_in_words(value: object, words: TypeWords, otherwise: str) -> str:
    """How an error names what `value` is: the words of the first type it is an instance of, else `otherwise`.

    Order counts: bool is an int, so a table that names both lists bool first."""
    return next((said for kinds, said in words if isinstance(value, kinds)), otherwise)


def did_you_mean(name: str, known: Sequence[str]) -> str | None:
    """The one of `known` that `name` is most likely a typo of, or None: the loader's "did you mean" hints."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None

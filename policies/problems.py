"""Cross-field validation problems with exact locations, shared by the policy and taxonomy schemas."""

from __future__ import annotations

Loc = tuple[str | int, ...]


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

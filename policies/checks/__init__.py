"""The check kinds: one module each, carrying its whole contract (see `policies.checks.base`).

A new kind is a module beside these and one line in KINDS; the schema, the loader's messages,
evaluation and replay read kinds from here.
"""

from __future__ import annotations

from policies.checks.attribute import AttributeCheck
from policies.checks.base import BaseCheck
from policies.checks.caption import CaptionCheck
from policies.checks.describe import DescribeCheck
from policies.checks.examples import ExamplesCheck
from policies.checks.hash import HashCheck
from policies.checks.match import MatchCheck
from policies.checks.photo import PhotoCheck
from policies.checks.probe import ProbeCheck
from policies.checks.tags import TagsCheck
from policies.checks.text import TextCheck

KINDS: dict[str, type[BaseCheck]] = {
    "attribute": AttributeCheck,
    "caption": CaptionCheck,
    "describe": DescribeCheck,
    "examples": ExamplesCheck,
    "hash": HashCheck,
    "match": MatchCheck,
    "photo": PhotoCheck,
    "probe": ProbeCheck,
    "tags": TagsCheck,
    "text": TextCheck,
}
CHECK_KINDS: tuple[str, ...] = tuple(sorted(KINDS))

__all__ = [
    "CHECK_KINDS",
    "KINDS",
    "AttributeCheck",
    "BaseCheck",
    "CaptionCheck",
    "DescribeCheck",
    "ExamplesCheck",
    "HashCheck",
    "MatchCheck",
    "PhotoCheck",
    "ProbeCheck",
    "TagsCheck",
    "TextCheck",
]

"""Policies written inline: load YAML text, catch the located PolicyError, a one-category policy around some checks."""

from __future__ import annotations

import textwrap

import pytest

from core.errors import PolicyError
from policies import Policy, load_policy_text


def load(text: str, source: str = "p.yaml") -> Policy:
    return load_policy_text(textwrap.dedent(text), source)


def failure(text: str, source: str = "p.yaml") -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        load(text, source)
    return caught.value


def policy_with(checks: str, combine: str = "max", review: str = "0.5", block: str = "0.9") -> Policy:
    """A one-category policy (`c`) with the given checks (YAML list items, indented by 6)."""
    return load(
        f"""\
name: t
description: d
categories:
  - name: c
    description: d
    combine: {combine}
    review: {review}
    block: {block}
    checks:
{textwrap.indent(textwrap.dedent(checks), "      ")}
"""
    )


def gun_shadow(description: str) -> str:
    """`moderation-next`: a shadow of `moderation` whose one category reviews anything (review: 0.0)."""
    return f"""\
name: moderation-next
description: {description}
shadows: moderation
categories:
  - name: weapons
    description: Guns.
    review: 0.0
    checks:
      - kind: probe
        question: is there a gun in the picture?
"""

"""The policy schema: what a policy file may say, validated, with inherited defaults resolved and a content hash.

The checks themselves are the kinds in `policies.checks`; this module knows them only as a tagged union.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, PrivateAttr, model_validator

from core.errors import PolicyError
from policies.checks import KINDS, BaseCheck
from policies.context import context_value
from policies.fields import Description, Slug, StrictModel, Threshold
from policies.problems import Loc, PolicyProblems
from policies.requirements import Requirements, RequirementsBuilder

Combine = Literal["max", "mean", "weighted", "all"]

if TYPE_CHECKING:
    Check = BaseCheck
else:
    # The union of every registered kind, told apart by `kind`: pydantic reports errors per kind.
    Check = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]  # noqa: UP007


class Defaults(StrictModel):
    """Values a category inherits when it does not set them itself."""

    combine: Combine | None = None
    review: Threshold | None = None
    block: Threshold | None = None

    @model_validator(mode="after")
    def _block_not_below_review(self) -> Defaults:
        if self.review is not None and self.block is not None and self.block < self.review:
            raise PolicyProblems([(("block",), f"block ({self.block}) must be >= review ({self.review})")])
        return self


class Category(StrictModel):
    """A named concern: its checks, how their scores combine, and the thresholds for review and block.

    A threshold that is absent is inherited from the policy's defaults; an explicit null means the
    category never takes that action.
    """

    name: Slug
    description: Description
    combine: Combine = "max"
    review: Threshold | None = None
    block: Threshold | None = None
    checks: list[Check] = Field(min_length=1)


class Policy(StrictModel):
    """A validated policy. Categories carry their effective settings (defaults already applied).

    `shadows` names the active policy this one runs beside: its decisions are recorded for comparison
    and never acted on.
    """

    name: Slug
    description: Description
    shadows: Slug | None = None
    # The share (0 to 1) of automatic allow and block decisions also sent to the review queue as `audit` items, so
    # the precision of automatic decisions is measured from people's labels (core/review.py audit_sampled).
    audit_rate: Threshold = 0.0
    defaults: Defaults | None = None
    categories: list[Category] = Field(min_length=1)

    _version: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _resolve_and_check(self) -> Policy:
        categories = [_inherit(category, self.defaults) for category in self.categories]
        problems = _problems(self.categories, categories, self.defaults)
        if self.shadows == self.name:
            problems.append((("shadows",), f"policy '{self.name}' cannot shadow itself; name the active policy"))
        if problems:
            raise PolicyProblems(problems)
        # The model is frozen; this is the one place its categories are replaced, during validation.
        object.__setattr__(self, "categories", categories)
        self._version = _content_hash(self)
        return self

    @property
    def version(self) -> str:
        """First 16 hex digits of the SHA-256 of the normalised content (layout, comments, key order don't count).

        Taxonomies a check uses count as content: editing one changes the versions of its policies.
        """
        return self._version

    def category(self, name: str) -> Category:
        for category in self.categories:
            if category.name == name:
                return category
        raise KeyError(name)

    def checks(self) -> list[tuple[Category, BaseCheck]]:
        return [(category, check) for category in self.categories for check in category.checks]

    def context_fields(self) -> tuple[str, ...]:
        """Every context field some check reads (`title`, `attributes.color`...), in first-seen order."""
        fields: dict[str, None] = {}
        for _, check in self.checks():
            fields.update(dict.fromkeys(check.fields))
        return tuple(fields)

    def missing_context(self, context: Mapping[str, Any] | None) -> list[str]:
        """Sentences naming each required context field the job lacks (or sends in a form checks cannot read)."""
        problems: dict[str, None] = {}
        for category, check in self.checks():
            if not check.fields:
                continue
            try:
                present = [path for path in check.fields if context_value(context, path) is not None]
            except ValueError as exc:
                problems.setdefault(str(exc))
                continue
            if check.needs_context and not present:
                wanted = " or ".join(f"'{path}'" for path in check.fields)
                problems.setdefault(f"{wanted} (the {check.kind} check of category '{category.name}')")
        return list(problems)

    def requirements(self, context: Mapping[str, Any] | None = None) -> Requirements:
        """What the engine computes for this policy; with a job's context, its texts and claims included.

        Raises PolicyError `context_missing` when the context lacks a field a check requires.
        """
        if context is not None:
            missing = self.missing_context(context)
            if missing:
                raise PolicyError(
                    f"policy '{self.name}' needs context the job does not have: {'; '.join(missing)}. "
                    "Send it in the job's `context` (a listing's title, description and attributes)",
                    code="context_missing",
                )
        needs = RequirementsBuilder()
        for _, check in self.checks():
            check.require(needs, context)
        return needs.build()


def _inherit(category: Category, defaults: Defaults | None) -> Category:
    if defaults is None:
        return category
    update: dict[str, Any] = {}
    for field in ("combine", "review", "block"):
        value = getattr(defaults, field)
        if field not in category.model_fields_set and value is not None:
            update[field] = value
    return category.model_copy(update=update) if update else category


def _problems(written: list[Category], resolved: list[Category], defaults: Defaults | None) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    first_index: dict[str, int] = {}
    for i, (original, category) in enumerate(zip(written, resolved, strict=True)):
        here: tuple[str | int, ...] = ("categories", i)
        if category.name in first_index:
            problems.append(
                (
                    (*here, "name"),
                    f"category '{category.name}' is already defined at categories[{first_index[category.name]}]; "
                    "category names must be unique",
                )
            )
        first_index.setdefault(category.name, i)
        reports_only = all(check.reports_only for check in category.checks)
        if category.review is None and category.block is None and not reports_only:
            problems.append(
                (
                    here,
                    f"category '{category.name}' has neither a review nor a block threshold, so it can never fire; "
                    "set one here or in the policy's defaults (only a category of tags checks may have neither)",
                )
            )
        if category.review is not None and category.block is not None and category.block < category.review:
            if "block" in original.model_fields_set:
                where: tuple[str | int, ...] = (*here, "block")
            elif "review" in original.model_fields_set:
                where = (*here, "review")
            else:
                where = ("defaults", "block") if defaults is not None else here
            problems.append((where, f"block ({category.block}) must be >= review ({category.review})"))
        seen: dict[tuple[str, str], int] = {}
        for j, check in enumerate(category.checks):
            key = (check.kind, check.label)
            if key in seen:
                problems.append(
                    ((*here, "checks", j), f"repeats checks[{seen[key]}] of the same category; remove one of them")
                )
            seen.setdefault(key, j)
            if check.weight != 1.0 and category.combine != "weighted":
                problems.append(
                    (
                        (*here, "checks", j, "weight"),
                        f"weight has no effect when the category combines with '{category.combine}'; "
                        "remove it or use combine: weighted",
                    )
                )
    return problems


def _content_hash(policy: Policy) -> str:
    # Defaults are excluded: after resolution every category states its effective values, so where a
    # threshold was written (defaults or category) is layout, not meaning.
    content = policy.model_dump(mode="json", exclude={"defaults"})
    if content.get("shadows") is None:
        content.pop("shadows", None)  # policies written before shadows existed keep their versions
    if not content.get("audit_rate"):
        content.pop("audit_rate", None)  # likewise policies that sample no audit items
    taxonomies: dict[str, str] = {}
    for _, check in policy.checks():
        taxonomies.update(check.taxonomy_versions())
    if taxonomies:
        content["taxonomy_versions"] = taxonomies
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

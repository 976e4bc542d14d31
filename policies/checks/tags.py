"""`tags`: zero-shot tagging against a taxonomy or an inline list (ITC over every tag, ITM re-ranks the top few)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from policies.checks.base import DECIMALS, BaseCheck, MissingOutput, best_match, probability, scored, taxonomy_named
from policies.fields import Threshold
from policies.outputs import Evidence, ModelOutputs, Tag
from policies.problems import PolicyProblems
from policies.requirements import RequirementsBuilder, TagSet
from policies.taxonomy import DEFAULT_PROMPT, MAX_GROUP_VALUES, GroupName, Prompt, TagEntry, TagName


class TagsCheck(BaseCheck):
    """Zero-shot tagging against a taxonomy (or an inline list): ITC over every tag, ITM re-ranks the top k.

    The top `top_k` tags of each group by ITC similarity are re-scored with ITM; those scoring at least
    `min_score` are the decision's tags. The check's own score is the best ITM score, so a category
    can act on "any of these tags" (prohibited items); a category of tags checks only may have no
    thresholds at all: it reports tags and never acts.
    """

    kind: Literal["tags"]
    taxonomy: GroupName | None = None
    groups: list[GroupName] | None = Field(default=None, min_length=1, max_length=64)
    tags: list[TagName] | None = Field(default=None, min_length=1, max_length=MAX_GROUP_VALUES)
    prompt: Prompt = DEFAULT_PROMPT
    top_k: int = Field(default=5, ge=1, le=50)
    min_score: Threshold = 0.5

    reports_only: ClassVar[bool] = True

    _entries: tuple[TagEntry, ...] = PrivateAttr(default=())
    _group_names: tuple[str, ...] = PrivateAttr(default=())
    _source_version: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> TagsCheck:
        if (self.taxonomy is None) == (self.tags is None):
            raise PolicyProblems([((), "a tags check needs exactly one of 'taxonomy' (a name) or 'tags' (a list)")])
        if self.tags is not None:
            if self.groups is not None:
                raise PolicyProblems([(("groups",), "'groups' selects groups of a taxonomy; inline tags have none")])
            seen: dict[str, int] = {}
            for i, tag in enumerate(self.tags):
                if tag.lower() in seen:
                    raise PolicyProblems([(("tags", i), f"'{tag}' repeats tags[{seen[tag.lower()]}]; remove one")])
                seen[tag.lower()] = i
            self._entries = tuple(TagEntry(tag, "tags", self.prompt.replace("{}", tag)) for tag in self.tags)
            self._group_names = ("tags",)
            return self
        if "prompt" in self.model_fields_set:
            raise PolicyProblems(
                [(("prompt",), "a taxonomy sets its own prompts per group; 'prompt' is for inline tags")]
            )
        assert self.taxonomy is not None
        taxonomy = taxonomy_named(info, self.taxonomy, ("taxonomy",))
        wanted = self.groups or [group.name for group in taxonomy.groups]
        entries: list[TagEntry] = []
        for i, name in enumerate(wanted):
            group = taxonomy.group(name)
            if group is None:
                known = ", ".join(g.name for g in taxonomy.groups)
                raise PolicyProblems(
                    [(("groups", i), f"taxonomy '{self.taxonomy}' has no group '{name}'; its groups: {known}")]
                )
            if name in wanted[:i]:
                raise PolicyProblems([(("groups", i), f"group '{name}' is listed twice")])
            entries.extend(TagEntry(value, group.name, group.text_for(value)) for value in group.values)
        self._entries = tuple(entries)
        self._group_names = tuple(wanted)
        self._source_version = taxonomy.version
        return self

    @property
    def label(self) -> str:
        if self.taxonomy is not None:
            return f"tags {self.taxonomy}" + (f" ({', '.join(self.groups)})" if self.groups else "")
        shown = ", ".join((self.tags or [])[:5])
        more = len(self.tags or []) - 5
        return f"tags: {shown}" + (f" and {more} more" if more > 0 else "")

    @property
    def entries(self) -> tuple[TagEntry, ...]:
        return self._entries

    def tag_set(self) -> TagSet:
        """What the engine computes for this check; `key` names the texts, so their ITC features can be cached."""
        group_index = {name: i for i, name in enumerate(self._group_names)}
        texts = tuple(entry.text for entry in self._entries)
        groups = tuple(group_index[entry.group] for entry in self._entries)
        digest = json.dumps([texts, groups, self.top_k], separators=(",", ":"), ensure_ascii=False)
        key = hashlib.sha256(digest.encode("utf-8")).hexdigest()[:16]
        return TagSet(key=key, texts=texts, groups=groups, top_k=self.top_k)

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.tag_set(self.tag_set())

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        tag_set = self.tag_set()
        scored_texts = outputs.tags.get(tag_set.key)
        if scored_texts is None:
            raise MissingOutput(f"tags {self.label!r}")
        names = {entry.text: entry.name for entry in self.entries}
        scores = {
            text: probability(value, f"the tag text {text!r}") for text, value in scored_texts.items() if text in names
        }
        if not scores:
            return self.entry(category, score=0.0, scores={}, query=tag_set.key)
        best = max(scores, key=scores.__getitem__)
        return self.entry(
            category, score=scored(scores[best], False), matched=names[best], scores=scores, query=tag_set.key
        )

    def tags_from(self, entry: Evidence) -> list[Tag]:
        by_text = {tag.text: tag for tag in self.entries}
        found = []
        for text, score in (entry.scores or {}).items():
            tag = by_text.get(text)
            if tag is not None and score >= self.min_score:
                found.append(Tag(tag=tag.name, group=tag.group, score=round(score, DECIMALS)))
        return found

    def taxonomy_versions(self) -> dict[str, str]:
        if self.taxonomy and self._source_version:
            return {self.taxonomy: self._source_version}
        return {}

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        if not entry.get("query"):
            return ModelOutputs()
        scores = entry.get("scores") or {}
        return ModelOutputs(tags={str(entry["query"]): {tag: float(value) for tag, value in scores.items()}})

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        return best_match(entry)

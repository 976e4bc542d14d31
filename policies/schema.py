"""The policy schema: what a policy file may say, validated, with inherited defaults resolved and a content hash."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    model_validator,
)

from core.errors import PolicyError
from policies.context import check_context_path, context_value, text_chunks
from policies.problems import Loc, PolicyProblems
from policies.taxonomy import (
    DEFAULT_PROMPT,
    MAX_GROUP_VALUES,
    GroupName,
    Prompt,
    TagEntry,
    TagName,
    Taxonomy,
    Vocabulary,
)

MAX_TEXT_CHARS = 300
MAX_DESCRIPTION_CHARS = 2000
MAX_WORD_CHARS = 100
MAX_PATTERN_CHARS = 200
MAX_WEIGHT = 1000.0
# Captions from BLIP are a few dozen words; the cap bounds the work any regular expression can do.
MAX_CAPTION_CHARS = 1000

Combine = Literal["max", "mean", "weighted", "all"]


def _single_line(text: str) -> str:
    if any(ch in text for ch in "\r\n\t\x00") or not text.isprintable():
        raise ValueError("must be a single line of printable text (no newlines, tabs or control characters)")
    return text


def _printable_paragraphs(text: str) -> str:
    if any(not (ch.isprintable() or ch in "\n\t") for ch in text):
        raise ValueError("must be printable text (control characters are not allowed)")
    return text


def _safe_pattern(pattern: str) -> str:
    compiled = compile_pattern(pattern)  # raises ValueError with the regex error
    if compiled.search("") is not None:
        raise ValueError("the pattern matches an empty caption, so it would fire on every image; make it require text")
    nested = _nested_quantifier(pattern)
    if nested:
        raise ValueError(
            f"nested quantifier {nested!r}: a repeated group that itself repeats can take exponential time; "
            "rewrite it without repeating a repeated group (for example 'a+' instead of '(a+)+')"
        )
    return pattern


Slug = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")]
Text = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_single_line)
]
Description = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_DESCRIPTION_CHARS),
    AfterValidator(_printable_paragraphs),
]
Word = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_WORD_CHARS), AfterValidator(_single_line)
]
Pattern = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS),
    AfterValidator(_single_line),
    AfterValidator(_safe_pattern),
]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Weight = Annotated[float, Field(gt=0.0, le=MAX_WEIGHT, allow_inf_nan=False)]


class _Model(BaseModel):
    # strict: YAML's `yes` must not become a threshold of 1.0, nor "0.5" (a quoted string) a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ProbeCheck(_Model):
    """A yes/no question to the VQA model; score = P(yes), or 1 - P(yes) when `negate` is set."""

    kind: Literal["probe"]
    question: Text
    weight: Weight = 1.0
    negate: bool = False

    @property
    def label(self) -> str:
        return self.question


class MatchCheck(_Model):
    """Image-text matching (ITM) against a fixed text; score = the match probability."""

    kind: Literal["match"]
    text: Text
    weight: Weight = 1.0

    @property
    def label(self) -> str:
        return self.text


class CaptionCheck(_Model):
    """A rule on the generated caption: whole words (case-insensitive) and/or regular expressions."""

    kind: Literal["caption"]
    words: list[Word] = Field(default_factory=list)
    patterns: list[Pattern] = Field(default_factory=list)
    score: Threshold = 1.0
    weight: Weight = 1.0

    @model_validator(mode="after")
    def _has_a_rule(self) -> CaptionCheck:
        if not self.words and not self.patterns:
            raise ValueError("a caption check needs at least one entry in 'words' or 'patterns'")
        return self

    @property
    def label(self) -> str:
        """A stable description of the rule: it identifies the check in evidence."""
        parts = []
        if self.words:
            parts.append("words: " + ", ".join(self.words))
        if self.patterns:
            parts.append("patterns: " + ", ".join(f"/{p}/" for p in self.patterns))
        return "caption " + "; ".join(parts)

    def find(self, caption: str) -> str | None:
        """The first word or pattern match in `caption` (the matched text), or None."""
        caption = caption[:MAX_CAPTION_CHARS]
        regexes = ([_words_regex(tuple(self.words))] if self.words else []) + [
            compile_pattern(p) for p in self.patterns
        ]
        for regex in regexes:
            for found in regex.finditer(caption):
                if found.end() > found.start():  # a zero-width hit (a bare lookahead) is not a mention
                    return found.group(0)
        return None


ContextPath = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80), AfterValidator(check_context_path)
]
VocabularyRef = Annotated[str, StringConstraints(min_length=3, max_length=129, pattern=r"^[a-z0-9_-]+\.[a-z0-9_-]+$")]


class DescribeCheck(_Model):
    """ITM of the image against text from the job's context (a listing's title and description).

    Long texts are cut into sentence-sized chunks (BLIP's ITM was trained on short captions) and the
    best chunk counts: a description is mostly claims a photo cannot show ("ships in two days"), so
    the question is whether any part of it matches the photo, not whether all of it does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, serialize_by_alias=True)

    kind: Literal["describe"]
    from_: list[ContextPath] = Field(alias="from", min_length=1, max_length=8)
    max_chunks: int = Field(default=8, ge=1, le=32)
    required: bool = True
    negate: bool = False
    weight: Weight = 1.0

    @model_validator(mode="after")
    def _distinct_fields(self) -> DescribeCheck:
        seen: dict[str, int] = {}
        for i, path in enumerate(self.from_):
            if path in seen:
                raise PolicyProblems([(("from", i), f"'{path}' is already listed at from[{seen[path]}]")])
            seen[path] = i
        return self

    @property
    def label(self) -> str:
        return "describe " + ", ".join(self.from_)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.from_)

    def chunks(self, context: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        """(field, chunk) pairs, in field order, at most `max_chunks` in all; no repeats."""
        pairs: list[tuple[str, str]] = []
        seen: set[str] = set()
        for path in self.from_:
            text = context_value(context, path)
            if text is None:
                continue
            for chunk in text_chunks(text, self.max_chunks):
                if chunk not in seen and len(pairs) < self.max_chunks:
                    seen.add(chunk)
                    pairs.append((path, chunk))
        return pairs


class AttributeCheck(_Model):
    """An open question whose answer is compared with a claimed value from the context.

    The VQA decoder ranks the vocabulary's values (and the claim, when it is outside the vocabulary)
    by likelihood; the score is the agreement P(claim) / P(best answer): 1 when the claim is the
    model's own best answer, near 0 when the model prefers something else. `negate` turns it into
    disagreement (what a "mismatch" category wants). A job without the claim gets score 0, and the
    model is not asked.
    """

    kind: Literal["attribute"]
    question: Text
    field: ContextPath
    vocabulary: VocabularyRef | None = None
    values: list[TagName] | None = Field(default=None, min_length=2, max_length=MAX_GROUP_VALUES)
    synonyms: dict[TagName, TagName] = Field(default_factory=dict)
    required: bool = True
    negate: bool = False
    weight: Weight = 1.0

    _vocabulary: Vocabulary = PrivateAttr()
    _source_version: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> AttributeCheck:
        if (self.vocabulary is None) == (self.values is None):
            raise PolicyProblems(
                [((), "an attribute check needs exactly one of 'vocabulary' (taxonomy.group) or 'values' (a list)")]
            )
        values: list[str]
        synonyms: dict[str, str] = {}
        if self.vocabulary is not None:
            taxonomy_name, group_name = self.vocabulary.split(".", 1)
            taxonomy = _taxonomy(info, taxonomy_name, ("vocabulary",))
            group = taxonomy.group(group_name)
            if group is None:
                known = ", ".join(g.name for g in taxonomy.groups)
                raise PolicyProblems(
                    [(("vocabulary",), f"taxonomy '{taxonomy_name}' has no group '{group_name}'; its groups: {known}")]
                )
            values, synonyms = list(group.values), dict(group.synonyms)
            self._source_version = taxonomy.version
        else:
            values = list(self.values or [])
        base = Vocabulary.of(values, synonyms)
        problems: list[tuple[Loc, str]] = []
        first: dict[str, int] = {}
        for i, value in enumerate(self.values or []):
            key = base.normalise(value)
            if key in first:
                problems.append((("values", i), f"'{value}' repeats values[{first[key]}]; remove one"))
            first.setdefault(key, i)
        for word, target in self.synonyms.items():
            if base.normalise(target) not in base.values:
                problems.append((("synonyms", word), f"synonym '{word}' maps to '{target}', which is not a value"))
        if problems:
            raise PolicyProblems(problems)
        self._vocabulary = Vocabulary.of(values, {**synonyms, **self.synonyms})
        return self

    @property
    def label(self) -> str:
        return f"{self.question} [{self.field}]"

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,)

    @property
    def vocabulary_values(self) -> Vocabulary:
        return self._vocabulary

    def claim(self, context: Mapping[str, Any] | None) -> str | None:
        """The claimed value, normalised onto the vocabulary ("Crimson" -> "red"); None when there is none."""
        raw = context_value(context, self.field)
        return None if raw is None else self._vocabulary.normalise(raw)

    def candidates(self, claimed: str | None) -> tuple[str, ...]:
        return self._vocabulary.candidates(claimed)

    def answer_query(self, claimed: str | None) -> AnswerQuery:
        """What the engine ranks for this check: the vocabulary (and the claim), the claim scored exactly."""
        candidates = self.candidates(claimed)
        digest = json.dumps([self.question, candidates], separators=(",", ":"), ensure_ascii=False)
        key = hashlib.sha256(digest.encode("utf-8")).hexdigest()[:16]
        return AnswerQuery(key, self.question, candidates, () if claimed is None else (claimed,))

    def agreement(self, claimed: str, log_likelihoods: Mapping[str, float]) -> tuple[float, str]:
        """(P(claim) / P(best answer), the best answer) from the candidates' log-likelihoods.

        The ratio needs no normalisation over all candidates, so the engine may leave out those it
        proved less likely than the best.
        """
        best = max(log_likelihoods, key=lambda answer: (log_likelihoods[answer], answer == claimed))
        return math.exp(log_likelihoods[claimed] - log_likelihoods[best]), best


class TagsCheck(_Model):
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
    weight: Weight = 1.0

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
        taxonomy = _taxonomy(info, self.taxonomy, ("taxonomy",))
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


def _taxonomy(info: ValidationInfo, name: str, where: Loc) -> Taxonomy:
    taxonomies = (info.context or {}).get("taxonomies") if isinstance(info.context, Mapping) else None
    if taxonomies is None:
        from policies.loader import builtin_taxonomies  # the default when a caller gives none

        taxonomies = builtin_taxonomies()
    taxonomy = taxonomies.get(name)
    if taxonomy is None:
        known = ", ".join(sorted(taxonomies)) or "none"
        raise PolicyProblems(
            [
                (
                    where,
                    f"no taxonomy named '{name}'; loaded taxonomies: {known} (files in taxonomies/ beside policies)",
                )
            ]
        )
    return taxonomy


AnyCheck = ProbeCheck | MatchCheck | CaptionCheck | DescribeCheck | AttributeCheck | TagsCheck
Check = Annotated[AnyCheck, Field(discriminator="kind")]
CHECK_TYPES: dict[str, type[AnyCheck]] = {
    "attribute": AttributeCheck,
    "caption": CaptionCheck,
    "describe": DescribeCheck,
    "match": MatchCheck,
    "probe": ProbeCheck,
    "tags": TagsCheck,
}
CONTEXT_CHECKS = (DescribeCheck, AttributeCheck)
CHECK_KINDS: tuple[str, ...] = tuple(sorted(CHECK_TYPES))


class Defaults(_Model):
    """Values a category inherits when it does not set them itself."""

    combine: Combine | None = None
    review: Threshold | None = None
    block: Threshold | None = None

    @model_validator(mode="after")
    def _block_not_below_review(self) -> Defaults:
        if self.review is not None and self.block is not None and self.block < self.review:
            raise PolicyProblems([(("block",), f"block ({self.block}) must be >= review ({self.review})")])
        return self


class Category(_Model):
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


@dataclass(frozen=True)
class AnswerQuery:
    """An open question whose candidate answers the VQA decoder ranks by likelihood.

    The engine returns exact log-likelihoods for the `required` answers (the job's claims) and for
    every candidate that could be the most likely one; candidates it can prove less likely than the
    best (their first token alone is) may be left out.
    """

    key: str  # a hash of (question, candidates): which ranking the stored log-likelihoods belong to
    question: str
    candidates: tuple[str, ...]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class TagSet:
    """The tags of one tags check: every text gets ITC; the best `top_k` of each group get ITM."""

    key: str  # a hash of (texts, groups, top_k): the same tags share cached text features
    texts: tuple[str, ...]
    groups: tuple[int, ...]  # the group index of each text
    top_k: int


@dataclass(frozen=True)
class Requirements:
    """What the engine must compute for a policy (deduplicated, in first-seen order).

    Without a job's context, `texts` holds the fixed match texts only and `describe` says that each
    job adds texts from its context; with one, its describe chunks are included and attribute
    candidates include the claims.
    """

    caption: bool
    probes: tuple[str, ...]
    texts: tuple[str, ...]
    answers: tuple[AnswerQuery, ...] = ()
    tag_sets: tuple[TagSet, ...] = ()
    describe: bool = False

    def merge(self, other: Requirements) -> Requirements:
        """Everything either needs: what one engine pass computes for an active policy and its shadows."""
        answers: dict[str, AnswerQuery] = {}
        for query in (*self.answers, *other.answers):
            answers[query.key] = _with_required(answers.get(query.key), query)
        return Requirements(
            caption=self.caption or other.caption,
            probes=tuple(dict.fromkeys((*self.probes, *other.probes))),
            texts=tuple(dict.fromkeys((*self.texts, *other.texts))),
            answers=tuple(answers.values()),
            tag_sets=tuple({t.key: t for t in (*self.tag_sets, *other.tag_sets)}.values()),
            describe=self.describe or other.describe,
        )

    @property
    def empty(self) -> bool:
        return not (self.caption or self.probes or self.texts or self.answers or self.tag_sets)


class Policy(_Model):
    """A validated policy. Categories carry their effective settings (defaults already applied).

    `shadows` names the active policy this one runs beside: its decisions are recorded for comparison
    and never acted on.
    """

    name: Slug
    description: Description
    shadows: Slug | None = None
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

    def checks(self) -> list[tuple[Category, AnyCheck]]:
        return [(category, check) for category in self.categories for check in category.checks]

    def context_fields(self) -> tuple[str, ...]:
        """Every context field some check reads (`title`, `attributes.color`...), in first-seen order."""
        fields: dict[str, None] = {}
        for _, check in self.checks():
            if isinstance(check, CONTEXT_CHECKS):
                fields.update(dict.fromkeys(check.fields))
        return tuple(fields)

    def missing_context(self, context: Mapping[str, Any] | None) -> list[str]:
        """Sentences naming each required context field the job lacks (or sends in a form checks cannot read)."""
        problems: dict[str, None] = {}
        for category, check in self.checks():
            if not isinstance(check, CONTEXT_CHECKS):
                continue
            try:
                present = [path for path in check.fields if context_value(context, path) is not None]
            except ValueError as exc:
                problems.setdefault(str(exc))
                continue
            if check.required and not present:
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
        probes: dict[str, None] = {}
        texts: dict[str, None] = {}
        answers: dict[str, AnswerQuery] = {}
        tag_sets: dict[str, TagSet] = {}
        caption = describe = False
        for _, check in self.checks():
            if isinstance(check, ProbeCheck):
                probes.setdefault(check.question)
            elif isinstance(check, MatchCheck):
                texts.setdefault(check.text)
            elif isinstance(check, CaptionCheck):
                caption = True
            elif isinstance(check, DescribeCheck):
                describe = True
                if context is not None:
                    texts.update(dict.fromkeys(chunk for _, chunk in check.chunks(context)))
            elif isinstance(check, AttributeCheck):
                claimed = check.claim(context) if context is not None else None
                if context is not None and claimed is None:
                    continue  # nothing claimed: the check scores 0 without asking the model
                query = check.answer_query(claimed)
                answers[query.key] = _with_required(answers.get(query.key), query)
            else:
                tag_set = check.tag_set()
                tag_sets.setdefault(tag_set.key, tag_set)
        return Requirements(
            caption=caption,
            probes=tuple(probes),
            texts=tuple(texts),
            answers=tuple(answers.values()),
            tag_sets=tuple(tag_sets.values()),
            describe=describe,
        )


def _with_required(known: AnswerQuery | None, query: AnswerQuery) -> AnswerQuery:
    if known is None:
        return query
    return AnswerQuery(
        query.key, query.question, query.candidates, tuple(dict.fromkeys((*known.required, *query.required)))
    )


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a caption pattern as the evaluation uses it (case-insensitive); ValueError when it is invalid."""
    try:
        return _compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


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
        tags_only = all(isinstance(check, TagsCheck) for check in category.checks)
        if category.review is None and category.block is None and not tags_only:
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
    taxonomies: dict[str, str] = {}
    for _, check in policy.checks():
        if isinstance(check, AttributeCheck) and check.vocabulary and check._source_version:
            taxonomies[check.vocabulary.split(".", 1)[0]] = check._source_version
        elif isinstance(check, TagsCheck) and check.taxonomy and check._source_version:
            taxonomies[check.taxonomy] = check._source_version
    if taxonomies:
        content["taxonomy_versions"] = taxonomies
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


@lru_cache(maxsize=1024)
def _words_regex(words: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so "dead body" wins over "dead"; lookarounds instead of \b so words that start or end
    # with punctuation ("c++") still need a non-word character (or the edge) on both sides.
    alternatives = [r"\s+".join(re.escape(part) for part in word.split()) for word in words]
    alternatives.sort(key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def _nested_quantifier(pattern: str) -> str | None:
    """The first repeated group that contains a variable repeat, as pattern text, or None."""
    # The standard library's own parser: a hand-written scan would miss escapes and character classes.
    parser: Any = importlib.import_module("re._parser")
    backtracking = {parser.MAX_REPEAT, parser.MIN_REPEAT}

    def has_variable_repeat(items: Any) -> bool:
        for op, av in items:
            if op in backtracking and av[1] != av[0] and av[1] > 1:
                return True
            if any(has_variable_repeat(sub) for sub in _subpatterns(parser, op, av)):
                return True
        return False

    def has_nested(items: Any) -> bool:
        for op, av in items:
            if op in backtracking and av[1] > 1 and has_variable_repeat(av[2]):
                return True
            if any(has_nested(sub) for sub in _subpatterns(parser, op, av)):
                return True
        return False

    return _first_repeated_group(pattern) if has_nested(parser.parse(pattern)) else None


def _subpatterns(parser: Any, op: Any, av: Any) -> list[Any]:
    if op in (parser.MAX_REPEAT, parser.MIN_REPEAT, parser.POSSESSIVE_REPEAT):
        return [av[2]]
    if op == parser.SUBPATTERN:
        return [av[-1]]
    if op == parser.ATOMIC_GROUP:
        return [av]
    if op == parser.BRANCH:
        return list(av[1])
    if op in (parser.ASSERT, parser.ASSERT_NOT):
        return [av[1]]
    if op == parser.GROUPREF_EXISTS:
        return [sub for sub in av[1:] if sub is not None]
    return []


def _first_repeated_group(pattern: str) -> str:
    # Only for the error message: the shortest "(...)" followed by a quantifier that holds a quantifier.
    found = re.search(r"\([^()]*[+*}][^()]*\)[+*{]", pattern)
    return found.group(0) if found else pattern

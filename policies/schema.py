"""The policy schema: what a policy file may say, validated, with inherited defaults resolved and a content hash."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
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
    model_validator,
)

MAX_TEXT_CHARS = 300
MAX_DESCRIPTION_CHARS = 2000
MAX_WORD_CHARS = 100
MAX_PATTERN_CHARS = 200
MAX_WEIGHT = 1000.0
# Captions from BLIP are a few dozen words; the cap bounds the work any regular expression can do.
MAX_CAPTION_CHARS = 1000

Combine = Literal["max", "mean", "weighted", "all"]


class PolicyProblems(ValueError):
    """Cross-field problems found after the fields themselves validated, each with its own location.

    Pydantic reports a model validator's ValueError at the model's location; carrying the exact
    locations lets the loader point at the offending line instead of the top of the file.
    """

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("; ".join(f"{format_location(loc)}: {message}" for loc, message in problems))
        self.problems = problems


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


Check = Annotated[ProbeCheck | MatchCheck | CaptionCheck, Field(discriminator="kind")]
CHECK_TYPES: dict[str, type[ProbeCheck | MatchCheck | CaptionCheck]] = {
    "caption": CaptionCheck,
    "match": MatchCheck,
    "probe": ProbeCheck,
}
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
class Requirements:
    """What the engine must compute for a policy: a caption, VQA probes and ITM texts (deduplicated, in order)."""

    caption: bool
    probes: tuple[str, ...]
    texts: tuple[str, ...]


class Policy(_Model):
    """A validated policy. Categories carry their effective settings (defaults already applied)."""

    name: Slug
    description: Description
    defaults: Defaults | None = None
    categories: list[Category] = Field(min_length=1)

    _version: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _resolve_and_check(self) -> Policy:
        categories = [_inherit(category, self.defaults) for category in self.categories]
        problems = _problems(self.categories, categories, self.defaults)
        if problems:
            raise PolicyProblems(problems)
        # The model is frozen; this is the one place its categories are replaced, during validation.
        object.__setattr__(self, "categories", categories)
        self._version = _content_hash(self)
        return self

    @property
    def version(self) -> str:
        """First 16 hex digits of the SHA-256 of the normalised content (layout, comments, key order don't count)."""
        return self._version

    def category(self, name: str) -> Category:
        for category in self.categories:
            if category.name == name:
                return category
        raise KeyError(name)

    def requirements(self) -> Requirements:
        probes: dict[str, None] = {}
        texts: dict[str, None] = {}
        caption = False
        for category in self.categories:
            for check in category.checks:
                if isinstance(check, ProbeCheck):
                    probes.setdefault(check.question)
                elif isinstance(check, MatchCheck):
                    texts.setdefault(check.text)
                else:
                    caption = True
        return Requirements(caption=caption, probes=tuple(probes), texts=tuple(texts))


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a caption pattern as the evaluation uses it (case-insensitive); ValueError when it is invalid."""
    try:
        return _compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


def format_location(loc: tuple[str | int, ...]) -> str:
    """A location as a user reads it: `categories[2].checks[0].question`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _inherit(category: Category, defaults: Defaults | None) -> Category:
    if defaults is None:
        return category
    update: dict[str, Any] = {}
    for field in ("combine", "review", "block"):
        value = getattr(defaults, field)
        if field not in category.model_fields_set and value is not None:
            update[field] = value
    return category.model_copy(update=update) if update else category


def _problems(
    written: list[Category], resolved: list[Category], defaults: Defaults | None
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
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
        if category.review is None and category.block is None:
            problems.append(
                (
                    here,
                    f"category '{category.name}' has neither a review nor a block threshold, so it can never fire; "
                    "set one here or in the policy's defaults",
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

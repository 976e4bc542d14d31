"""`caption`: a rule on the generated caption (whole words, case-insensitive, and/or regular expressions)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from policies.checks.base import BaseCheck, MissingOutput, best_match
from policies.fields import Threshold, single_line
from policies.outputs import Evidence, ModelOutputs
from policies.requirements import RequirementsBuilder

MAX_WORD_CHARS = 100
MAX_PATTERN_CHARS = 200
# Captions from BLIP are a few dozen words; the cap bounds the work any regular expression can do.
MAX_CAPTION_CHARS = 1000


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


Word = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_WORD_CHARS), AfterValidator(single_line)
]
Pattern = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS),
    AfterValidator(single_line),
    AfterValidator(_safe_pattern),
]


class CaptionCheck(BaseCheck):
    """A rule on the generated caption: whole words (case-insensitive) and/or regular expressions."""

    kind: Literal["caption"]
    words: list[Word] = Field(default_factory=list)
    patterns: list[Pattern] = Field(default_factory=list)
    score: Threshold = 1.0

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

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.caption = True

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        if outputs.caption is None:
            raise MissingOutput("the caption")
        matched = self.find(outputs.caption)
        return self.entry(category, score=self.score if matched is not None else 0.0, matched=matched)

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        return ModelOutputs()  # the caption is stored beside the evidence, not in it

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        return best_match(entry)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a caption pattern as the evaluation uses it (case-insensitive); ValueError when it is invalid."""
    try:
        return _compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


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

"""`text`: the lines of text read in the image (OCR), against built-in detectors, terms and linear-time patterns.

Detectors (`detect:`), each tuned for noisy OCR of photos rather than for clean text:

- `phone`: a phone number. International (`+44 20 7946 0958`, `+33612345678`: a `+` and 8 to 15
  digits) or national (7 to 12 digits in groups separated by spaces, dots, dashes or parentheses:
  `555 0142`, `(555) 014-2368`, `06 12 34 56 78`, `0176 5550 1423`; unseparated only as 10 or 11
  digits: 12 and 13 are UPC/EAN barcodes, fewer than 10 serial numbers; nor a UPC-A's printed groups
  `0 12345 67890 5`). OCR's O/0 and l/I/1 confusions count as digits
  inside a group that holds a real digit (`O7700 900l23`; at most 2, and at most a quarter of the
  digits). Not a phone: a number glued to a letter, `#` or `/` (`SKU1234567`, `#1234567`), after a
  currency sign or before `%` or one, after `ISBN`, decimals (`3.14159265`), dates (`2024-05-12`,
  `12.05.2024`), runs of years (`2019 2020 2021 2022`), thousands-grouped amounts (`1 250 000`, so
  `555 123 456` is missed too), lists of sizes (`36 38 40 42`: groups of 1 or 2 digits count only as
  a `0`-led number of 9 digits or more). After a word that announces a number (`call`, `tel`, `phone`,
  `mobile`, `whatsapp`, `sms`, `contact`...), 7 to 15 digits in any grouping count, glued to the word
  or not: PP-OCR drops the spaces of printed lines (`CALL 0176 5550 1423` reads `CALL017655501423`).
- `email`: `name@domain.tld`, and spelled-out forms `bob at example dot com`, `bob [at] example [dot] com`
  (the last label must be a common top-level domain).
- `url`: a scheme (`https://...`), `www.`, or a bare domain ending in a common top-level domain
  (`shop.example.com`, `t.me/name`, `wa.me/15550142`); not the domain part of an email address.
- `handle`: a social handle, `@name` (2 to 30 letters, digits, `_` or `.`, at least one letter; not
  an email address), or a platform prefix (`IG: name`, `snap - name`, `telegram: @name`).

`terms` match case-, accent- and l33t-insensitively (`wh4tsapp`, `TELEGRAM`, `télégram`, `ca$happ`),
ignoring spaces, dots, dashes and underscores inside the text (`cash app`, `w.h.a.t.s.a.p.p`), as whole
words: not inside a longer word or number (`zelle` does not fire on `mozzarelle`, nor `telegram` on
`telegrams`: list plurals yourself), and keeping at least half of the term's letters as letters (`534`
is a number, not a l33t `sea`; a term written in digits, `1488`, matches those digits).

`patterns` are RE2 regular expressions (google-re2): matching time is linear in the line's length
whatever the pattern, so a policy author cannot write a pattern that stalls a worker. What RE2 cannot
compile (backreferences, lookaround) is refused at load. Patterns are case-sensitive as written;
start one with `(?i)` to ignore case.

Lines whose OCR confidence is below `min_score` are ignored. Detectors and terms read a line's first
MAX_LINE_CHARS characters (NFKC-normalised); patterns read the whole line as OCR gave it.
Score: the OCR confidence of the most confident matching line (0 when none). Evidence: `matched` the
line (shortened), `field` the rule that matched (`phone`, `term 'whatsapp'`, `pattern /dm\\s+me/`),
`seen` the matched text (shortened).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal

import re2
from pydantic import AfterValidator, Field, StringConstraints, model_validator

from policies.checks.base import BaseCheck, MissingOutput, probability, shorten
from policies.fields import Threshold, single_line
from policies.outputs import Evidence, ModelOutputs, TextLine
from policies.problems import did_you_mean
from policies.requirements import RequirementsBuilder

MAX_TERMS = 200
MAX_TERM_CHARS = 60
MAX_PATTERNS = 32
MAX_PATTERN_CHARS = 200
# An OCR line is a line of a photo: a few dozen characters. The cap bounds the Python work of detectors and terms.
MAX_LINE_CHARS = 1000
# RE2's memory budget per compiled pattern (its default is 8 MiB); a pattern over it is refused at load.
_PATTERN_MAX_MEM = 4 << 20


def _known_detector(name: str) -> str:
    if name not in DETECTORS:
        close = did_you_mean(name, sorted(DETECTORS))
        hint = f"did you mean '{close}'? " if close else ""
        raise ValueError(f"unknown detector '{name}'; {hint}known detectors: {', '.join(sorted(DETECTORS))}")
    return name


def _term_with_letters(term: str) -> str:
    if not _skeleton(term)[0]:
        raise ValueError("a term needs at least one letter or digit")
    return term


def _compilable(pattern: str) -> str:
    compiled = compile_pattern(pattern)  # raises ValueError with RE2's reason
    if compiled.search("") is not None:
        raise ValueError("the pattern matches an empty line, so it would fire on every text; make it require text")
    return pattern


Detector = Annotated[str, AfterValidator(_known_detector)]
Term = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TERM_CHARS),
    AfterValidator(single_line),
    AfterValidator(_term_with_letters),
]
Pattern = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS),
    AfterValidator(single_line),
    AfterValidator(_compilable),
]


class TextCheck(BaseCheck):
    """The lines OCR read against detectors, terms and patterns; score = the best matching line's confidence."""

    kind: Literal["text"]
    detect: list[Detector] = Field(default_factory=list, max_length=4)
    terms: list[Term] = Field(default_factory=list, max_length=MAX_TERMS)
    patterns: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS)
    min_score: Threshold = 0.5

    @model_validator(mode="after")
    def _has_a_rule(self) -> TextCheck:
        if not self.detect and not self.terms and not self.patterns:
            raise ValueError("a text check needs at least one entry in 'detect', 'terms' or 'patterns'")
        return self

    @property
    def label(self) -> str:
        parts = []
        if self.detect:
            parts.append("detect: " + ", ".join(dict.fromkeys(self.detect)))
        if self.terms:
            parts.append("terms: " + ", ".join(self.terms))
        if self.patterns:
            parts.append("patterns: " + ", ".join(f"/{p}/" for p in self.patterns))
        return "text " + "; ".join(parts)

    def find(self, line: str) -> tuple[str, str] | None:
        """The first rule that matches `line` and the text it matched: detectors, then terms, then patterns."""
        head = unicodedata.normalize("NFKC", line[:MAX_LINE_CHARS])
        for name in dict.fromkeys(self.detect):
            found = DETECTORS[name](head)
            if found is not None:
                return name, found
        if self.terms:
            hit = _find_term(head, _term_skeletons(tuple(self.terms)))
            if hit is not None:
                return hit
        # RE2 is linear, so patterns read the whole line: cutting it would move where `$` matches.
        for pattern in self.patterns:
            for match in compile_pattern(pattern).finditer(line):
                if match.end() > match.start():
                    return f"pattern /{pattern}/", match.group(0)
        return None

    def require(self, needs: RequirementsBuilder, context: Mapping[str, Any] | None) -> None:
        needs.text_lines()

    def evidence(self, category: str, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
        if outputs.text is None:
            raise MissingOutput("the lines of text read in the image")
        best: tuple[float, TextLine, str, str] | None = None
        for line in outputs.text:
            confidence = probability(line.score, f"the confidence of the text line {shorten(line.text)!r}")
            if confidence < self.min_score or (best is not None and confidence <= best[0]):
                continue
            hit = self.find(line.text)
            if hit is not None:
                best = (confidence, line, *hit)
        if best is None:
            return self.entry(category, score=0.0)
        confidence, line, rule, seen = best
        return self.entry(
            category, score=round(confidence, 6), matched=shorten(line.text), field=rule, seen=shorten(seen)
        )

    @classmethod
    def replay(cls, entry: Mapping[str, Any], score: float) -> ModelOutputs:
        return ModelOutputs()  # the lines read are stored beside the evidence, not in it

    @classmethod
    def explain(cls, entry: Evidence) -> str:
        if entry.matched is None:
            return ""
        return f" (line {entry.matched!r}: {entry.field})"


def compile_pattern(pattern: str) -> Any:
    """Compile a text pattern as the evaluation uses it (RE2, as written); ValueError when RE2 refuses it."""
    try:
        return _compile(pattern)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(
            f"RE2 cannot compile this pattern ({reason}); patterns run in linear time, so backreferences "
            "and lookaround are not available"
        ) from None


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False  # the reason goes into the policy error, not onto the worker's stderr
    options.max_mem = _PATTERN_MAX_MEM
    return re2.compile(pattern, options)


# --- terms: one skeleton for the term and the line, so that case, accents and l33t spellings compare equal ------

# Digits and signs that stand for letters in l33t spellings and OCR slips; i, l and 1 read alike.
_LOOKALIKES = str.maketrans({"0": "o", "1": "i", "l": "i", "|": "i", "!": "i", "3": "e", "4": "a", "@": "a",
                             "5": "s", "$": "s", "7": "t", "+": "t", "8": "b", "9": "g"})  # fmt: skip
# Characters that may separate the letters of a term ("cash app", "w.h.a.t.s.a.p.p").
_SEPARATORS = frozenset(" .-_*·•',\u2019")  # \u2019: the typographic apostrophe


def _skeleton(text: str) -> tuple[str, list[int]]:
    """`text` folded (case, accents, look-alikes), separators dropped; and where each folded character is in `text`."""
    chars: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if ch in _SEPARATORS or ch.isspace():
            continue
        for part in unicodedata.normalize("NFKD", ch).casefold():
            if unicodedata.combining(part):
                continue
            chars.append(part.translate(_LOOKALIKES))
            where.append(i)
    return "".join(chars), where


@lru_cache(maxsize=256)
def _term_skeletons(terms: tuple[str, ...]) -> tuple[tuple[str, str, int], ...]:
    """(term, skeleton, letters) triples, longest skeleton first so "western union" wins over "union"."""
    triples = [(term, _skeleton(term)[0], sum(ch.isalpha() for ch in term)) for term in terms]
    return tuple(sorted(triples, key=lambda triple: len(triple[1]), reverse=True))


def _find_term(line: str, terms: tuple[tuple[str, str, int], ...]) -> tuple[str, str] | None:
    folded, where = _skeleton(line)
    for term, skeleton, letters in terms:
        start = folded.find(skeleton)
        while start != -1:
            first, last = where[start], where[start + len(skeleton) - 1]
            span = line[first : last + 1]
            # Letters and digits on either side make it part of a longer word or number: "mozzarelle", "14889".
            inside_a_word = (first > 0 and line[first - 1].isalnum()) or (
                last + 1 < len(line) and line[last + 1].isalnum()
            )
            # A l33t spelling keeps at least half of the term's letters: "534" is a number, not "sea".
            if not inside_a_word and 2 * sum(ch.isalpha() for ch in span) >= letters:
                return f"term {term!r}", span
            start = folded.find(skeleton, start + 1)
    return None


# --- detectors -------------------------------------------------------------------------------------------------

# Common generic and country top-level domains: a bare "word.tld" counts as an address only with one of these.
_TLDS = (
    "com|net|org|info|biz|io|co|me|app|shop|store|online|site|xyz|link|live|club|top|ly|gg|tv|cc|ai|"
    "uk|ca|au|de|fr|es|nl|ch|pl|ru|ua|br|mx|ar|cn|jp|kr|eu"
)
_CURRENCY = "$€£¥₹₽₩"

# Candidate spans only: groups of digit-like characters joined by at most 3 separator characters.
# Digit-like and separator classes are disjoint, so RE2 (linear anyway) finds each span in one pass.
_PHONE_SPAN = re2.compile(r"\+?\(?[0-9OoIl|]+(?:[ .\-()]{1,3}[0-9OoIl|]+)*\)?")
_DIGIT_GROUP = re2.compile(r"[0-9OoIl|]+")
_CONFUSED_DIGITS = str.maketrans({"O": "0", "o": "0", "I": "1", "l": "1", "|": "1"})
_YEAR = re2.compile(r"^(19|20)[0-9][0-9]$")
# A word that says a phone number follows. OCR of printed lines drops spaces ("CALL017655501423"): after
# such a word a number may be glued to it and written in one block of any length a phone number has.
_PHONE_CUE = re2.compile(
    r"(?i)(?:^|[^\p{L}\p{N}])(?:call|tel|tél|phone|ph|mob|mobile|cell|whatsapp|wa|sms|text|contact|fon|telefon|tlf|hotline)"
    r"[\s:.\-]{0,3}$"
)

_EMAIL = re2.compile(r"[\p{L}\p{N}_.+\-]+@[\p{L}\p{N}\-]+(?:\.[\p{L}\p{N}\-]+)*\.\p{L}\p{L}+")
_SPELLED_AT = r"(?:\s*[\[(]\s*at\s*[\])]\s*|\s+at\s+)"
_SPELLED_DOT = r"(?:\s*[\[(]\s*dot\s*[\])]\s*|\s+dot\s+|\.)"
_SPELLED_EMAIL = re2.compile(
    r"(?i)[\p{L}\p{N}_.+\-]+" + _SPELLED_AT + r"[\p{L}\p{N}\-]+(?:" + _SPELLED_DOT + r"[\p{L}\p{N}\-]+)+"
)
_LAST_LABEL = re2.compile(r"[\p{L}\p{N}\-]+$")
_URL = re2.compile(
    r"(?i)(?:\b(?:https?|ftp)://[^\s<>\"']+|\bwww\.[^\s<>\"']+|"
    r"(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)+(?:" + _TLDS + r")(?:/[^\s<>\"']*)?)"
)
_HANDLE = re2.compile(r"@([A-Za-z0-9_.]{2,30})")
_PLATFORM_HANDLE = re2.compile(
    r"(?i)\b(?:ig|insta|instagram|snap|snapchat|tiktok|tg|telegram|kik|fb|facebook|twitter|onlyfans)"
    r"\s*[:\-]\s*@?([A-Za-z0-9_.]{2,30})"
)
_TLD = re2.compile(r"(?i)^(?:" + _TLDS + r")$")


def detect_phone(line: str) -> str | None:
    """The first phone number in `line`, as written; None when there is none (see the module docstring)."""
    for match in _PHONE_SPAN.finditer(line):
        found = _phone_in(line, match.start(), match.end())
        if found is not None:
            return found
    return None


def _phone_in(line: str, start: int, end: int) -> str | None:
    # Groups of look-alike letters only ("lol", "Ill") are words, not digits: trim them off both ends.
    groups = [(m.start(), m.end()) for m in _DIGIT_GROUP.finditer(line, start, end)]
    real = [i for i, (a, b) in enumerate(groups) if any(ch.isdigit() for ch in line[a:b])]
    if not real or len(real) != real[-1] - real[0] + 1:
        return None  # no digit, or a word of look-alikes between two numbers
    plus = real[0] == 0 and "+" in line[start : groups[0][0]]
    begin = start if real[0] == 0 else groups[real[0]][0]
    groups = groups[real[0] : real[-1] + 1]
    last = groups[-1][1]
    cued = _PHONE_CUE.search(line[max(0, begin - 13) : begin]) is not None
    if begin > 0 and (line[begin - 1].isalnum() or line[begin - 1] in "_/#") and not cued:
        return None  # glued to a word, a path or a number sign: SKU1234567, ref/1234567, #1234567
    if last < len(line) and (line[last].isalnum() or line[last] in "%_/"):
        return None
    before, after = line[:begin].rstrip(), line[last:].lstrip(" )")
    if (before and before[-1] in _CURRENCY) or (after and after[0] in _CURRENCY + "%"):
        return None
    if "isbn" in before[-12:].lower():
        return None
    digits = [line[a:b].translate(_CONFUSED_DIGITS) for a, b in groups]
    count = sum(len(group) for group in digits)
    confused = sum(not ch.isdigit() for a, b in groups for ch in line[a:b])
    if confused > 2 or 4 * confused > count:
        return None
    if plus:
        return line[begin:last] if 8 <= count <= 15 else None
    separators = [line[groups[i][1] : groups[i + 1][0]] for i in range(len(groups) - 1)]
    if cued:
        return line[begin:last] if 7 <= count <= 15 else None
    if 7 <= count <= 12 and _national_shape(digits, separators, count):
        return line[begin:last]
    return None


def _national_shape(groups: list[str], separators: list[str], count: int) -> bool:
    """Whether digit groups without a `+` read as a national phone number rather than a date, amount or list."""
    if len(groups) == 1:
        return count in (10, 11)  # unseparated: 12 and 13 digits are barcodes, fewer than 10 are serials
    if [len(group) for group in groups] == [1, 5, 5, 1]:
        return False  # a UPC-A barcode's printed digits: 0 12345 67890 5
    if separators == ["."]:
        return False  # a decimal number: 3.14159265
    if all(_YEAR.match(group) for group in groups):
        return False  # 2019 2020 2021
    years = [group for group in groups if _YEAR.match(group)]
    if len(groups) == 3 and len(years) == 1 and all(len(g) <= 2 for g in groups if g is not years[0]):
        return False  # 2024-05-12, 12.05.2024
    if all(len(group) <= 2 for group in groups):
        return groups[0].startswith("0") and count >= 9  # 06 12 34 56 78, but not sizes 36 38 40 42
    thousands = len(groups) >= 3 and len(groups[0]) <= 3 and all(len(group) == 3 for group in groups[1:])
    return not (thousands and not groups[0].startswith("0"))  # 1 250 000, 12.500.000; but 030 123 456


def detect_email(line: str) -> str | None:
    """The first email address in `line`, written plainly or spelled out ("bob at example dot com")."""
    match = _EMAIL.search(line)
    if match is not None:
        return match.group(0)
    for spelled in _SPELLED_EMAIL.finditer(line):
        tld = _LAST_LABEL.search(spelled.group(0))
        if tld is not None and _TLD.match(tld.group(0)):
            return spelled.group(0)
    return None


def detect_url(line: str) -> str | None:
    """The first web address in `line`: with a scheme, `www.`, or a bare domain with a common top-level domain."""
    for match in _URL.finditer(line):
        begin, end = match.start(), match.end()
        if begin > 0 and (line[begin - 1] == "@" or line[begin - 1].isalnum()):
            continue  # the domain of an email address, or the tail of a longer token
        if end < len(line) and (line[end].isalnum() or line[end] == "@"):
            continue  # "example.comfort", "name.co@..."
        return match.group(0).rstrip(".,;:!?)")
    return None


def detect_handle(line: str) -> str | None:
    """The first social handle in `line`: `@name`, or a platform prefix such as `IG: name`."""
    for match in _HANDLE.finditer(line):
        at = match.start()
        name = match.group(1).rstrip(".")
        if at > 0 and (line[at - 1].isalnum() or line[at - 1] in "._+-"):
            continue  # an email address
        if len(name) >= 2 and any(ch.isalpha() for ch in name):
            return "@" + name
    for match in _PLATFORM_HANDLE.finditer(line):
        name = match.group(1).rstrip(".")
        if len(name) >= 2 and any(ch.isalpha() for ch in name):
            return match.group(0).rstrip(".")
    return None


DETECTORS: dict[str, Callable[[str], str | None]] = {
    "email": detect_email,
    "handle": detect_handle,
    "phone": detect_phone,
    "url": detect_url,
}

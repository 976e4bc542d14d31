"""A job's context as checks read it: field paths (`title`, `attributes.color`) and texts cut into ITM-sized chunks."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from policies.problems import TypeWords, did_you_mean, type_in_words

CONTEXT_FIELDS = ("title", "description", "attributes.<name>")
# BLIP's ITM head was trained on COCO-style captions (about 10-15 words); past ~35 word pieces a
# text is far outside that, and English averages ~1.3 pieces per word: 24 words stay under 35.
MAX_CHUNK_WORDS = 24
MAX_CHUNK_CHARS = 300
MAX_CONTEXT_TEXT_CHARS = 20_000  # a description longer than this is cut before splitting

_PATH = re.compile(r"^(title|description|attributes\.[a-z0-9_]{1,64})$")
# A sentence ends at . ! ? ; or a line break; bullets (at a line's start, or inline) start a new one.
_LINE = re.compile(r"[\r\n]+")
_BULLET = re.compile(r"^\s*(?:[•·▪*-]|\d{1,2}[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s+[•·▪]\s+")
_CLAUSE_END = re.compile(r"(?<=[,:])\s+")
_JSON_WORDS: TypeWords = ((list, "a list"), (Mapping, "an object"), (bool, "a boolean"))


def check_context_path(path: str) -> str:
    """A context field a check may read; ValueError with a hint for anything else."""
    if _PATH.match(path):
        return path
    known = ["title", "description", "attributes"]
    root = path.split(".", 1)[0]
    close = did_you_mean(root, known)
    hint = ""
    if close and close != root:
        hint = f"did you mean '{close}{path[len(root) :]}'? "
    elif root == "attributes":
        hint = "an attribute is named in lowercase letters, digits and '_' (attributes.color); "
    return _raise(f"unknown context field '{path}'; {hint}a job's context has title, description and attributes.<name>")


def context_value(context: Mapping[str, Any] | None, path: str) -> str | None:
    """The text at `path` ("attributes.color"), stripped; None when absent or blank. ValueError when not text."""
    node: Any = context
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if node is None:
        return None
    if isinstance(node, bool) or not isinstance(node, (str, int, float)):
        raise ValueError(f"context field '{path}' must be text or a number, not {_json_type(node)}")
    if isinstance(node, float):
        if not math.isfinite(node):
            raise ValueError(f"context field '{path}' must be a finite number")
        text = str(int(node)) if node.is_integer() else str(node)
    else:
        text = str(node)
    text = " ".join(text.split())
    return text or None


def text_chunks(text: str, max_chunks: int) -> list[str]:
    """Sentence-sized pieces of `text` (at most MAX_CHUNK_WORDS words each), in order, without repeats.

    Sentences are split at clause punctuation, then at word windows, when they are longer than the limit.
    """
    chunks: dict[str, None] = {}
    for line in _LINE.split(text[:MAX_CONTEXT_TEXT_CHARS]):
        for sentence in _SENTENCE_END.split(_BULLET.sub("", line)):
            for piece in _fit(sentence):
                if len(chunks) >= max_chunks:
                    return list(chunks)
                chunks.setdefault(piece)
    return list(chunks)


def _fit(sentence: str) -> list[str]:
    words = sentence.split()
    if not any(any(ch.isalnum() for ch in word) for word in words):
        return []
    if len(words) <= MAX_CHUNK_WORDS:
        return [_clip(" ".join(words))]
    pieces: list[str] = []
    current: list[str] = []
    for clause in _CLAUSE_END.split(" ".join(words)):
        clause_words = clause.split()
        if current and len(current) + len(clause_words) > MAX_CHUNK_WORDS:
            pieces.append(" ".join(current))
            current = []
        current.extend(clause_words)
        while len(current) > MAX_CHUNK_WORDS:
            pieces.append(" ".join(current[:MAX_CHUNK_WORDS]))
            current = current[MAX_CHUNK_WORDS:]
    if current:
        pieces.append(" ".join(current))
    return [_clip(piece) for piece in pieces]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CHUNK_CHARS else text[:MAX_CHUNK_CHARS].rsplit(" ", 1)[0]


def _raise(message: str) -> str:
    raise ValueError(message)


def _json_type(value: object) -> str:
    return type_in_words(value, _JSON_WORDS, type(value).__name__)

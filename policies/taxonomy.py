"""Taxonomies: named groups of tags (product types, colours, materials...) with prompts and synonyms, as data.

A taxonomy serves two check kinds. `tags` scores every tag of some groups against the image; `attribute`
uses one group as the vocabulary of an open question ("what colour is the item?"): its values are the
candidate answers, its synonyms normalise what a listing claims ("crimson" -> "red").
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, PrivateAttr, StringConstraints, ValidationError, model_validator

from core.errors import PolicyError
from policies.documents import (
    locate,
    position,
    read_document,
    refuse_duplicate,
    unique_dirs,
    validation_message,
    yaml_files,
)
from policies.fields import StrictModel, single_line
from policies.problems import PolicyProblems

MAX_GROUP_VALUES = 2000
MAX_PROMPT_CHARS = 200
DEFAULT_PROMPT = "a photo of {}"
TAXONOMY_DIR = "taxonomies"

# Words that carry no meaning for matching a claim with an answer ("a red one" is "red").
_FILLER = frozenset({"a", "an", "the", "one", "ones", "colour", "color", "colored", "coloured", "made", "of"})


def _one_placeholder(prompt: str) -> str:
    if prompt.count("{}") != 1 or re.search(r"\{(?!\})|(?<!\{)\}", prompt):
        raise ValueError("a prompt holds exactly one '{}' where the tag goes (for example 'a photo of a {} product')")
    return prompt


TagName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), AfterValidator(single_line)
]
GroupName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")]
Prompt = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=2, max_length=MAX_PROMPT_CHARS),
    AfterValidator(single_line),
    AfterValidator(_one_placeholder),
]


class TagGroup(StrictModel):
    """One group of a taxonomy: its tags, the text each tag is matched as, and synonyms that map onto tags."""

    name: GroupName
    description: str | None = Field(default=None, max_length=2000)
    prompt: Prompt = DEFAULT_PROMPT
    values: list[TagName] = Field(min_length=1, max_length=MAX_GROUP_VALUES)
    synonyms: dict[TagName, TagName] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> TagGroup:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        first: dict[str, int] = {}
        for i, value in enumerate(self.values):
            key = clean_answer(value)
            if not key:
                problems.append((("values", i), f"'{value}' has no letters or digits, so nothing can match it"))
            elif key in first:
                problems.append(
                    (("values", i), f"'{value}' repeats values[{first[key]}] ('{self.values[first[key]]}'); remove one")
                )
            first.setdefault(key, i)
        for word, target in self.synonyms.items():
            if clean_answer(target) not in first:
                problems.append(
                    (
                        ("synonyms", word),
                        f"synonym '{word}' maps to '{target}', which is not one of this group's values",
                    )
                )
            elif clean_answer(word) in first and clean_answer(word) != clean_answer(target):
                problems.append(
                    (("synonyms", word), f"'{word}' is itself a value of this group, so it cannot mean '{target}'")
                )
        if problems:
            raise PolicyProblems(problems)
        return self

    def text_for(self, value: str) -> str:
        """The text a tag is matched as: the group's prompt with the tag in it."""
        return self.prompt.replace("{}", value)

    def vocabulary(self) -> Vocabulary:
        return Vocabulary.of(self.values, self.synonyms)


class Taxonomy(StrictModel):
    """A named set of tag groups, loaded from `taxonomies/*.yaml` beside the policies."""

    name: GroupName
    description: str = Field(min_length=1, max_length=2000)
    groups: list[TagGroup] = Field(min_length=1, max_length=64)

    _version: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _unique_groups(self) -> Taxonomy:
        seen: dict[str, int] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, group in enumerate(self.groups):
            if group.name in seen:
                problems.append(
                    (("groups", i, "name"), f"group '{group.name}' is already defined at groups[{seen[group.name]}]")
                )
            seen.setdefault(group.name, i)
        if problems:
            raise PolicyProblems(problems)
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self._version = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        return self

    @property
    def version(self) -> str:
        """First 16 hex digits of the SHA-256 of the content: a policy that uses the taxonomy hashes this in."""
        return self._version

    def group(self, name: str) -> TagGroup | None:
        return next((group for group in self.groups if group.name == name), None)

    @property
    def size(self) -> int:
        return sum(len(group.values) for group in self.groups)


@dataclass(frozen=True)
class TagEntry:
    """One tag as a tags check scores it: its name, its group, and the text the models see."""

    name: str
    group: str
    text: str


@dataclass(frozen=True)
class Vocabulary:
    """The candidate answers of an attribute question and how free text maps onto them."""

    values: tuple[str, ...]
    lookup: Mapping[str, str]  # cleaned value or synonym -> canonical value

    @classmethod
    def of(cls, values: Sequence[str], synonyms: Mapping[str, str]) -> Vocabulary:
        lookup: dict[str, str] = {}
        canonical = {clean_answer(value): value for value in values}
        lookup.update(canonical)
        for word, target in synonyms.items():
            lookup.setdefault(clean_answer(word), canonical.get(clean_answer(target), target))
        return cls(values=tuple(values), lookup=lookup)

    def normalise(self, text: str) -> str:
        """The canonical value `text` means ("Crimson" -> "red", "navy blue" -> "blue"), else the cleaned text.

        A phrase that is not known as a whole is tried from its end ("dark navy blue" -> "navy blue" ->
        "blue"), then word by word from the end: in English the head of a colour or material phrase comes
        last ("light blue", "stainless steel").
        """
        cleaned = clean_answer(text)
        if cleaned in self.lookup:
            return self.lookup[cleaned]
        words = cleaned.split()
        for start in range(1, len(words)):
            tail = " ".join(words[start:])
            if tail in self.lookup:
                return self.lookup[tail]
        for word in reversed(words):
            for form in (word, _singular(word)):
                if form in self.lookup:
                    return self.lookup[form]
        return cleaned

    def candidates(self, claimed: str | None) -> tuple[str, ...]:
        """The answers to rank: the vocabulary, plus the claim itself when it is outside the vocabulary."""
        if claimed is None or claimed in self.values:
            return self.values
        return (*self.values, claimed)


def clean_answer(text: str) -> str:
    """Lower case, accents folded, punctuation and filler words ("a", "the", "colour") dropped, spaces single."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    words = re.sub(r"[^a-z0-9+&#./'-]+", " ", folded).replace("'s", "").split()
    words = [word.strip(".-'") for word in words]
    kept = [word for word in words if word and word not in _FILLER]
    return " ".join(kept or [word for word in words if word])


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def builtin_taxonomy_dir() -> Path:
    """The directory of the taxonomies that ship with modtag."""
    return Path(__file__).resolve().parent / TAXONOMY_DIR


@lru_cache(maxsize=1)
def builtin_taxonomies() -> dict[str, Taxonomy]:
    """The taxonomies that ship with modtag, by name (read once)."""
    return load_taxonomies(())


def load_taxonomies(dirs: Sequence[Path] = ()) -> dict[str, Taxonomy]:
    """The built-in taxonomies, then every *.yaml / *.yml file in each `<dir>/taxonomies/`, by name."""
    taxonomies: dict[str, Taxonomy] = {}
    origins: dict[str, str] = {}
    for directory in unique_dirs([builtin_taxonomy_dir(), *(d / TAXONOMY_DIR for d in dirs)]):
        if not directory.is_dir():
            continue  # an operator's policies directory need not have taxonomies
        for path in yaml_files(directory):
            root, data = read_document(path, "a taxonomy is a mapping with name, description and groups")
            try:
                taxonomy = Taxonomy.model_validate(data)
            except ValidationError as exc:
                raise PolicyError(validation_message(exc, root, str(path), Taxonomy), code="taxonomy_invalid") from None
            origin = position(str(path), locate(root, ("name",))[1])
            refuse_duplicate("taxonomy", taxonomy.name, origin, origins)
            taxonomies[taxonomy.name] = taxonomy
            origins[taxonomy.name] = origin
    return taxonomies

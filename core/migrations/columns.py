"""The revisions' columns written as a table, one column a line (`name type [null]`), as SQL would write them.

Types: `varchar(N)`, `text`, `integer`, `float`, `boolean`, `json`, `timestamptz` (a timestamp with time zone)
and `bigserial` (a BIGINT key that counts itself; INTEGER on SQLite, whose row ids are 64-bit anyway).
A column is NOT NULL unless its line ends in `null`. Revisions are history: a type's meaning here never changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

_VARCHAR = re.compile(r"^varchar\((\d+)\)$")
_TYPES: dict[str, Callable[[], sa.types.TypeEngine[Any]]] = {
    "text": sa.Text,
    "integer": sa.Integer,
    "float": sa.Float,
    "boolean": sa.Boolean,
    "json": sa.JSON,
    "timestamptz": lambda: sa.DateTime(timezone=True),
}


def columns(table: str) -> list[sa.Column[Any]]:
    """The columns a table of `name type [null]` lines declares, in order."""
    return [_column(line.split()) for line in table.strip().splitlines()]


def _column(words: list[str]) -> sa.Column[Any]:
    name, kind, *rest = words
    if rest not in ([], ["null"]):
        raise ValueError(f"column {name}: expected `name type [null]`, got {' '.join(words)!r}")
    nullable = rest == ["null"]
    if kind == "bigserial":
        return sa.Column(name, sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False)
    if match := _VARCHAR.match(kind):
        return sa.Column(name, sa.String(length=int(match.group(1))), nullable=nullable)
    return sa.Column(name, _TYPES[kind](), nullable=nullable)

"""`modtag banks import NAME FILE`: a CSV list of PDQ or SHA-256 hashes into a bank, through the API.

The file is what trust-and-safety teams exchange: one hash per line (64 hex digits), optionally a
second column with a note, optionally a header line. Items go in requests of IMPORT_CHUNK.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from modtag.client import ApiClient

IMPORT_CHUNK = 10_000
HashKind = Literal["pdq", "sha256"]
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class HashFileError(ValueError):
    """A line of the file is not a hash; says which."""


def read_hash_file(path: Path, kind: HashKind) -> list[dict[str, str]]:
    """The items of a CSV of hashes: [{kind: hash, "note": ...}]; HashFileError names the first bad line."""
    items: list[dict[str, str]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            cells = [cell.strip() for cell in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            if not _HEX64.match(cells[0]):
                if number == 1 and not items:
                    continue  # a header line
                raise HashFileError(f"{path}:{number}: {cells[0][:80]!r} is not a {kind} hash (64 hex digits)")
            item: dict[str, str] = {kind: cells[0].lower()}
            if len(cells) > 1 and cells[1]:
                item["note"] = cells[1][:2000]
            items.append(item)
    return items


def import_hashes(client: ApiClient, bank: str, items: list[dict[str, str]]) -> Iterator[tuple[int, int]]:
    """Send the items in chunks; yields how many each accepted request added and skipped (already in the bank).
    Raises RuntimeError on a refusal."""
    for start in range(0, len(items), IMPORT_CHUNK):
        reply = client.import_bank_items(bank, items[start : start + IMPORT_CHUNK])
        if reply.status != 201:
            raise RuntimeError(f"{reply.body.get('detail', 'refused')} ({reply.body.get('code', reply.status)})")
        yield int(reply.body["added"]), int(reply.body.get("skipped", 0))

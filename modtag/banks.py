"""`modtag banks import|export`: hash lists in and out of a bank through the API, in HMA's format or as CSV.

An import reads and checks the whole file here first, with the reader the API uses (core/hashexchange.py), so a
malformed line is reported with its line number in the file before anything is sent. The hashes then go in parts
of IMPORT_CHUNK (one request each, well under the API's MODTAG_BANK_IMPORT_MAX_BYTES) as CSV, which keeps the
notes, behind a progress bar. Hashes the bank already holds are skipped by the API, so an import interrupted
halfway is simply run again.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from core.banks import NewBankItem
from core.hashexchange import ExchangeFormat, HashList, read_hash_list
from modtag.client import ApiClient

IMPORT_CHUNK = 10_000


class BankImportError(RuntimeError):
    """The API refused a part of an import: says why, with its code."""


def guess_format(path: Path) -> ExchangeFormat:
    """A `.csv` file is CSV; anything else is read as HMA's signal file."""
    return ExchangeFormat.CSV if path.suffix.lower() == ".csv" else ExchangeFormat.HMA


def read_list(path: Path, fmt: ExchangeFormat, signal_type: str | None) -> HashList:
    """The file's hashes; core.hashexchange's errors (malformed lines by number, too many hashes) as it raises them."""
    with path.open("rb") as handle:
        return read_hash_list(handle, fmt, signal_type, max_items=10**8)


def import_list(client: ApiClient, bank: str, found: HashList, *, progress: bool) -> Iterator[tuple[int, int]]:
    """Send the hashes in parts; yields how many each part added and skipped (already in the bank).
    Raises BankImportError on a refusal."""
    with tqdm(total=len(found.items), desc=f"importing into {bank}", unit="hash", disable=not progress) as bar:
        for start in range(0, len(found.items), IMPORT_CHUNK):
            part = found.items[start : start + IMPORT_CHUNK]
            reply = client.import_bank_file(bank, _as_csv(part), fmt=ExchangeFormat.CSV.value)
            if reply.status != 201:
                detail = reply.body.get("detail", "refused")
                raise BankImportError(f"{detail} ({reply.body.get('code', reply.status)})")
            bar.update(len(part))
            yield int(reply.body["added"]), int(reply.body.get("skipped", 0))


def _as_csv(items: list[NewBankItem]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("signal_type", "signal", "note"))
    for item in items:
        note = " ".join((item.note or "").split())
        if item.sha256 is not None:
            writer.writerow(("sha256", item.sha256, note))
        elif item.pdq is not None:
            writer.writerow(("pdq", item.pdq, note))
    return text.getvalue().encode()

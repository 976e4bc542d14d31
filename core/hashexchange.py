"""Hash lists in and out of banks: the format Meta's Hasher-Matcher-Actioner (HMA) exchanges, and a CSV for people.

Matched against facebook/ThreatExchange (HMA 2.x, `hasher-matcher-actioner/src/OpenMediaMatch`, and the
python-threatexchange library it is built on):

- `hma`: the signal file of python-threatexchange's local-file exchange
  (`threatexchange/exchanges/impl/file_api.py`, `LocalFileSignalExchangeAPI`), which an HMA 2.x instance fetches a
  bank from: one signal per line, `<signal_type> <signal>` separated by a space; a line with the signal alone takes
  the exchange's default signal type (here the `signal_type` parameter). `threatexchange dataset -P -S` prints a
  dataset in the same shape.
- Signal type names are python-threatexchange's `SignalType.get_name()`: `pdq` (`PdqSignal`: 64 hex digits,
  compared by Hamming distance, a match at <= 31 bits, the threshold modtag uses too) and `video_sha256`
  (`VideoSHA256Signal`: a file's SHA-256, the digest modtag records of an upload's bytes). HMA has no SHA-256 type
  for photos; modtag writes its SHA-256 items as `sha256` and reads `sha256` and `video_sha256` alike. HMA's other
  types (`video_md5`, `url`, `raw_text`, ...) are not matched here: an import counts them as unsupported instead
  of refusing the file, since an HMA dump holds them beside its PDQ hashes.
- `csv`: a header row names the columns: `signal_type` and `signal` (or `signal_str`, as `threatexchange dataset
  -P --csv` writes it), an optional `note`; other columns (`collab`, `tags`, modtag's `id`, `added_at`) are
  ignored. A header may instead name a signal type (`pdq,note`): its column holds that type's hashes. Without a
  header, a row is `signal_type,signal[,note]`, or `hash[,note]` of the `signal_type` parameter's type.

Reading is all or nothing: every malformed line is reported with its number and nothing is added.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal

from core.banks import MAX_IMPORT_ITEMS, NewBankItem
from core.errors import InvalidField, ModtagError
from core.hashes import PDQ_MIN_QUALITY, parse_pdq, parse_sha256

MAX_LINE_CHARS = 4096  # a hash and a note; a longer line is hostile or not a hash list
_REPORTED_LINES = 20  # malformed lines named in one error
_UNSUPPORTED_TYPES = 16  # distinct signal types modtag does not match that one file may hold (HMA has about a dozen)
_NOTE_CHARS = 2000
# modtag's name of a signal -> the BankItem column it goes in.
SignalType = Literal["pdq", "sha256", "video_sha256"]  # the names modtag matches
SIGNAL_COLUMNS: dict[str, str] = {"pdq": "pdq", "sha256": "sha256", "video_sha256": "sha256"}
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")  # python-threatexchange's SignalType.get_name() style
_HASH_LIKE = re.compile(r"^[0-9a-f]{32,}$")


class ExchangeFormat(StrEnum):
    """How a hash list is written: HMA's signal file (the default) or a CSV with a header."""

    HMA = "hma"
    CSV = "csv"


@dataclass
class HashList:
    """What a file held: the items to add, the signals of types modtag does not match (by type), the lines read."""

    items: list[NewBankItem] = field(default_factory=list)
    unsupported: Counter[str] = field(default_factory=Counter)
    lines: int = 0


class MalformedHashList(ModtagError, code="bank_import_malformed", http_status=422):
    """A hash list with lines that are not hashes; `lines` holds (line number, what is wrong) for the first ones."""

    def __init__(self, problems: list[tuple[int, str]], total: int) -> None:
        listed = "; ".join(f"line {number}: {problem}" for number, problem in problems)
        more = f" (and {total - len(problems)} more)" if total > len(problems) else ""
        super().__init__(
            f"{total} malformed line{'s' if total != 1 else ''}, nothing was added: {listed}{more}. "
            "Fix the lines and import the file again."
        )
        self.lines = problems


def read_hash_list(
    lines: Iterable[bytes], fmt: ExchangeFormat, default_type: str | None = None, *, max_items: int = MAX_IMPORT_ITEMS
) -> HashList:
    """The items of a hash list given as raw lines (a file opened in binary); MalformedHashList names bad lines,
    InvalidField `bank_import_too_large` refuses more than `max_items` hashes."""
    if default_type is not None and default_type not in SIGNAL_COLUMNS:
        raise InvalidField(
            f"signal_type {default_type[:40]!r} is not one modtag matches: use one of {', '.join(SIGNAL_COLUMNS)}",
            code="signal_type_invalid",
        )
    found = HashList()
    problems: list[tuple[int, str]] = []
    total_problems = 0
    reader = _read_csv_row if fmt is ExchangeFormat.CSV else _read_hma_row
    columns: dict[str, int] | None = None
    for number, text in _text_lines(lines):
        found.lines = number
        try:
            if text is None:
                raise _Bad("not UTF-8 text")
            if len(text) > MAX_LINE_CHARS:
                raise _Bad(f"longer than {MAX_LINE_CHARS} characters")
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if fmt is ExchangeFormat.CSV and columns is None:
                columns = _csv_header(stripped)
                if columns:
                    continue
            signal = reader(stripped, columns or {}, default_type)
            unknown = signal is not None and signal[0] not in SIGNAL_COLUMNS and signal[0] not in found.unsupported
            if unknown and len(found.unsupported) >= _UNSUPPORTED_TYPES:
                raise _Bad("not a signal type modtag knows (too many unknown types: is this a hash list?)")
        except _Bad as bad:
            total_problems += 1
            if len(problems) < _REPORTED_LINES:
                problems.append((number, str(bad)))
            continue
        if signal is None:
            continue
        kind, value, note = signal
        column = SIGNAL_COLUMNS.get(kind)
        if column is None:
            found.unsupported[kind] += 1
            continue
        if len(found.items) >= max_items:
            raise InvalidField(
                f"the file holds more than {max_items} hashes: split it and import the parts one after another",
                code="bank_import_too_large",
            )
        item = NewBankItem(pdq=value, note=note) if column == "pdq" else NewBankItem(sha256=value, note=note)
        found.items.append(item)
    if total_problems:
        raise MalformedHashList(problems, total_problems)
    return found


def write_hma(items: Iterable[tuple[str | None, str | None, int | None]]) -> Iterator[str]:
    """HMA signal-file lines of (sha256, pdq, pdq_quality) rows: one line per hash, SHA-256 first.

    A PDQ hash below PDQ_MIN_QUALITY is left out: it never matches here, and elsewhere it would match unrelated
    flat images."""
    for sha256, pdq, quality in items:
        if sha256:
            yield f"sha256 {sha256}\n"
        if pdq and (quality is None or quality >= PDQ_MIN_QUALITY):
            yield f"pdq {pdq}\n"


CSV_COLUMNS = ("signal_type", "signal", "note", "id", "added_at")


def write_csv(items: Iterable[tuple[str, str | None, str | None, int | None, str | None, datetime]]) -> Iterator[str]:
    """CSV lines, header first, of (id, sha256, pdq, pdq_quality, note, created_at) rows: one row per hash."""
    yield ",".join(CSV_COLUMNS) + "\r\n"
    for item_id, sha256, pdq, quality, note, created_at in items:
        added = created_at.isoformat().replace("+00:00", "Z")
        note = " ".join((note or "").split())  # one line per row: the reader reads a row per line
        if sha256:
            yield _csv_row(("sha256", sha256, note or "", item_id, added))
        if pdq and (quality is None or quality >= PDQ_MIN_QUALITY):
            yield _csv_row(("pdq", pdq, note or "", item_id, added))


class _Bad(Exception):
    """One malformed line: what is wrong with it."""


def _text_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, str | None]]:
    for number, raw in enumerate(lines, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a spreadsheet's UTF-8 byte order mark
        try:
            yield number, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield number, None


def _read_hma_row(text: str, _columns: dict[str, int], default_type: str | None) -> tuple[str, str, None]:
    kind, _, signal = text.partition(" ")
    if not signal.strip():
        if default_type is None:
            raise _Bad(f"{_shown(text)} has no signal type: write `pdq <hash>`, or import with signal_type")
        kind, signal = default_type, kind
    kind = kind.strip().lower()
    return kind, _value(kind, signal.strip()), None


def _read_csv_row(text: str, columns: dict[str, int], default_type: str | None) -> tuple[str, str, str | None] | None:
    try:
        (cells,) = list(csv.reader([text]))
    except (csv.Error, ValueError):
        raise _Bad("not one CSV row") from None
    cells = [cell.strip() for cell in cells]

    def cell(name: str) -> str | None:
        index = columns.get(name)
        return cells[index] if index is not None and index < len(cells) and cells[index] else None

    if not columns:  # no header: `signal_type,signal[,note]`, or `hash[,note]` of the parameter's type
        typed_row = len(cells) > 1 and _TYPE_NAME.match(cells[0]) is not None
        kind = cells[0].lower() if typed_row else default_type
        if kind is None:
            raise _Bad("a CSV without a header row needs signal_type (or a header: signal_type,signal,note)")
        rest = cells[1:] if typed_row else cells
        note = rest[1][:_NOTE_CHARS] if len(rest) > 1 and rest[1] else None
        return kind, _value(kind, rest[0]), note
    note = cell("note")
    if note is not None:
        note = note[:_NOTE_CHARS]
    typed = next((name for name in SIGNAL_COLUMNS if name in columns), None)
    if "signal_type" in columns:
        kind, signal = (cell("signal_type") or "").lower(), cell("signal") or cell("signal_str")
        if not kind or signal is None:
            raise _Bad("the row has no signal_type or no signal")
    elif typed is not None:
        kind, signal = typed, cell(typed)
        if signal is None:
            return None  # this row has no hash of that column's type
    else:  # a header without signal_type: the parameter names the type of the `signal` column
        if default_type is None:
            raise _Bad("the header has no signal_type column: add one, or import with signal_type")
        kind, signal = default_type, cell("signal") or cell("signal_str")
        if signal is None:
            raise _Bad("the row has no signal")
    return kind, _value(kind, signal), note


def _csv_header(text: str) -> dict[str, int]:
    """The columns a header row names, or {} when the row is data (its first cell a hash, or no known name)."""
    try:
        (cells,) = list(csv.reader([text]))
    except (csv.Error, ValueError):
        return {}
    names = [cell.strip().lower() for cell in cells]
    known = {"signal_type", "signal", "signal_str", *SIGNAL_COLUMNS}
    if not known.intersection(names) or any(_HASH_LIKE.match(name) for name in names):
        return {}
    return {name: index for index, name in reversed(list(enumerate(names)))}


def _value(kind: str, signal: str) -> str:
    column = SIGNAL_COLUMNS.get(kind)
    if column is None:
        if not kind.replace("_", "").isalnum() or len(kind) > 40:
            raise _Bad(f"{_shown(kind)} is not a signal type name")
        return signal  # counted as unsupported by the caller, never stored
    try:
        return parse_pdq(signal) if column == "pdq" else parse_sha256(signal)
    except InvalidField:
        raise _Bad(f"{_shown(signal)} is not a {kind} hash (64 hex digits)") from None


def _shown(text: str) -> str:
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _csv_row(cells: tuple[str, ...]) -> str:
    line: list[str] = []
    for cell in cells:
        # A note is someone's free text: a spreadsheet must not run it as a formula.
        if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
            cell = "'" + cell
        line.append('"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\r\n') else cell)
    return ",".join(line) + "\r\n"

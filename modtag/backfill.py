"""`modtag backfill FILE`: submit a catalogue to the bulk lane at a rate limit, resumably.

FILE is CSV with a header or JSON lines; each row has `url` or `path`, and optionally `id` and `context` (a JSON
object; in CSV, its JSON text). Every row is sent as one `priority: bulk` job with an Idempotency-Key derived from
its id (from its content when it has none) and the policy, so a row sent twice is still one job. What became of
each row is appended to `OUT/results.jsonl` (accepted: the job id) or `OUT/failures.jsonl` (refused or unreadable:
the code and reason) as soon as it is known; together they are the state a run resumes from: a row whose key is
in either is not sent again. A bad row is a failure with its reason, never the end of the run; an API that cannot
be reached ends the run (run it again to resume), and a 429 or 503 is waited out (its Retry-After).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from core.errors import InvalidField, ModtagError
from modtag.client import ApiClient, Reply

RESULTS_FILE = "results.jsonl"
FAILURES_FILE = "failures.jsonl"
MAX_ROW_BYTES = 64 * 1024  # a longer row is a failure (`row_too_large`), read no further than this
MAX_KEY_ID_CHARS = 160  # an id longer than this (or not printable ASCII) is hashed into the Idempotency-Key
MAX_RETRIES = 8  # 429/503/5xx answers waited out per row before it is recorded as a failure
MAX_RETRY_WAIT_S = 60.0
_TRANSIENT = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Row:
    """One catalogue row as read: its 1-based line (`number`), and either what to send or why it cannot be sent."""

    number: int
    id: str | None = None
    url: str | None = None
    path: Path | None = None
    context: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None  # (code, reason) of a row that cannot be sent

    def key(self, policy: str) -> str:
        """The row's Idempotency-Key: from its id, else from its content (the same row gives the same key); an
        unreadable row without an id is known by its line."""
        if self.id is None and self.problem is not None:
            return f"backfill:{policy}:line:{self.number}"
        if self.id is not None:
            if len(self.id) <= MAX_KEY_ID_CHARS and all(" " < char <= "~" for char in self.id):
                return f"backfill:{policy}:id:{self.id}"
            return f"backfill:{policy}:id-sha256:{_sha256(self.id)}"
        content = {"url": self.url, "path": str(self.path) if self.path else None, "context": self.context}
        return f"backfill:{policy}:row-sha256:{_sha256(json.dumps(content, sort_keys=True, separators=(',', ':')))}"


@dataclass
class BackfillReport:
    rows: int = 0
    submitted: int = 0  # accepted in this run
    skipped: int = 0  # already in the results or failures of an earlier run
    failed: int = 0  # recorded as failures in this run
    interrupted: bool = False
    out_dir: Path = field(default_factory=Path)


class RateLimit:
    """At most `per_s` calls a second, with a burst of one second's worth after a pause (the generic cell rate
    algorithm: each call is due `1/per_s` after the last one's due time); the clock and sleep are injected."""

    def __init__(
        self,
        per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self._interval = 1.0 / per_s
        self._burst_s = max(0.0, 1.0 - self._interval)
        self._clock, self._sleep = clock, sleep
        self._due = clock()

    def take(self) -> None:
        """Return when the next call may go, sleeping until then if it is early."""
        now = self._clock()
        due = max(self._due, now)
        early = due - self._burst_s - now
        if early > 1e-9:  # not a rounding error's worth
            self._sleep(early)
        self._due = due + self._interval


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of a CSV file with a header (by its `.csv` suffix, or a first line that is not a JSON object) or of
    JSON lines; unreadable rows come out with their `problem`."""
    with path.open("rb") as raw:
        first = raw.read(1024).lstrip(b"\xef\xbb\xbf").lstrip()
    if path.suffix.lower() == ".csv" or not first.startswith(b"{"):
        yield from _csv_rows(path)
    else:
        yield from _json_rows(path)


def count_rows(path: Path) -> int:
    """How many rows `read_rows` will give, at most (lines that are not blank, less a CSV header): for the bar."""
    lines = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            lines += chunk.count(b"\n")
    return lines


def backfill(
    client: ApiClient,
    source: Path,
    out_dir: Path,
    *,
    policy: str = "moderation",
    rate_per_s: float = 10.0,
    progress: bool = True,
    stop: threading.Event | None = None,
    limiter: RateLimit | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> BackfillReport:
    """Submit every row of `source` not yet in `out_dir`'s results or failures, appending each outcome there."""
    if not source.is_file():
        raise InvalidField(f"{source}: no such file (a CSV with a header, or JSON lines)", code="backfill_input")
    rows = read_rows(source)
    first = next(rows, None)  # a CSV without a usable header is refused here, before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _done_keys(out_dir / RESULTS_FILE) | _done_keys(out_dir / FAILURES_FILE)
    limiter = limiter or RateLimit(rate_per_s)
    report = BackfillReport(out_dir=out_dir)
    with (
        (out_dir / RESULTS_FILE).open("a", encoding="utf-8") as results,
        (out_dir / FAILURES_FILE).open("a", encoding="utf-8") as failures,
        tqdm(total=count_rows(source), desc="backfill", unit="row", disable=not progress) as bar,
    ):
        for row in itertools.chain([first] if first is not None else [], rows):
            if stop is not None and stop.is_set():
                report.interrupted = True
                break
            report.rows += 1
            bar.update(1)
            key = row.key(policy)
            if key in done:
                report.skipped += 1
                continue
            if row.problem is not None:
                _record(failures, row, key, {"code": row.problem[0], "reason": row.problem[1], "status": None})
                report.failed += 1
            else:
                limiter.take()
                reply = _submit(client, row, key, policy, sleep)
                if reply.accepted:
                    body = reply.body
                    outcome = {"job_id": body.get("id"), "status": body.get("status"), "replayed": reply.status == 200}
                    _record(results, row, key, outcome)
                    report.submitted += 1
                else:
                    reason = str(reply.body.get("detail") or "refused")
                    _record(
                        failures, row, key, {"code": reply.body.get("code"), "reason": reason, "status": reply.status}
                    )
                    report.failed += 1
            done.add(key)
            bar.set_postfix(sent=report.submitted, failed=report.failed, refresh=False)
    return report


def _submit(client: ApiClient, row: Row, key: str, policy: str, sleep: Callable[[float], Any]) -> Reply:
    """Send one row; 429, 503 and 5xx answers waited out (Retry-After, else a doubling pause) up to MAX_RETRIES.

    A refusal that would refuse every row (a bad key, a missing role, an unknown policy) ends the run instead."""
    pause = 1.0
    for attempt in range(MAX_RETRIES + 1):
        if row.url is not None:
            reply = client.submit_url_job(
                row.url, policy=policy, context=row.context, priority="bulk", idempotency_key=key
            )
        else:
            assert row.path is not None
            reply = client.submit_job(
                row.path, policy=policy, context=row.context, priority="bulk", idempotency_key=key
            )
        if reply.auth_refused or reply.body.get("code") in ("policy_not_found", "too_many_failures"):
            raise ModtagError(
                f"the API refused the backfill: {reply.body.get('detail')} Nothing more was sent; fix it and run "
                "the same command again to resume.",
                code=str(reply.body.get("code") or "auth_required"),
            )
        if reply.status not in _TRANSIENT or attempt == MAX_RETRIES:
            return reply
        sleep(min(MAX_RETRY_WAIT_S, reply.retry_after_s if reply.retry_after_s is not None else pause))
        pause = min(MAX_RETRY_WAIT_S, pause * 2)
    raise AssertionError("unreachable")


def _record(handle: TextIO, row: Row, key: str, outcome: dict[str, Any]) -> None:
    """Append the row's outcome and flush it: a run killed right after still knows the row was sent."""
    line = {"row": row.number, "id": row.id, "key": key, "url": row.url, "path": str(row.path) if row.path else None}
    handle.write(json.dumps({**line, **outcome}, ensure_ascii=False) + "\n")
    handle.flush()


def _done_keys(path: Path) -> set[str]:
    """The keys an earlier run recorded; a last line cut short by a kill is ignored (that row is sent again, and
    its Idempotency-Key makes the resend the same job)."""
    keys: set[str] = set()
    if not path.exists():
        return keys
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                keys.add(record["key"])
    return keys


def _json_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_ROW_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                while (rest := handle.readline(MAX_ROW_BYTES)) and not rest.endswith(b"\n"):
                    pass  # the rest of the over-long line, read in bounded pieces and dropped
                yield Row(number, problem=("row_too_large", f"the line is longer than {MAX_ROW_BYTES} bytes"))
                continue
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError as exc:
                yield Row(number, problem=("row_invalid", f"not a JSON object: {exc}"))
                continue
            if not isinstance(value, dict):
                yield Row(number, problem=("row_invalid", "each line must be a JSON object with `url` or `path`"))
                continue
            yield _row(number, value, context_is_text=False, base=path.parent)


def _csv_rows(path: Path) -> Iterator[Row]:
    text = io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", errors="replace", newline="")
    with text:
        csv.field_size_limit(MAX_ROW_BYTES)
        reader = csv.reader(text)
        try:
            header = [name.strip().lower() for name in next(reader)]
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidField(f"{path}: the CSV header cannot be read: {exc}", code="backfill_input") from None
        if "url" not in header and "path" not in header:
            raise InvalidField(
                f"{path}: the CSV header must name a `url` or `path` column (it has: {', '.join(header)[:200]})",
                code="backfill_input",
            )
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row(reader.line_num, problem=("row_invalid", f"the CSV row cannot be read: {exc}"))
                continue
            if not any(cell.strip() for cell in cells):
                continue
            values = {name: cell for name, cell in zip(header, cells, strict=False) if cell != ""}
            if len(cells) > len(header):
                problem = ("row_invalid", f"{len(cells)} cells under {len(header)} columns")
                yield Row(reader.line_num, id=values.get("id", "").strip() or None, problem=problem)
                continue
            yield _row(reader.line_num, values, context_is_text=True, base=path.parent)


def _row(number: int, values: dict[str, Any], *, context_is_text: bool, base: Path) -> Row:
    """A row from its fields: exactly one of `url` and `path` (text), an `id` (text or a number), a context object."""
    row_id = values.get("id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int, type(None))):
        return Row(number, problem=("row_invalid", "`id` must be text or a whole number"))
    row_id = None if row_id is None or str(row_id).strip() == "" else str(row_id).strip()

    def bad(reason: str) -> Row:
        return Row(number, id=row_id, problem=("row_invalid", reason))

    url, path = values.get("url"), values.get("path")
    if (url is None) == (path is None):
        return bad("each row needs exactly one of `url` and `path`")
    if not isinstance(url or path, str) or not str(url or path).strip():
        return bad("`url` or `path` must be non-empty text")
    context = values.get("context")
    if context_is_text and isinstance(context, str):
        try:
            context = json.loads(context)
        except ValueError as exc:
            return bad(f"`context` is not valid JSON: {exc}")
    if context is not None and not isinstance(context, dict):
        return bad("`context` must be a JSON object")
    if path is not None:
        file = Path(str(path).strip())
        file = file if file.is_absolute() else base / file
        if not file.is_file():
            return bad(f"no such file: {file}")
        return Row(number, id=row_id, path=file, context=context)
    return Row(number, id=row_id, url=str(url).strip(), context=context)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:40]

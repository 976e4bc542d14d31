"""`modtag scan`: submit every image and video under some paths to an API, wait, and report the decisions.

A video gets a progress bar of its own while it uploads (it may be hundreds of MB); its line in the table names the
segments where a category fired."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from core.errors import ModtagError
from core.tables import FINAL_STATUSES
from modtag.client import ApiClient

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".apng"}


@dataclass
class ScanResult:
    path: Path
    job: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # refused at submission: {"status", "code", "detail"}
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.job or {}).get("status") == "failed"


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Image and video files under the paths; a file named explicitly is always taken (the API judges it)."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        if path.is_file():
            found.append(path)
            continue
        wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
        found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in wanted))
    return found


def scan(
    client: ApiClient,
    files: Sequence[Path],
    *,
    policy: str = "moderation",
    timeout_s: float = 600,
    progress: bool = True,
    wait_s: int | None = None,
) -> list[ScanResult]:
    """Submit each file, then poll until every job is final (or the timeout passes). With `wait_s`, each
    submission asks for its decision in the answer (`Prefer: wait=N`): only the jobs not decided in time are polled."""
    results = [ScanResult(path) for path in files]
    for result in _bar(results, "submitting" if wait_s is None else "judging now", progress):
        with _upload_bar(result.path, progress) as sent:
            reply = client.submit_job(result.path, policy=policy, wait_s=wait_s, on_sent=sent)
        if reply.auth_refused or reply.body.get("code") == "too_many_failures":
            # Every other file would be refused the same way: stop with what to do instead.
            raise ModtagError(
                f"the API refused the request: {reply.body.get('detail')} Pass a key with --api-key or "
                "MODTAG_API_KEY (role submit or admin).",
                code=str(reply.body.get("code") or "auth_required"),
            )
        if reply.accepted:
            result.job = reply.body
        else:
            result.error = {"status": reply.status, **reply.body}
    by_id = {str(r.job["id"]): r for r in results if r.job and r.job["status"] not in FINAL_STATUSES}
    with tqdm(total=len(by_id), desc="judging", unit="img", disable=not progress) as bar:
        final = client.wait_jobs(list(by_id), timeout_s=timeout_s, on_final=lambda _: bar.update(1))
    for job_id, result in by_id.items():
        if job_id in final:
            result.job = final[job_id]
        else:
            result.error = {"status": None, "code": "scan_timeout", "detail": f"not finished after {timeout_s:.0f}s"}
    return results


def print_table(results: Sequence[ScanResult], out: TextIO) -> None:
    """One line per image: action (or failure), top category, caption or error message."""
    rows = [("IMAGE", "RESULT", "TOP CATEGORY", "CAPTION / ERROR")]
    for result in results:
        rows.append((_shown_path(result.path), *_row(result)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        out.write("  ".join([*cells, row[3]]).rstrip() + "\n")
    done = sum(1 for r in results if r.job and r.job.get("status") == "done")
    failed = sum(1 for r in results if r.failed)
    out.write(f"\n{len(results)} files: {done} decided, {failed} failed\n")


def to_json(results: Sequence[ScanResult]) -> str:
    return json.dumps(
        [{"path": str(r.path), "job": r.job, "error": r.error} for r in results], indent=2, sort_keys=True
    )


def _row(result: ScanResult) -> tuple[str, str, str]:
    if result.error:
        return "refused", "", f"{result.error.get('detail')} ({result.error.get('code')})"
    job = result.job or {}
    if job.get("status") == "failed":
        error = job.get("error") or {}
        return "failed", "", f"{error.get('message')} ({error.get('code')})"
    decision = job.get("decision") or {}
    categories = decision.get("categories") or {}
    top = max(categories.items(), key=lambda item: item[1]["score"], default=None)
    top_text = f"{top[0]} {top[1]['score']:.2f}" if top else ""
    said = str(decision.get("caption") or "")
    if decision.get("frames") is not None:  # a video: where categories fired, then the deciding frame's caption
        runs = [f"{s['category']} {s['start_s']:g}-{s['end_s']:g} s" for s in decision.get("segments") or []]
        said = f"[{len(decision['frames'])} frames; {', '.join(runs) or 'nothing fired'}] {said}".rstrip()
    return str(decision.get("action", job.get("status"))), top_text, said


def _shown_path(path: Path, width: int = 48) -> str:
    """The path relative to the working directory when under it; long ones keep their file name."""
    try:
        text = str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        text = str(path)
    return text if len(text) <= width else "..." + text[-(width - 3) :]


@contextmanager
def _upload_bar(path: Path, enabled: bool) -> Iterator[Callable[[int], object] | None]:
    """A video's own upload bar (bytes sent), closed when its submission is answered; nothing for an image."""
    if not enabled or path.suffix.lower() not in VIDEO_SUFFIXES:
        yield None
        return
    with tqdm(total=path.stat().st_size, desc=path.name[-40:], unit="B", unit_scale=True, leave=False) as bar:
        yield bar.update


def _bar(items: Iterable[ScanResult], desc: str, enabled: bool) -> Iterable[ScanResult]:
    return tqdm(items, desc=desc, unit="img", disable=not enabled)

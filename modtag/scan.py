"""`modtag scan`: submit every image under some paths to an API, wait, and report the decisions."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

from core.errors import ModtagError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


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
    """Image files under the paths; a file named explicitly is always taken (the API judges it)."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        if path.is_file():
            found.append(path)
            continue
        found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    return found


def scan(
    api_url: str,
    files: Sequence[Path],
    *,
    policy: str = "moderation",
    timeout_s: float = 600,
    headers: dict[str, str] | None = None,
    progress: bool = True,
) -> list[ScanResult]:
    """Submit each file, then poll until every job is final (or the timeout passes)."""
    results = [ScanResult(path) for path in files]
    with httpx.Client(base_url=api_url, timeout=60, headers=headers or {}) as client:
        for result in _bar(results, "submitting", progress):
            with result.path.open("rb") as handle:
                response = client.post(
                    "/v1/jobs",
                    files={"image": (result.path.name, handle, "application/octet-stream")},
                    data={"policy": policy},
                )
            body = _json(response)
            if response.status_code in (401, 403):
                # Every other file would be refused the same way: stop with what to do instead.
                raise ModtagError(
                    f"the API refused the request: {body.get('detail')} Pass a key with --api-key or "
                    "MODTAG_API_KEY (role submit or admin).",
                    code=str(body.get("code") or "auth_required"),
                )
            if response.status_code in (200, 202):
                result.job = body
            else:
                result.error = {"status": response.status_code, **body}
        pending = [r for r in results if r.job and r.job["status"] not in ("done", "failed")]
        deadline = time.monotonic() + timeout_s
        with tqdm(total=len(pending), desc="judging", unit="img", disable=not progress) as bar:
            while pending and time.monotonic() < deadline:
                still: list[ScanResult] = []
                for result in pending:
                    assert result.job is not None
                    job = _json(client.get(f"/v1/jobs/{result.job['id']}"))
                    if job.get("status") in ("done", "failed"):
                        result.job = job
                        bar.update(1)
                    else:
                        still.append(result)
                pending = still
                if pending:
                    time.sleep(0.25)
        for result in pending:
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
    out.write(f"\n{len(results)} images: {done} decided, {failed} failed\n")


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
    return str(decision.get("action", job.get("status"))), top_text, str(decision.get("caption") or "")


def _shown_path(path: Path, width: int = 48) -> str:
    """The path relative to the working directory when under it; long ones keep their file name."""
    try:
        text = str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        text = str(path)
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"code": "bad_response", "detail": response.text[:200]}
    return body if isinstance(body, dict) else {"code": "bad_response", "detail": str(body)[:200]}


def _bar(items: Iterable[ScanResult], desc: str, enabled: bool) -> Iterable[ScanResult]:
    return tqdm(items, desc=desc, unit="img", disable=not enabled)

"""`modtag labels export DIR`: the tenant's labelled jobs as JSON lines (`labels.jsonl`) and their images
(`images/<job id>.<ext>`), paged from GET /v1/labels, for teams that train models elsewhere.

The JSON lines are written to a temporary file and renamed when complete, so an interrupted export never leaves a
partial file that looks whole. Images already in DIR (an earlier export) are not downloaded again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.errors import ModtagError
from modtag.client import ApiClient, Reply

PAGE = 500
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass(frozen=True)
class ExportReport:
    path: Path
    images_dir: Path
    jobs: int
    images: int
    missing: int
    why_missing: str


def export_labels(
    client: ApiClient, directory: Path, *, since: str, images: bool = True, progress: bool = True
) -> ExportReport:
    """Write every labelled job since `since` (one JSON object per line, with `image_file` when downloaded)."""
    directory.mkdir(parents=True, exist_ok=True)
    images_dir = directory / "images"
    if images:
        images_dir.mkdir(exist_ok=True)
    target = directory / "labels.jsonl"
    partial = directory / ".labels.jsonl.partial"
    jobs = downloaded = missing = 0
    reasons: dict[str, None] = {}
    cursor: str | None = None
    with partial.open("w", encoding="utf-8") as out, tqdm(desc="exporting", unit="job", disable=not progress) as bar:
        while True:
            page = _ok(client.labels(since=since, cursor=cursor, limit=PAGE))
            for job in page["data"]:
                if images and job.get("source") == "upload":
                    name = f"{job['job_id']}{_SUFFIXES.get(str(job.get('image_format')).upper(), '.img')}"
                    got, reason = _download(client, job["job_id"], images_dir / name)
                    if got:
                        job["image_file"] = f"images/{name}"
                        downloaded += 1
                    else:
                        missing += 1
                        reasons[reason] = None
                out.write(json.dumps(job, sort_keys=True, ensure_ascii=False) + "\n")
                jobs += 1
                bar.update(1)
            cursor = page.get("next_cursor")
            if not cursor:
                break
    os.replace(partial, target)
    return ExportReport(target, images_dir, jobs, downloaded, missing, ", ".join(reasons))


def _download(client: ApiClient, job_id: str, path: Path) -> tuple[bool, str]:
    """The job's image into `path` (kept when already there); (False, why) when the API has none to give."""
    if path.is_file() and path.stat().st_size > 0:
        return True, ""
    with client.stream("GET", f"/v1/labels/{job_id}/image") as response:
        if response.status_code != 200:
            response.read()
            reply = Reply.of(response)
            if response.status_code == 404:  # erased since the page was read, or a URL job: not an error
                return False, str(reply.body.get("code", "not_found"))
            _ok(reply)
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("wb") as handle:
            for chunk in response.iter_bytes():
                handle.write(chunk)
        os.replace(partial, path)
    return True, ""


def _ok(reply: Reply) -> dict[str, Any]:
    if reply.status != 200:
        raise ModtagError(
            f"the API refused the export: {reply.body.get('detail', 'refused')}",
            code=str(reply.body.get("code", "api_error")),
        )
    return reply.body

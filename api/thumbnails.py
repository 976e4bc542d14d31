"""Thumbnails of uploaded images for the dashboard: decoded safely, cached on disk, served privately."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from pathlib import Path

from fastapi import Response

from api.deps import Services
from core.errors import ImageError, NotFound
from core.images import ImageLimits, decode_image
from core.tables import Job

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 320
# Private: a shared cache (a CDN, a corporate proxy) must never hand one tenant's image to someone else.
CACHE_CONTROL = "private, max-age=3600"


def thumbnail_response(job: Job, services: Services) -> Response:
    """The job's thumbnail as a JPEG response; 404 `thumbnail_unavailable` for URL jobs and undecodable images."""
    if job.erased_at is not None:
        raise NotFound("this job's image was erased", code="job_erased")
    if not job.blob_key or not re.fullmatch(r"[0-9a-f]{64}", job.blob_key):
        raise NotFound(
            "this job's image was given as a URL and is not stored, so there is no thumbnail",
            code="thumbnail_unavailable",
        )
    data = thumbnail_bytes(job.blob_key, services)
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": f'"{job.blob_key[:32]}-{THUMBNAIL_SIDE}"'}
    return Response(data, media_type="image/jpeg", headers=headers)


def thumbnail_bytes(blob_key: str, services: Services) -> bytes:
    cache = _cache_path(services, blob_key)
    try:
        return cache.read_bytes()
    except FileNotFoundError:
        pass
    try:
        image = decode_image(services.blobs.get(blob_key), ImageLimits.from_settings(services.settings))
    except ImageError as exc:
        raise NotFound(f"the image cannot be shown: {exc.message}", code="thumbnail_unavailable") from None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    data = buffer.getvalue()
    _write_atomically(cache, data)
    return data


def forget_thumbnail(blob_key: str, services: Services) -> None:
    """Delete the cached thumbnail of an erased blob."""
    _cache_path(services, blob_key).unlink(missing_ok=True)


def _cache_path(services: Services, blob_key: str) -> Path:
    # blob_key is a SHA-256 hex digest (checked by the blob store), so it is safe as a file name.
    return services.settings.data_dir.resolve() / "thumbnails" / blob_key[:2] / f"{blob_key}-{THUMBNAIL_SIDE}.jpg"


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only or full disk costs a re-encode next time, not the response
        log.warning("thumbnail cache not written: %s", type(exc).__name__)

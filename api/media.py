"""A video job's stored file, served with HTTP range requests from the blob store (an HTML5 <video> seeks with them),
and its filmstrip (the job's thumbnail).

Only one range per request (a player never asks for more; a multi-range request is answered whole, which RFC 9110
allows), streamed from the blob store chunk by chunk: the video is never read whole into memory. A range that
cannot be satisfied answers 416 with `Content-Range: bytes */<size>`; a malformed Range header is ignored (200),
as the RFC asks.
"""

from __future__ import annotations

import re

from fastapi import Response
from fastapi.responses import StreamingResponse

from api.deps import Services
from api.errors import error_response
from core.errors import NotFound
from core.tables import Decision, Job

# Private: a shared cache must never hand one tenant's video to someone else.
CACHE_CONTROL = "private, max-age=3600"
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")  # 18 digits: past any file, short of a huge integer parse
_TYPES = {
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "webm": "video/webm",
    "matroska": "video/x-matroska",
    "gif": "image/gif",
    "png": "image/apng",
    "apng": "image/apng",
    "webp": "image/webp",
}


def video_response(job: Job, services: Services, range_header: str | None) -> Response:
    """The job's video, whole (200) or the one range asked for (206); 416 for a range past its end."""
    if job.erased_at is not None:
        raise NotFound("this job's video was erased", code="job_erased")
    if job.media != "video" or not job.blob_key:
        raise NotFound("this job is not a stored video (an image, or nothing stored)", code="video_unavailable")
    key = job.blob_key
    size = services.blobs.size(key)
    headers = {"Accept-Ranges": "bytes", "Cache-Control": CACHE_CONTROL, "ETag": f'"{key[:32]}"'}
    media_type = _TYPES.get((job.image_format or "").lower(), "application/octet-stream")
    span = _span(range_header, size)
    if span == "unsatisfiable":
        return error_response(
            416,
            f"the range asked for is outside the video's {size} bytes",
            "range_not_satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )
    start, end = span if isinstance(span, tuple) else (0, size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if isinstance(span, tuple):
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        status = 206
    chunks = services.blobs.read_range(key, start, end)  # opened here: a missing blob is a 404, not a cut stream
    return StreamingResponse(chunks, status_code=status, media_type=media_type, headers=headers)


def filmstrip_response(job: Job, decision: Decision | None, services: Services) -> Response:
    """A video job's thumbnail: the filmstrip JPEG the worker drew of its judged frames (fired ones framed in red)."""
    if job.erased_at is not None:
        raise NotFound("this job's video was erased", code="job_erased")
    key = decision.filmstrip_key if decision is not None else None
    if key is None:
        raise NotFound(
            "this video has no filmstrip yet: it is drawn when the worker has judged its frames",
            code="thumbnail_unavailable",
        )
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": f'"{key[:32]}"'}
    return Response(services.blobs.get(key), media_type="image/jpeg", headers=headers)


def _span(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end exclusive) of the one range asked for; None for the whole file; "unsatisfiable" for 416."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # malformed, several ranges or absurd numbers: ignored, the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = size if not last else min(size, int(last) + 1)
    if end <= start:
        return None  # the last byte before the first: not a valid range, ignored
    return start, end

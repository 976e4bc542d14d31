"""An `image_url` job's file, fetched to disk as it arrives: an image's bytes, or a video stored like an upload.

The API cannot tell what a URL holds (it fetches nothing), so a URL job starts as `media: image`. The worker streams
the body into a spool (in memory up to `SPOOL_MEMORY_BYTES`, then on disk), capped by what its first bytes are: an
image at MODTAG_MAX_UPLOAD_BYTES, a video file at MODTAG_MAX_VIDEO_BYTES (413 `fetch_too_large` past either). A video
file, or an image whose header says it has several frames, is probed like an upload (the same `video_*` codes, a
permanent failure), stored in the blob store, and recorded on the job (`media: video`, its blob and sizes); the
caller then decides it on its frames. Anything else is handed back as bytes, the image path as before.
"""

from __future__ import annotations

import tempfile
from typing import BinaryIO, cast

from core import jobs
from core.blobs import BlobStore
from core.db import session_scope
from core.dependencies import Dependency, DependencyRecord
from core.errors import ImageError
from core.images import ImageLimits, sniff_image
from core.settings import Settings
from core.tables import Job
from core.urls import fetch_to_file
from core.video import VideoLimits, animation_of, probe, sniff_video

SPOOL_MEMORY_BYTES = 1024 * 1024


def fetch_url_media(job: Job, settings: Settings, blobs: BlobStore, dependencies: DependencyRecord) -> bytes | None:
    """The image's bytes; or None when the URL held a video or an animation, now stored and recorded on `job`."""
    assert job.image_url, "a URL job"

    def cap_for(head: bytes) -> tuple[int, str]:
        if sniff_video(head):
            return settings.max_video_bytes, "MODTAG_MAX_VIDEO_BYTES"
        return settings.max_upload_bytes, "MODTAG_MAX_UPLOAD_BYTES"

    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spooled:
        spool = cast(BinaryIO, spooled)  # reads, writes and seeks like a binary file
        head = fetch_to_file(
            job.image_url,
            spool,
            max_bytes=max(settings.max_upload_bytes, settings.max_video_bytes),
            cap_for=cap_for,
            timeout_s=settings.fetch_timeout_s,
            allow_private=settings.fetch_allow_private,
        )
        size = spool.tell()
        container: str | None = sniff_video(head)
        fmt = container.upper() if container else ""
        if container is None:
            spool.seek(0)
            data = spool.read()  # an image: at most MODTAG_MAX_UPLOAD_BYTES
            try:
                header = sniff_image(data, ImageLimits.from_settings(settings))
            except ImageError:
                return data  # the image path refuses it with its own code
            container, fmt = animation_of(header), header.format
            if container is None:
                return data
        spool.seek(0)
        info = probe(spool, VideoLimits.from_settings(settings), container=container)
        if info.animated and info.frame_count == 1:
            spool.seek(0)
            return spool.read()  # a GIF, WebP or PNG of one frame: an image after all
        spool.seek(0)
        with dependencies.watch(Dependency.BLOB_STORE):
            key = blobs.put_file(spool)
        with session_scope(settings.resolved_database_url) as session:
            jobs.record_fetched_video(
                session, job, blob_key=key, size=size, fmt=fmt, width=info.width, height=info.height
            )
    return None

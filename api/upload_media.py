"""What an uploaded file is, image or video, told from its first bytes and checked before a job exists.

A job's upload is a video when its magic bytes announce MP4, MOV or WebM/Matroska (`core.video.sniff_video`), or when
it is a GIF, WebP or PNG whose header says it has more than one frame: an animation is judged on its frames like a
video (`media: "video"`), not on its first frame. Everything else is an image, checked as before (core/images.py).

Caps follow the kind: while the body arrives, an image stops at MODTAG_MAX_UPLOAD_BYTES and a video file at
MODTAG_MAX_VIDEO_BYTES (413 `image_too_large` / `video_too_large`, `file_cap`); an animated image is an image by its
bytes and has the image cap. A video is never read into memory: it is probed from its spool on disk
(`core.video.probe`: container, codec, duration, frame size, its first frame decoded), then streamed to the blob
store like any upload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from starlette.datastructures import UploadFile

from api.bodies import SpooledUpload
from core.images import ImageLimits, sniff_image
from core.settings import Settings
from core.video import VideoLimits, animation_of, probe, sniff_video


@dataclass(frozen=True)
class UploadHeader:
    """What the checks found: `media`, the format (JPEG... for images; MP4, MOV, WEBM, MATROSKA, or the animated
    image's own format for videos), the frame size, and for a video its duration in seconds."""

    media: Literal["image", "video"]
    format: str
    width: int
    height: int
    duration_s: float | None = None


def file_cap(settings: Settings) -> Callable[[bytes], tuple[int, str, str]]:
    """The cap of one uploaded file by its first bytes: the video limit for a video file, else the image limit."""
    video = (
        settings.max_video_bytes,
        "video_too_large",
        f"the video is larger than the limit of {settings.max_video_bytes} bytes (MODTAG_MAX_VIDEO_BYTES)",
    )
    image = (
        settings.max_upload_bytes,
        "image_too_large",
        f"the image is larger than the limit of {settings.max_upload_bytes} bytes (MODTAG_MAX_UPLOAD_BYTES)",
    )
    return lambda head: video if sniff_video(head) else image


def upload_limit(upload: UploadFile, settings: Settings) -> int:
    """The byte limit of this upload: the video limit for a video file, else the image limit."""
    return settings.max_video_bytes if sniff_video(getattr(upload, "head", b"")) else settings.max_upload_bytes


def check_upload(upload: SpooledUpload, images: ImageLimits, videos: VideoLimits | None) -> UploadHeader:
    """The upload checked as what it is; `videos` None: only images are accepted here (a listing's photos).

    Raises ImageError (`image_*`) or VideoError (`video_*`) with the status to answer.
    """
    container = sniff_video(upload.head) if videos is not None else None
    if container is not None and videos is not None:
        info = probe(upload.rewound(), videos, container=container)
        return UploadHeader("video", container.upper(), info.width, info.height, info.duration_s)
    header = sniff_image(upload.read_whole(), images)
    animated = animation_of(header)
    if videos is None or animated is None:
        return UploadHeader("image", header.format, header.width, header.height)
    # More than one frame (or a GIF that has a second one): judged as a video of its frames.
    info = probe(upload.rewound(), videos, container=animated)
    if info.frame_count == 1:
        return UploadHeader("image", header.format, header.width, header.height)
    return UploadHeader("video", header.format, info.width, info.height, info.duration_s)

"""Videos and animated images: a cheap probe of the container for the API, and the frames the worker judges.

Two public calls, both torch-free and safe on hostile input (every failure is a `VideoError` with a code):

- `probe(source, limits)` reads the container's header with PyAV (FFmpeg's libraries), restricted to the demuxer
  the magic bytes named, checks duration, codec and frame size against `VideoLimits`, and decodes the first frame
  (a file whose first frame cannot be decoded is refused before a job exists). It never decodes the whole video:
  the API calls it on an upload before the job is queued.
- `sample_frames(source, sampling, limits)` decodes the video once, front to back, and yields the frames worth
  judging (`Frame`): one every `1 / sampling.fps` seconds, plus scene changes found between them by a cheap score
  on small greyscale copies of every decoded frame; a candidate within `sampling.pdq_skip` bits (PDQ) of the
  previous kept frame is skipped, so a static shot costs one frame. At most `sampling.max_frames` are kept: a
  long video's interval is stretched so that the whole of it is covered, and scene changes spend only what the
  remaining interval samples leave.

Memory is bounded by a window, not by the video's length: the decoder holds the frames its threads have in flight,
this module holds the previous 64x64 grey thumbnail, the last kept frame's hash and thumbnail, and the one frame
being converted; each kept frame is handed to the caller as it is found.

Every frame is decoded (no `skip_frame`): the scene score needs the frames between sample points, and a one-frame
insert (a flash of other content) is exactly what a sampler that skips non-key frames would miss. The decoder uses
FFmpeg's frame and slice threading (`thread_type` AUTO), whose only cost is a longer delay before the first frame.

Formats: MP4 and MOV (ISO BMFF), WebM and Matroska, and animated GIF, APNG and WebP. FFmpeg's WebP decoder reads
still images only, so an animated WebP is decoded by Pillow (its RIFF chunks give the duration without decoding);
the rest go through PyAV.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np
from PIL import Image

from core.errors import VideoError
from core.hashes import pdq_distance, pdq_hash

if TYPE_CHECKING:
    from core.images import ImageHeader
    from core.settings import Settings

log = logging.getLogger(__name__)

Source = str | Path | BinaryIO
Container = Literal["mp4", "mov", "webm", "matroska", "gif", "apng", "webp"]

# Codecs whose FFmpeg decoders are mature and fuzzed; anything else (ProRes, raw video, old QuickTime codecs...)
# is refused before a job exists rather than handed to a rarely exercised decoder.
SUPPORTED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "gif", "apng", "webp"})
ANIMATED_IMAGE_CONTAINERS = frozenset({"gif", "apng", "webp"})
_ANIMATED_FORMATS = {"GIF": "gif", "WEBP": "webp", "PNG": "apng"}  # core.images' format -> the container read
_ACCEPTED = "MP4, MOV or WebM (H.264, HEVC, VP8, VP9, AV1 or MPEG-4), or an animated GIF, WebP or PNG"
_DEMUXER: dict[str, str] = {
    "mp4": "mov",
    "mov": "mov",
    "webm": "matroska",
    "matroska": "matroska",
    "gif": "gif",
    "apng": "apng",
}
_MIME: dict[str, str] = {
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "webm": "video/webm",
    "matroska": "video/x-matroska",
    "gif": "image/gif",
    "apng": "image/apng",
    "webp": "image/webp",
}
_SCENE_SIDE = 64  # the grey thumbnail the scene score compares: cheap, and blind to compression noise
_PDQ_SIDE = 512  # PDQ reads a 64x64 luminance grid: a 512 px copy hashes the same as the full frame
_FIRST_FRAME_PACKETS = 500  # a probe that finds no frame in this many packets calls the file undecodable
_MAX_DECODE_FPS = 240  # a stream decoding more frames per second of its own timeline than this is hostile


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be: bytes, seconds, and frame size (each side within [min_side, max_side])."""

    max_bytes: int
    max_seconds: float
    max_side: int
    min_side: int

    @classmethod
    def from_settings(cls, s: Settings) -> VideoLimits:
        return cls(
            max_bytes=s.max_video_bytes,
            max_seconds=s.max_video_seconds,
            max_side=s.max_video_side,
            min_side=s.min_image_side,
        )


@dataclass(frozen=True)
class Sampling:
    """How frames are chosen: `fps` samples a second, a scene score (0-1, mean grey change) that keeps a frame
    between samples, the PDQ distance under which a candidate repeats the previous kept frame, a cap on frames kept,
    and the decoder's threads (0: up to 4, as the machine has cores)."""

    fps: float = 1.0
    scene_threshold: float = 0.15
    pdq_skip: int = 20
    max_frames: int = 300
    threads: int = 0

    @classmethod
    def from_settings(cls, s: Settings) -> Sampling:
        return cls(
            fps=s.video_fps,
            scene_threshold=s.video_scene_threshold,
            pdq_skip=s.video_pdq_skip,
            max_frames=s.video_max_frames,
            threads=s.video_decode_threads,
        )


@dataclass(frozen=True)
class VideoInfo:
    """What the container says, checked: `container` one of mp4/mov/webm/matroska/gif/apng/webp, `codec` FFmpeg's
    decoder name, `duration_s`, `frame_rate` (None when the container does not say), `frame_count` (None when it
    does not say without a walk), and `animated`: an animated image (GIF, APNG, WebP) rather than a video file."""

    container: str
    codec: str
    width: int
    height: int
    duration_s: float
    frame_rate: float | None
    frame_count: int | None
    animated: bool
    mime: str


@dataclass(frozen=True)
class Frame:
    """A kept frame: its ordinal among the decoded frames, its time from the start, the frame as 8-bit RGB (upright),
    its PDQ hash (64 hex digits) and that hash's quality, and why it was kept: `first`, `interval` or `scene`."""

    index: int
    time_s: float
    image: Image.Image
    pdq: str
    pdq_quality: int
    reason: Literal["first", "interval", "scene"]


def sniff_video(head: bytes) -> Container | None:
    """The video container the first bytes announce (MP4, MOV, WebM/Matroska), or None: not a video file.

    Animated images are images to `core.images.sniff_image`; whether one is animated is its header's business.
    """
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"qt  ":
            return "mov"
        if brand in _HEIF_BRANDS:
            return None  # a still HEIF/AVIF image
        return "mp4"
    if len(head) >= 8 and head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip") and head[:4] != b"RIFF":
        return "mov"  # an old QuickTime file without an ftyp box
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm" if b"webm" in head[:64] else "matroska"
    return None


def animation_of(header: ImageHeader) -> str | None:
    """The container an image is read as when its header says it has more frames than one (or, for a GIF, may
    have: counting them needs a walk), else None: a still image. `probe` then says how many it has."""
    container = _ANIMATED_FORMATS.get(header.format)
    return None if container is None or header.frames == 1 else container


def probe(source: Source, limits: VideoLimits, *, container: str | None = None) -> VideoInfo:
    """Check a video or an animated image without decoding more than its first frame.

    `container` is what the magic bytes said (`sniff_video`, or "gif"/"apng"/"webp" for an animated image);
    None sniffs it here. Raises VideoError: `video_empty`, `video_too_large` (413), `video_unsupported` (415),
    `video_no_stream`, `video_codec_unsupported`, `video_corrupt`, `video_too_long`, `video_frame_too_large`,
    `video_frame_too_small` (422). An open file is left rewound.
    """
    size = _size_of(source)
    if size == 0:
        raise VideoError("the video is empty (0 bytes)", code="video_empty")
    if size is not None and size > limits.max_bytes:
        raise VideoError(
            f"the video is {_mib(size)}; the limit is {_mib(limits.max_bytes)} (MODTAG_MAX_VIDEO_BYTES)",
            code="video_too_large",
            http_status=413,
        )
    kind = container or _sniff_source(source)
    info = _probe_webp(source) if kind == "webp" else _probe_av(source, kind, limits)
    _rewind(source)
    _check_info(info, limits)
    return info


def sample_frames(
    source: Source, sampling: Sampling, limits: VideoLimits, *, container: str | None = None
) -> Iterator[Frame]:
    """The frames worth judging, in time order, as they are decoded (see the module's docstring for which).

    Raises VideoError (`video_corrupt`, `video_too_long`, `video_frame_too_large`...) when the stream breaks or
    turns out to exceed the limits part-way: a video that cannot be read to its end is not judged on its start.
    """
    kind = container or _sniff_source(source)
    info = probe(source, limits, container=kind)
    _rewind(source)
    chooser = _Chooser(sampling, info.duration_s)
    decoded = _decode_webp(source) if kind == "webp" else _decode_av(source, kind, sampling, limits)
    for index, (time_s, frame) in enumerate(decoded):
        if time_s > limits.max_seconds:
            raise _too_long(time_s, limits)
        if index > limits.max_seconds * _MAX_DECODE_FPS:
            raise VideoError(
                f"the video decodes more than {_MAX_DECODE_FPS} frames per second; it cannot be judged",
                code="video_corrupt",
            )
        kept = chooser.offer(index, time_s, frame)
        if kept is not None:
            yield kept


# --- choosing frames -------------------------------------------------------------------------------


class _Chooser:
    """Decides frame by frame: a sample point, a scene change, or neither; then whether it repeats the last kept."""

    def __init__(self, sampling: Sampling, duration_s: float) -> None:
        self.sampling = sampling
        most = max(1, sampling.max_frames)
        # A long video's interval is stretched so that `max_frames` samples still cover all of it.
        self.interval = max(1.0 / sampling.fps, duration_s / most) if sampling.fps > 0 else float("inf")
        self.duration_s = duration_s
        self.next_sample = 0.0
        self.kept = 0
        self.previous_grey: np.ndarray | None = None
        self.kept_grey: np.ndarray | None = None
        self.kept_pdq: str | None = None

    def offer(self, index: int, time_s: float, frame: _Decoded) -> Frame | None:
        grey = frame.grey()
        scene = _scene_score(self.previous_grey, grey)
        self.previous_grey = grey
        reason: Literal["first", "interval", "scene"] | None = None
        if self.kept_pdq is None:
            reason = "first"
        elif time_s >= self.next_sample:
            reason = "interval"
        elif (
            self.sampling.scene_threshold > 0
            and scene >= self.sampling.scene_threshold
            and self._room_for_scene(time_s)
        ):
            reason = "scene"
        if reason is None or self.kept >= self.sampling.max_frames:
            return None
        if reason != "scene":
            while self.next_sample <= time_s:
                self.next_sample += self.interval
        small = frame.rgb(_PDQ_SIDE)
        pdq, quality = pdq_hash(small)
        if self.kept_pdq is not None and self._repeats(pdq, grey):
            return None
        self.kept += 1
        self.kept_pdq, self.kept_grey = pdq, grey
        return Frame(
            index=index, time_s=round(time_s, 3), image=frame.rgb(None), pdq=pdq, pdq_quality=quality, reason=reason
        )

    def _repeats(self, pdq: str, grey: np.ndarray) -> bool:
        """Within `pdq_skip` bits of the last kept frame, and no scene change from it: a flat or dark frame's PDQ
        hash has little structure (hashes of unrelated flat frames collide), so the grey thumbnails must agree too."""
        assert self.kept_pdq is not None
        if pdq_distance(pdq, self.kept_pdq) > self.sampling.pdq_skip:
            return False
        threshold = self.sampling.scene_threshold or 0.15
        return _scene_score(self.kept_grey, grey) < threshold / 2

    def _room_for_scene(self, time_s: float) -> bool:
        """A scene frame may spend only what the interval samples still to come leave of `max_frames`."""
        if self.interval == float("inf"):
            return self.kept < self.sampling.max_frames
        remaining = max(0.0, self.duration_s - self.next_sample) / self.interval + 1
        return self.kept + remaining < self.sampling.max_frames


def _scene_score(before: np.ndarray | None, after: np.ndarray) -> float:
    """The mean absolute change of two grey thumbnails, 0 (the same) to 1 (black to white)."""
    if before is None or before.shape != after.shape:
        return 1.0 if before is not None else 0.0
    return float(np.abs(before.astype(np.int16) - after.astype(np.int16)).mean()) / 255.0


# --- decoding --------------------------------------------------------------------------------------


class _Decoded:
    """One decoded frame, converted only as far as asked: a grey thumbnail for every frame, RGB for candidates."""

    def __init__(self, frame: Any, rotation: int = 0) -> None:
        self._frame = frame
        self._rotation = rotation

    def grey(self) -> np.ndarray:
        if isinstance(self._frame, Image.Image):
            small = self._frame.convert("L").resize((_SCENE_SIDE, _SCENE_SIDE), Image.Resampling.BILINEAR)
            return np.asarray(small, dtype=np.uint8)
        plane = self._frame.reformat(width=_SCENE_SIDE, height=_SCENE_SIDE, format="gray")
        return np.asarray(plane.to_ndarray(), dtype=np.uint8).reshape(_SCENE_SIDE, _SCENE_SIDE)

    def rgb(self, side: int | None) -> Image.Image:
        if isinstance(self._frame, Image.Image):
            image = self._frame.convert("RGB")
            if side is not None and max(image.size) > side:
                image.thumbnail((side, side), Image.Resampling.BILINEAR)
            return image
        width, height = self._frame.width, self._frame.height
        if side is not None and max(width, height) > side:
            scale = side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = self._frame.reformat(width=width, height=height, format="rgb24").to_image()
        if self._rotation:
            # The display matrix turns counter-clockwise by `rotation` degrees; Pillow's rotate does the same.
            image = image.rotate(self._rotation, expand=True)
        return image


def _decode_av(source: Source, kind: str, sampling: Sampling, limits: VideoLimits) -> Iterator[tuple[float, _Decoded]]:
    import av

    with _open_av(source, kind) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        stream.thread_count = sampling.threads or min(4, os.cpu_count() or 1)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        ordinal = 0
        try:
            for frame in container.decode(stream):
                _check_frame_size(frame.width, frame.height, limits)
                time_s = frame.time - start if frame.time is not None else ordinal / rate
                ordinal += 1
                yield max(0.0, time_s), _Decoded(frame, int(getattr(frame, "rotation", 0) or 0))
        except av.error.FFmpegError as exc:
            raise _corrupt(exc) from None


def _decode_webp(source: Source) -> Iterator[tuple[float, _Decoded]]:
    handle = _binary(source)
    try:
        with Image.open(handle, formats=["WEBP"]) as image:
            time_s = 0.0
            for number in range(getattr(image, "n_frames", 1)):
                image.seek(number)
                image.load()
                yield time_s, _Decoded(image.copy())
                time_s += float(image.info.get("duration", 0) or 0) / 1000.0
    except VideoError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise _corrupt(exc) from None
    finally:
        if handle is not source:
            handle.close()


# --- probing ---------------------------------------------------------------------------------------


def _probe_av(source: Source, kind: str, limits: VideoLimits) -> VideoInfo:
    import av

    with _open_av(source, kind) as container:
        stream = _video_stream(container)
        codec = stream.codec_context.name
        if codec not in SUPPORTED_CODECS:
            raise VideoError(
                f"the video's codec is {codec}, which is not accepted; send {_ACCEPTED}", code="video_codec_unsupported"
            )
        _check_frame_size(stream.codec_context.width, stream.codec_context.height, limits)
        rate = stream.average_rate or stream.guessed_rate
        duration = _duration(container, stream)
        try:
            first = next(_first_frames(container, stream), None)
        except av.error.FFmpegError as exc:
            raise _corrupt(exc) from None
        if first is None:
            raise VideoError("the video has no frame that can be decoded", code="video_corrupt")
        _check_frame_size(first.width, first.height, limits)
        if duration is None:
            duration = _walk_duration(container, stream)
        return VideoInfo(
            container=kind,
            codec=codec,
            width=first.width,
            height=first.height,
            duration_s=round(duration, 3),
            frame_rate=float(rate) if rate else None,
            frame_count=stream.frames or None,
            animated=kind in ANIMATED_IMAGE_CONTAINERS,
            mime=_MIME[kind],
        )


def _probe_webp(source: Source) -> VideoInfo:
    """An animated WebP's size, frame count and duration from its RIFF chunks (VP8X, ANMF), nothing decoded."""
    handle = _binary(source)
    try:
        header = handle.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WEBP":
            raise VideoError("the WebP file's RIFF header cannot be read", code="video_corrupt")
        width = height = 0
        frames = 0
        duration_ms = 0
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                break
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            payload_start = handle.tell()
            if name == b"VP8X":
                body = handle.read(10)
                if len(body) < 10:
                    raise VideoError("the WebP file is truncated", code="video_corrupt")
                width = 1 + int.from_bytes(body[4:7], "little")
                height = 1 + int.from_bytes(body[7:10], "little")
            elif name == b"ANMF":
                body = handle.read(16)
                if len(body) < 16:
                    raise VideoError("the WebP file is truncated", code="video_corrupt")
                frames += 1
                duration_ms += int.from_bytes(body[12:15], "little")
            handle.seek(payload_start + length + (length & 1))
        if not frames or not width:
            raise VideoError("the WebP file is not animated", code="video_corrupt")
    finally:
        if handle is not source:
            handle.close()
    _rewind(source)
    return VideoInfo(
        container="webp",
        codec="webp",
        width=width,
        height=height,
        duration_s=round(duration_ms / 1000.0, 3),
        frame_rate=None,
        frame_count=frames,
        animated=True,
        mime=_MIME["webp"],
    )


def _check_info(info: VideoInfo, limits: VideoLimits) -> None:
    _check_frame_size(info.width, info.height, limits)
    if info.duration_s > limits.max_seconds:
        raise _too_long(info.duration_s, limits)


def _check_frame_size(width: int, height: int, limits: VideoLimits) -> None:
    if width <= 0 or height <= 0:
        return  # not known yet: the first decoded frame says
    if max(width, height) > limits.max_side:
        raise VideoError(
            f"the video's frames are {width}x{height}; no side may exceed {limits.max_side} pixels "
            "(MODTAG_MAX_VIDEO_SIDE)",
            code="video_frame_too_large",
        )
    if min(width, height) < limits.min_side:
        raise VideoError(
            f"the video's frames are {width}x{height}; each side must be at least {limits.min_side} pixels "
            "(MODTAG_MIN_IMAGE_SIDE)",
            code="video_frame_too_small",
        )


class _open_av:
    """`av.open` restricted to the demuxer the magic bytes named, with every FFmpeg error a `video_corrupt`."""

    def __init__(self, source: Source, kind: str) -> None:
        self.source = source
        self.kind = kind
        self.container: Any = None

    def __enter__(self) -> Any:
        import av

        demuxer = _DEMUXER.get(self.kind)
        if demuxer is None:
            raise VideoError(f"this is not a video file; send {_ACCEPTED}", code="video_unsupported", http_status=415)
        target = str(self.source) if isinstance(self.source, (str, Path)) else self.source
        try:
            self.container = av.open(target, mode="r", format=demuxer, metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            raise _corrupt(exc) from None
        return self.container

    def __exit__(self, *exc: object) -> None:
        if self.container is not None:
            self.container.close()


def _video_stream(container: Any) -> Any:
    import av

    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:  # cover art is not the video
            return stream
    raise VideoError("the file has no video stream (audio only, or no streams at all)", code="video_no_stream")


def _first_frames(container: Any, stream: Any) -> Iterator[Any]:
    for packets, packet in enumerate(container.demux(stream), start=1):
        if packets > _FIRST_FRAME_PACKETS:
            return
        yield from packet.decode()


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _walk_duration(container: Any, stream: Any) -> float:
    """The last packet's end when the header states no duration (a live-recorded WebM): packets read, none decoded."""
    container.seek(0)
    end = 0.0
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    return end


def _sniff_source(source: Source) -> str:
    handle = _binary(source)
    try:
        head = handle.read(64)
    finally:
        if handle is not source:
            handle.close()
    _rewind(source)
    kind = sniff_video(head)
    if kind is not None:
        return kind
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "apng"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    raise VideoError(f"this is not a video file; send {_ACCEPTED}", code="video_unsupported", http_status=415)


def _binary(source: Source) -> BinaryIO:
    if isinstance(source, (str, Path)):
        return open(source, "rb")  # closed by the caller's finally
    source.seek(0)
    return source


def _rewind(source: Source) -> None:
    if not isinstance(source, (str, Path)):
        source.seek(0)


def _size_of(source: Source) -> int | None:
    if isinstance(source, (str, Path)):
        return Path(source).stat().st_size
    try:
        position = source.tell()
        end = source.seek(0, io.SEEK_END)
        source.seek(position)
        return end
    except (OSError, ValueError):
        return None


def _too_long(seconds: float, limits: VideoLimits) -> VideoError:
    return VideoError(
        f"the video is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s (MODTAG_MAX_VIDEO_SECONDS)",
        code="video_too_long",
    )


def _corrupt(exc: Exception) -> VideoError:
    detail = str(exc) or exc.__class__.__name__
    return VideoError(f"the video cannot be decoded (corrupt or truncated): {detail[:200]}", code="video_corrupt")


def _mib(count: int) -> str:
    return f"{count / (1024 * 1024):.1f} MiB ({count} bytes)"


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}

"""Generated video clips: shots of still pictures (some panning) encoded with PyAV, for the video bench and tests.

A clip is a list of `Shot`s, each a picture held for some seconds, still or panning across it. Cuts between shots
are scene changes; a still shot is what a sampler should pay for once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import cast

from PIL import Image

# The container each codec is written in by default, and the encoder PyAV uses for it.
_ENCODERS = {"h264": ("mp4", "libx264"), "vp9": ("webm", "libvpx-vp9"), "mpeg4": ("mov", "mpeg4")}


@dataclass(frozen=True)
class Shot:
    """`picture` shown for `seconds`; `pan` > 0 moves the view across it by that share of the way per second."""

    seconds: float
    picture: Image.Image
    pan: float = 0.0


def write_clip(
    path: Path,
    shots: Sequence[Shot],
    *,
    size: tuple[int, int] = (160, 120),
    fps: int = 10,
    codec: str = "h264",
    container: str | None = None,
) -> Path:
    """Encode `shots` at `size` and `fps` into `path` (MP4 with H.264 unless said otherwise); returns `path`.

    `codec` is h264, vp9 or mpeg4, or any encoder PyAV knows (then give `container`).
    """
    import av

    fmt, encoder = _ENCODERS.get(codec, (container or "mp4", codec))
    with av.open(str(path), mode="w", format=container or fmt) as output:
        stream = cast("av.VideoStream", output.add_stream(encoder, rate=fps))
        stream.width, stream.height = size
        stream.pix_fmt = "rgb24" if encoder in ("png", "qtrle", "rawvideo") else "yuv420p"
        stream.time_base = Fraction(1, fps)
        if encoder == "libx264":
            stream.options = {"preset": "ultrafast"}
        number = 0
        for shot in shots:
            still = None if shot.pan else av.VideoFrame.from_image(shot.picture.convert("RGB").resize(size))
            strip = _strip(shot.picture, size) if shot.pan else None
            for step in range(round(shot.seconds * fps)):
                frame = still or av.VideoFrame.from_image(_window(strip, size, shot.pan * step / fps))
                frame.pts = number
                number += 1
                for packet in stream.encode(frame):
                    output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def _strip(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`picture` scaled to the clip's height and at least half as wide again as the clip: what a pan moves over."""
    width, height = size
    scaled_width = max(round(width * 1.5), round(picture.width * height / picture.height))
    return picture.convert("RGB").resize((scaled_width, height))


def _window(strip: Image.Image | None, size: tuple[int, int], offset: float) -> Image.Image:
    """The part of `strip` in view at `offset` (a share of the way across it; cropped, never rescaled per frame)."""
    assert strip is not None
    travel = strip.width - size[0]
    left = round(travel * (offset % 1.0))
    return strip.crop((left, 0, left + size[0], size[1]))

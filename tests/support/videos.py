"""Small video clips and animated images made on the spot (PyAV, Pillow), good and broken, for intake and frame tests.

Each helper writes a file under the directory it is given and returns its path. The clips are tiny (160x120,
10 fps) so that encoding and decoding them costs milliseconds. `shots_clip` shows the scikit-image photos one after
another: its cuts are scene changes, its still shots should cost one frame each.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from modtag.clips import Shot, write_clip
from tests.support.photos import photo_image

__all__ = [
    "Shot",
    "animated_image",
    "audio_only",
    "corrupt_clip",
    "huge_frames_clip",
    "shots_clip",
    "static_clip",
    "truncated_clip",
    "unsupported_codec_clip",
    "write_clip",
]


def shots_clip(directory: Path, names: Sequence[str], seconds: float = 2.0, **options: object) -> Path:
    """The photos `names` shown one after another, each still for `seconds`: len(names) - 1 cuts."""
    shots = [Shot(seconds, photo_image(name)) for name in names]
    suffix = ".webm" if options.get("codec") == "vp9" else ".mov" if options.get("codec") == "mpeg4" else ".mp4"
    return write_clip(directory / f"shots-{'-'.join(names)}{suffix}", shots, **options)  # type: ignore[arg-type]


def static_clip(directory: Path, seconds: float = 10.0, name: str = "coffee", **options: object) -> Path:
    """One photo held still for `seconds`: a sampler should keep about one frame of it."""
    return write_clip(directory / f"static-{name}.mp4", [Shot(seconds, photo_image(name))], **options)  # type: ignore[arg-type]


def truncated_clip(directory: Path, keep: float = 0.5) -> Path:
    """A valid MP4 cut after `keep` of its bytes (an interrupted upload)."""
    whole = shots_clip(directory, ["astronaut", "coffee"]).read_bytes()
    path = directory / "truncated.mp4"
    path.write_bytes(whole[: int(len(whole) * keep)])
    return path


def corrupt_clip(directory: Path) -> Path:
    """An MP4 header (ftyp) followed by noise: it sniffs as a video and decodes as nothing."""
    import random

    noise = random.Random(19).randbytes(64 * 1024)
    path = directory / "corrupt.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + noise)
    return path


def huge_frames_clip(directory: Path, side: int = 4104) -> Path:
    """A short clip whose frames are `side` pixels wide (over the default MODTAG_MAX_VIDEO_SIDE of 4096)."""
    return write_clip(directory / "huge.mp4", [Shot(0.2, photo_image("rocket"))], size=(side, 64), fps=5)


def unsupported_codec_clip(directory: Path) -> Path:
    """A QuickTime file whose video is PNG-coded frames: a container modtag reads, a codec it refuses."""
    return write_clip(
        directory / "png-frames.mov", [Shot(0.5, photo_image("chelsea"))], codec="png", container="mov", fps=4
    )


def audio_only(directory: Path, seconds: float = 1.0) -> Path:
    """An MP4 with a sine tone and no video stream."""
    import av
    import numpy as np

    path = directory / "audio.mp4"
    rate = 8000
    with av.open(str(path), mode="w", format="mp4") as output:
        stream = output.add_stream("aac", rate=rate)
        samples = np.sin(np.arange(int(rate * seconds)) / 10).astype(np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def animated_image(
    directory: Path,
    fmt: str = "GIF",
    names: Sequence[str] = ("astronaut", "chelsea", "coffee", "rocket"),
    frame_ms: int = 500,
    size: tuple[int, int] = (96, 72),
) -> Path:
    """An animated GIF, WebP or APNG ("PNG") of the photos `names`, `frame_ms` each."""
    frames = [photo_image(name, size) for name in names]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    path = directory / f"animated.{fmt.lower()}"
    path.write_bytes(buffer.getvalue())
    return path


def still_frames(path: Path) -> list[Image.Image]:
    """Every frame of an animated image, decoded by Pillow (what a test compares the sampler's frames with)."""
    from PIL import ImageSequence

    with Image.open(path) as image:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]

"""The one place that opens images: a cheap header check for the API and a safe full decode for the worker.

Both start the same way: byte limits, magic bytes against an allow-list, then Pillow's lazy `open`
(header only) restricted to the detected format, then our own pixel and side limits. Only
`decode_image` goes on to decode pixels, and only after those limits passed, so a small file that
declares a gigantic canvas (a decompression bomb) is refused before any memory is spent on it.

Pillow's global switches are left alone: `MAX_IMAGE_PIXELS` stays as Pillow ships it (an extra
backstop; our limit is the one users see) and `LOAD_TRUNCATED_IMAGES` stays off, so a truncated
file is an error rather than an image padded with grey.

HTTP statuses on the errors: 413 only for bytes over the upload limit (the request body itself is
too large, which a client or proxy can check before sending); 415 for data that is not an accepted
image; 422 for an accepted format whose content is unusable: empty, truncated, corrupt, a side out
of range, or too many pixels. A decompression bomb is a small body declaring a huge canvas, so it
is 422 like `image_dimensions`, not 413.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.errors import ImageError

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_MIME = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_BMP_INFO_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be: bytes on the wire, decoded pixels, and the length of each side."""

    max_bytes: int
    max_pixels: int
    max_side: int
    min_side: int

    @classmethod
    def from_settings(cls, s: Settings) -> ImageLimits:
        return cls(
            max_bytes=s.max_upload_bytes,
            max_pixels=s.max_image_pixels,
            max_side=s.max_image_side,
            min_side=s.min_image_side,
        )


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding pixels.

    `frames` is the frame count when the header states it (APNG, WebP, a camera JPEG's MPO index)
    or the format has one image (BMP); None for an animated GIF or a multi-page TIFF, whose count
    needs a walk through the whole file that the API should not pay for. Only the first frame is
    ever decoded.
    """

    format: str
    width: int
    height: int
    frames: int | None
    mime: str


def sniff_image(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Check an image cheaply (size, magic bytes, header dimensions) without decoding its pixels.

    Raises ImageError with one of the codes `image_empty`, `image_too_large`, `image_unsupported`,
    `image_too_many_pixels`, `image_dimensions`, `image_truncated`, `image_corrupt`.
    """
    with _open_checked(data, limits) as (_, header):
        return header


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode an image safely into a fully loaded RGB image that no longer refers to `data`.

    Everything `sniff_image` checks, then: the first frame only, EXIF orientation applied,
    transparency composited onto white, every colour mode (palette, grey, 16-bit, float, CMYK,
    YCbCr...) brought to 8-bit RGB. Raises ImageError (never another exception) for bad input.
    """
    with _open_checked(data, limits) as (image, header):
        try:
            image.load()
            upright = _apply_orientation(image)
            return _to_rgb(upright)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(exc, limits) from None
        except MemoryError:
            # Not the input's fault once our pixel limit passed: let the worker treat it as transient.
            raise
        except Exception as exc:
            # Decoders raise anything on hostile bytes (OSError, SyntaxError, ValueError, struct.error...).
            raise _decode_error(exc, header) from None


# --- helpers ---------------------------------------------------------------------------------------


@contextmanager
def _open_checked(data: bytes, limits: ImageLimits) -> Iterator[tuple[ImageFile.ImageFile, ImageHeader]]:
    """Open the header with every cheap check done; the image is closed when the block ends."""
    if not data:
        raise ImageError("the image is empty (0 bytes)", code="image_empty", http_status=422)
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"image is {_human_bytes(len(data))}; the limit is {_human_bytes(limits.max_bytes)} "
            "(MODTAG_MAX_UPLOAD_BYTES)",
            code="image_too_large",
            http_status=413,
        )
    claimed = _format_from_magic(data)
    try:
        # `formats` keeps Pillow to the one plugin the magic bytes named: no guessing among the
        # dozens of formats Pillow knows (ICO, PCX, EPS...), which widens the attack surface.
        image = Image.open(io.BytesIO(data), formats=[claimed])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, limits) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"the data starts like a {claimed} file but its header cannot be read",
            code="image_corrupt",
            http_status=422,
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise _decode_error(exc, None, claimed) from None
    with image:
        header = _check_header(image, claimed, limits)
        yield image, header


def _check_header(image: ImageFile.ImageFile, claimed: str, limits: ImageLimits) -> ImageHeader:
    # Camera JPEGs with a second picture embedded (MPO) are JPEGs to everyone but Pillow.
    found = "JPEG" if image.format == "MPO" else (image.format or claimed)
    if found not in SUPPORTED_FORMATS:
        raise ImageError(f"{found} images are not supported; send {_ACCEPTED}", code="image_unsupported")
    width, height = image.size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {pixels / 1e6:.1f} megapixels; the limit is "
            f"{limits.max_pixels / 1e6:.1f} megapixels (MODTAG_MAX_IMAGE_PIXELS)",
            code="image_too_many_pixels",
            http_status=422,
        )
    if max(width, height) > limits.max_side:
        raise ImageError(
            f"image is {width}x{height}; no side may exceed {limits.max_side} pixels (MODTAG_MAX_IMAGE_SIDE)",
            code="image_dimensions",
            http_status=422,
        )
    if min(width, height) < limits.min_side:
        raise ImageError(
            f"image is {width}x{height}; each side must be at least {limits.min_side} pixels (MODTAG_MIN_IMAGE_SIDE)",
            code="image_dimensions",
            http_status=422,
        )
    return ImageHeader(format=found, width=width, height=height, frames=_frame_count(image, found), mime=_MIME[found])


def _frame_count(image: ImageFile.ImageFile, fmt: str) -> int | None:
    try:
        if fmt in ("PNG", "WEBP", "JPEG"):
            # From the APNG acTL chunk, the WebP container or a camera JPEG's MPO index: no walk.
            return int(getattr(image, "n_frames", 1))
        if fmt in ("GIF", "TIFF"):
            # `n_frames` would seek through every frame; `is_animated` only looks for a second one.
            return None if getattr(image, "is_animated", False) else 1
    except MemoryError:
        raise
    except Exception:
        # A broken second frame does not matter: only the first one is ever decoded.
        return None
    return 1


def _format_from_magic(data: bytes) -> str:
    """The allowed format the first bytes announce, or ImageError(image_unsupported) naming what it is."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    # BMP headers start with "BM" and a file size; the info header size sits at offset 14.
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    ):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    what = _name_unsupported(data)
    if what:
        message = f"the data looks like {what}, which is not a supported image; send {_ACCEPTED}"
    else:
        message = f"the data is not a supported image (first bytes {head[:8].hex(' ')}); send {_ACCEPTED}"
    raise ImageError(message, code="image_unsupported", http_status=415)


_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"\x00\x00\x02\x00", "a CUR cursor"),
    (b"%PDF", "a PDF document"),
    (b"8BPS", "a Photoshop (PSD) file"),
    (b"icns", "an Apple icon (ICNS)"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "gzip-compressed data"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
_SVG = re.compile(rb"<svg[\s>]", re.IGNORECASE)
_HTML = re.compile(rb"<(!doctype\s+html|html[\s>]|head[\s>]|body[\s>])", re.IGNORECASE)


def _name_unsupported(data: bytes) -> str | None:
    """A name for well-known things that are not accepted, so the message tells the user what they sent."""
    head = data[:32]
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "a HEIF/AVIF image" if head[8:12] in _HEIF_BRANDS else "an ISO media (MP4/MOV) file"
    if head[:1] == b"\x0a" and head[1:2] in (b"\x00", b"\x02", b"\x03", b"\x04", b"\x05") and head[2:3] == b"\x01":
        return "a PCX image"
    text = data[:1024]
    if _SVG.search(text):
        return "an SVG drawing"
    if _HTML.search(text):
        return "an HTML page"
    sample = _utf8_prefix(text)
    if sample and all(ch.isprintable() or ch in "\r\n\t" for ch in sample.lstrip("\ufeff")):
        return "text"
    return None


def _utf8_prefix(chunk: bytes) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the end of the sample is still text.
        return chunk[: exc.start].decode("utf-8") if exc.start >= len(chunk) - 3 else ""


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip in place as the EXIF orientation says; a broken EXIF block leaves the image as stored."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except MemoryError:
        raise
    except Exception as exc:
        # Orientation is metadata: refusing a readable photo over a malformed EXIF block helps nobody.
        log.warning("ignoring unreadable EXIF orientation: %s", exc)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency lands on white, 16-bit and float data are rescaled."""
    mode = image.mode
    if mode.startswith("I;16"):
        return _rescaled_to_rgb(image, scale=1 / 257, offset=0.0)
    if mode in ("I", "F"):
        scale, offset = _range_mapping(image)
        return _rescaled_to_rgb(image, scale=scale, offset=offset)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # P, 1, L, CMYK, YCbCr, LAB, HSV, RGBX; for RGB this is a copy, detached from the file.
    return image.convert("RGB")


def _range_mapping(image: Image.Image) -> tuple[float, float]:
    """scale, offset taking a 32-bit int or float image onto 0..255.

    Values already inside a conventional range keep their meaning (0..65535 is 16-bit data, 0..1 is
    a normalised float), so a dark image stays dark; anything else is stretched from its min to max.
    """
    extrema = image.getextrema()
    low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]  # one band: two numbers
    if image.mode == "I" and low >= 0 and high <= 65535:
        return 1 / 257, 0.0
    if image.mode == "F" and low >= 0 and high <= 1:
        return 255.0, 0.0
    if high > low:
        return 255 / (high - low), -low * 255 / (high - low)
    return 0.0, min(max(low, 0.0), 255.0)


def _rescaled_to_rgb(image: Image.Image, *, scale: float, offset: float) -> Image.Image:
    # Through float so nothing is clipped before scaling (Pillow's I;16 -> L clips at 255);
    # +0.5 because F -> L truncates.
    floats = image.convert("F")
    grey = floats.point(lambda v: v * scale + offset + 0.5).convert("L")
    return grey.convert("RGB")


def _bomb_error(exc: Exception, limits: ImageLimits) -> ImageError:
    """Pillow's own decompression-bomb guard fired (its limit is a backstop above ours)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    declared = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "more pixels than allowed"
    return ImageError(
        f"image declares {declared}; the limit is {limits.max_pixels / 1e6:.1f} megapixels "
        "(MODTAG_MAX_IMAGE_PIXELS); this looks like a decompression bomb",
        code="image_too_many_pixels",
        http_status=422,
    )


def _decode_error(exc: Exception, header: ImageHeader | None, claimed: str | None = None) -> ImageError:
    fmt = header.format if header else claimed
    detail = str(exc) or exc.__class__.__name__
    if isinstance(exc, EOFError) or "truncated" in detail.lower():
        return ImageError(
            f"the {fmt} image is truncated (the file ends before the image data does): {detail}",
            code="image_truncated",
            http_status=422,
        )
    return ImageError(f"the {fmt} image cannot be decoded: {detail}", code="image_corrupt", http_status=422)


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB ({count} bytes)"
    return f"{count / (1024 * 1024):.1f} MiB ({count} bytes)"

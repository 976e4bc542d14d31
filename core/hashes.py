"""Image fingerprints: SHA-256 of the bytes (exact copies) and Meta's PDQ perceptual hash (near copies).

PDQ comes from the `pdqhash` bindings of the reference implementation. A hash is 256 bits, written as
64 hex digits in the reference's order (the same text ThreatExchange and HMA exchange), so a bank
imported from another system matches here. Its quality (0-100) says how much structure the image
had: below PDQ_MIN_QUALITY (flat or nearly blank images) hashes of unrelated images collide, so such
a hash never matches by PDQ (SHA-256 still matches exactly).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.errors import InvalidField

PDQ_BITS = 256
PDQ_MIN_QUALITY = 50  # the reference implementation's own threshold for a hash worth matching
DEFAULT_MAX_DISTANCE = 31  # the Hamming distance HMA and the PDQ paper use for a match
# PDQ works on a 64x64 luminance grid: hashing a 512 px copy gives the same bits far faster than 4000 px.
_HASH_SIDE = 512
_HEX_256_BITS = re.compile(r"^[0-9a-f]{64}$")  # a PDQ hash and a SHA-256 digest alike


@dataclass(frozen=True)
class ImageHashes:
    """What a job's image is known by: its bytes' SHA-256 and its PDQ hash with that hash's quality."""

    sha256: str
    pdq: str
    pdq_quality: int

    @property
    def pdq_matchable(self) -> bool:
        return self.pdq_quality >= PDQ_MIN_QUALITY


def image_hashes(data: bytes, image: Image.Image) -> ImageHashes:
    """Both hashes of one image: `data` its bytes as received, `image` those bytes decoded (core.images)."""
    pdq, quality = pdq_hash(image)
    return ImageHashes(sha256=hashlib.sha256(data).hexdigest(), pdq=pdq, pdq_quality=quality)


def pdq_hash(image: Image.Image) -> tuple[str, int]:
    """The PDQ hash (64 hex digits) and its quality of a decoded image."""
    import pdqhash

    rgb = image.convert("RGB")
    if max(rgb.size) > _HASH_SIDE:
        rgb = rgb.copy()
        rgb.thumbnail((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BILINEAR)
    bits, quality = pdqhash.compute(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)))
    # The bindings return bit 255 first: packed as they come, the bytes read as the reference's hex text.
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex(), int(quality)


def pdq_distance(a: str, b: str) -> int:
    """The Hamming distance between two PDQ hashes in hex."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def parse_pdq(text: str) -> str:
    """A PDQ hash as 64 lower-case hex digits; InvalidField (422) `pdq_invalid` otherwise."""
    value = text.strip().lower()
    if not _HEX_256_BITS.match(value):
        raise InvalidField("a PDQ hash is 64 hex digits (256 bits)", code="pdq_invalid")
    return value


def parse_sha256(text: str) -> str:
    """A SHA-256 digest as 64 lower-case hex digits; InvalidField (422) `sha256_invalid` otherwise."""
    value = text.strip().lower()
    if not _HEX_256_BITS.match(value):
        raise InvalidField("a SHA-256 digest is 64 hex digits", code="sha256_invalid")
    return value


@dataclass(frozen=True)
class BankMatch:
    """The closest item of one bank to an image: exact by SHA-256 (distance 0), else by PDQ, else none.

    `item` is None when nothing in the bank is within the distance asked for. `kind` is the bank's (`block` or
    `allow`); `allowed_by` names the allow-list item ("bank/item") that matched the same image and so suppresses
    this block bank's match.
    """

    bank: str
    item: str | None = None
    distance: int | None = None
    by: str | None = None  # "sha256" or "pdq"
    kind: str = "block"
    allowed_by: str | None = None

"""Real public-domain photos from scikit-image (astronaut, chelsea, coffee, rocket...), encoded or decoded."""

from __future__ import annotations

import io

import pytest
from PIL import Image

NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def photo_image(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """The photo `name` as an RGB image, resized to `size` when given."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return image.resize(size) if size else image


def photo_bytes(name: str, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    """The photo `name` encoded as `fmt` (what an upload carries)."""
    buffer = io.BytesIO()
    photo_image(name, size).save(buffer, format=fmt)
    return buffer.getvalue()


def near_copy(name: str, scale: float = 0.9, quality: int = 70) -> bytes:
    """The photo as someone re-uploading it would: resized (to 90 %) and re-encoded as JPEG (at quality 70)."""
    image = photo_image(name)
    image = image.resize((int(image.width * scale), int(image.height * scale)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def product_photo(background: tuple[int, int, int] = (255, 255, 255), text: str | None = None) -> bytes:
    """A listing photo as a JPEG: the coffee cup cut from its photo onto a plain `background`, with `text`
    written under it in Pillow's bundled font when given (what a seller's contact details look like)."""
    from PIL import ImageDraw, ImageFont

    canvas = Image.new("RGB", (640, 480), background)
    cup = photo_image("coffee").crop((170, 40, 470, 300))  # the cup and saucer
    canvas.paste(cup, (170, 40))
    if text is not None:
        ImageDraw.Draw(canvas).text((60, 380), text, fill=(0, 0, 0), font=ImageFont.load_default(size=36))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="session", name="photos")
def encoded_photos() -> dict[str, bytes]:
    """The integration layer's `photos`: the four photos as JPEG files, what an upload carries."""
    return {name: photo_bytes(name) for name in NAMES}


@pytest.fixture(scope="session", name="photos")
def decoded_photos() -> dict[str, Image.Image]:
    """The unit layer's `photos`: the four photos decoded, what the engine takes."""
    return {name: photo_image(name) for name in NAMES}

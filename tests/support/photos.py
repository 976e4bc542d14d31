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


@pytest.fixture(scope="session", name="photos")
def encoded_photos() -> dict[str, bytes]:
    """The integration layer's `photos`: the four photos as JPEG files, what an upload carries."""
    return {name: photo_bytes(name) for name in NAMES}


@pytest.fixture(scope="session", name="photos")
def decoded_photos() -> dict[str, Image.Image]:
    """The unit layer's `photos`: the four photos decoded, what the engine takes."""
    return {name: photo_image(name) for name in NAMES}

"""Pixel measurements of a decoded image with numpy and Pillow: white background, sharpness, product fill, size.

Every measure but the size is taken on a working copy whose longest side is WORKING_SIDE pixels, so a
measure means the same thing for a 12-megapixel upload and for its thumbnail, and costs the same:

- `white_background`: the share of the border (the outer BORDER_SHARE of each side) whose pixels are
  near-white: every channel >= WHITE_LEVEL and the channels within WHITE_SPREAD of each other (a pale
  colour is not white). Transparent pixels count as white (an RGBA cut-out is shown on white).
- `sharpness`: the variance v of the 3x3 Laplacian of the grey image (0..255) at the working size,
  mapped to [0, 1] by v / (v + SHARPNESS_HALF): a saturating curve that is 0.5 at v = SHARPNESS_HALF,
  so a blurred photo (few edges, small v) lands clearly below the same photo in focus.
- `product_fill`: the share of the frame covered by the bounding box of the pixels that differ from
  the background colour (the median of the border) by more than OBJECT_DIFFERENCE in some channel;
  rows and columns with fewer than OBJECT_LINE_SHARE of such pixels are ignored, so sensor noise and
  JPEG ringing do not stretch the box to the edges.
- `min_side`: the shorter side of the original image, in pixels.

`width` and `height` (of the original, in pixels) are always returned, whatever is asked.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

MEASURES: frozenset[str] = frozenset({"white_background", "sharpness", "product_fill", "min_side", "width", "height"})

WORKING_SIDE = 512
BORDER_SHARE = 0.03
WHITE_LEVEL = 235
WHITE_SPREAD = 20
SHARPNESS_HALF = 100.0
OBJECT_DIFFERENCE = 30
OBJECT_LINE_SHARE = 0.01


def measure(image: Image.Image, names: Iterable[str]) -> dict[str, float]:
    """The measures `names` of `image` (ValueError for an unknown name), with `width` and `height` always included."""
    wanted = set(names)
    unknown = sorted(wanted - MEASURES)
    if unknown:
        raise ValueError(f"unknown pixel measure {unknown[0]!r}; known: {', '.join(sorted(MEASURES))}")
    width, height = image.size
    values: dict[str, float] = {"width": float(width), "height": float(height)}
    if "min_side" in wanted:
        values["min_side"] = float(min(width, height))
    if wanted & {"white_background", "sharpness", "product_fill"}:
        rgb = _working_rgb(image)
        if "white_background" in wanted:
            values["white_background"] = white_background(rgb)
        if "sharpness" in wanted:
            values["sharpness"] = sharpness(rgb)
        if "product_fill" in wanted:
            values["product_fill"] = product_fill(rgb)
    return values


def white_background(rgb: np.ndarray) -> float:
    """The share of the border's pixels that are near-white (an H x W x 3 uint8 array)."""
    border = _border(rgb)
    low, high = border.min(axis=1), border.max(axis=1)
    white = (low >= WHITE_LEVEL) & (high.astype(np.int16) - low <= WHITE_SPREAD)
    return round(float(white.mean()), 6)


def sharpness(rgb: np.ndarray) -> float:
    """v / (v + SHARPNESS_HALF) for v the variance of the grey image's 3x3 Laplacian."""
    grey = _grey(rgb)
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0  # no interior pixel: nothing to call sharp
    centre = grey[1:-1, 1:-1]
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * centre
    variance = float(laplacian.var())
    return round(variance / (variance + SHARPNESS_HALF), 6)


def product_fill(rgb: np.ndarray) -> float:
    """The share of the frame covered by the bounding box of what differs from the border's median colour."""
    height, width = rgb.shape[:2]
    background = np.median(_border(rgb), axis=0)
    different = (np.abs(rgb.astype(np.int16) - background.astype(np.int16)) > OBJECT_DIFFERENCE).any(axis=2)
    rows = np.flatnonzero(different.sum(axis=1) >= max(1.0, OBJECT_LINE_SHARE * width))
    cols = np.flatnonzero(different.sum(axis=0) >= max(1.0, OBJECT_LINE_SHARE * height))
    if rows.size == 0 or cols.size == 0:
        return 0.0
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return round(float(box) / (width * height), 6)


def _working_rgb(image: Image.Image) -> np.ndarray:
    """The image as H x W x 3 uint8, longest side WORKING_SIDE (scaled down or up), transparency on white."""
    image.load()
    scale = WORKING_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        image = flat
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = _to_8_bit(image)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0 if scale < 1 else None)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or float grey image stretched onto 0..255 (Pillow's own conversion clips it instead)."""
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    spread = high - low if high > low else 1.0
    return Image.fromarray(np.round((values - low) * (255.0 / spread)).astype(np.uint8), "L")


def _border(rgb: np.ndarray) -> np.ndarray:
    """The pixels of the outer frame (BORDER_SHARE of each side, at least 1 pixel) as an N x 3 array."""
    height, width = rgb.shape[:2]
    band_y = min(height, max(1, round(BORDER_SHARE * height)))
    band_x = min(width, max(1, round(BORDER_SHARE * width)))
    frame = np.zeros((height, width), dtype=bool)
    frame[:band_y, :] = frame[-band_y:, :] = True
    frame[:, :band_x] = frame[:, -band_x:] = True
    return rgb[frame]


def _grey(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, as Pillow's "L" conversion computes it.
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)

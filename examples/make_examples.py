"""Regenerate the example photos from scikit-image's bundled public-domain / CC0 data (see ATTRIBUTION.md).

Run `python examples/make_examples.py`. The output is byte-for-byte stable for a given Pillow and
scikit-image; another libjpeg may encode the same pixels to slightly different bytes.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from skimage import data

# file name -> skimage.data function; the photos and their provenance are listed in ATTRIBUTION.md.
PHOTOS = {
    "astronaut.jpg": "astronaut",
    "chelsea.jpg": "chelsea",
    "coffee.jpg": "coffee",
    "rocket.jpg": "rocket",
    "hubble_deep_field.jpg": "hubble_deep_field",
}
MAX_SIDE = 512
QUALITY = 85


def main(out_dir: Path = Path(__file__).resolve().parent) -> list[Path]:
    written = []
    for file_name, function in PHOTOS.items():
        image = Image.fromarray(getattr(data, function)()).convert("RGB")
        scale = MAX_SIDE / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        path = out_dir / file_name
        image.save(path, format="JPEG", quality=QUALITY, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in main():
        print(f"{path.name}: {path.stat().st_size} bytes")

"""Pixel measurements on real photos (scikit-image): white background, sharpness, product fill, sizes, odd inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from policies.checks.photo import PIXEL_MEASURES
from tests.support.photos import photo_image, product_photo
from worker.families.pixels.measures import MEASURES, measure

ASKED = ("white_background", "sharpness", "product_fill", "min_side")


def product(background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    return Image.open(io.BytesIO(product_photo(background=background))).convert("RGB")


def test_the_measures_are_the_photo_checks_minus_text_area_plus_the_size() -> None:
    assert frozenset(PIXEL_MEASURES) | {"width", "height"} == MEASURES


def test_a_product_on_white_and_on_a_colour() -> None:
    on_white = measure(product(), ASKED)
    on_blue = measure(product((40, 90, 200)), ASKED)
    assert on_white["white_background"] == 1.0 and on_blue["white_background"] == 0.0
    # The cup and saucer (300 x 260 of 640 x 480 = 0.254) fill the same share of either frame.
    assert on_white["product_fill"] == pytest.approx(0.254, abs=0.02)
    assert on_blue["product_fill"] == pytest.approx(0.254, abs=0.02)
    assert (on_white["width"], on_white["height"], on_white["min_side"]) == (640.0, 480.0, 480.0)


def test_a_photo_without_a_plain_background() -> None:
    astronaut = measure(photo_image("astronaut"), ASKED)
    assert astronaut["white_background"] < 0.05
    assert astronaut["product_fill"] > 0.9  # everything differs from the border's median: no object to frame


def test_sensor_noise_does_not_stretch_the_product_to_the_edges() -> None:
    clean = np.asarray(product(), dtype=np.int16)
    noise = np.random.default_rng(0).normal(0, 6, clean.shape).round().astype(np.int16)
    noisy = Image.fromarray(np.clip(clean + noise, 0, 255).astype(np.uint8))
    measured = measure(noisy, ASKED)
    assert measured["product_fill"] == pytest.approx(measure(product(), ASKED)["product_fill"], abs=0.02)
    assert measured["white_background"] > 0.95


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_a_gaussian_blur_lowers_sharpness_clearly(name: str) -> None:
    image = photo_image(name)
    sharp = measure(image, ["sharpness"])["sharpness"]
    blurred = measure(image.filter(ImageFilter.GaussianBlur(2)), ["sharpness"])["sharpness"]
    assert sharp > 0.5 and blurred < 0.2 and 0.0 <= blurred < sharp <= 1.0
    on_white = measure(product(), ["sharpness"])["sharpness"]
    assert on_white > 0.5 and measure(product().filter(ImageFilter.GaussianBlur(2)), ["sharpness"])["sharpness"] < 0.2


def test_width_and_height_come_whatever_is_asked() -> None:
    assert measure(product(), []) == {"width": 640.0, "height": 480.0}
    assert set(measure(product(), ["sharpness"])) == {"width", "height", "sharpness"}
    with pytest.raises(ValueError, match="unknown pixel measure 'text_area'"):
        measure(product(), ["text_area"])  # the policy computes it from the OCR boxes


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1), "white"),
        Image.new("RGB", (1, 300), "white"),
        Image.new("L", (40, 30), 128),
        Image.new("LA", (40, 30), (0, 0)),
        Image.new("RGBA", (40, 30), (0, 0, 0, 0)),
        Image.new("P", (40, 30)),
        Image.new("1", (40, 30)),
        Image.new("I;16", (40, 30), 40000),
        Image.new("F", (40, 30), 0.5),
        Image.new("CMYK", (40, 30)),
    ],
    ids=lambda image: f"{image.mode}-{image.width}x{image.height}",
)
def test_odd_images_are_measured_without_trouble(image: Image.Image) -> None:
    measured = measure(image, ASKED)
    assert (measured["width"], measured["height"]) == (float(image.width), float(image.height))
    assert all(0.0 <= measured[name] <= 1.0 for name in ("white_background", "sharpness", "product_fill"))


def test_transparency_counts_as_white_and_a_huge_image_is_measured_downscaled() -> None:
    cut_out = Image.new("RGBA", (400, 300), (0, 0, 0, 0))
    cut_out.paste(photo_image("coffee").crop((170, 40, 470, 300)), (50, 20))
    measured = measure(cut_out, ASKED)
    assert measured["white_background"] == 1.0 and 0.5 < measured["product_fill"] < 0.8
    huge = Image.new("RGB", (12_000, 9_000), "white")
    huge.paste(product().resize((6_000, 4_500)), (3_000, 2_250))
    measured = measure(huge, ASKED)
    assert (measured["width"], measured["min_side"]) == (12_000.0, 9_000.0)
    # The cup fills 0.254 of the product photo, which fills a quarter of the frame.
    assert measured["white_background"] == 1.0 and measured["product_fill"] == pytest.approx(0.064, abs=0.01)

"""core.images: the cheap header check and the safe decode, on real photos and hostile files built in memory."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from core.errors import ImageError
from core.images import SUPPORTED_FORMATS, ImageHeader, ImageLimits, decode_image, sniff_image
from core.settings import Settings

LIMITS = ImageLimits(max_bytes=4 * 1024 * 1024, max_pixels=4_000_000, max_side=4096, min_side=8)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    return image.resize(size) if size else image


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose IHDR declares width x height 1-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def expect_error(data: bytes, code: str, *, limits: ImageLimits = LIMITS, sniff: bool = True) -> ImageError:
    """Both entry points refuse the data with the same code (sniff only when it is a header problem)."""
    with pytest.raises(ImageError) as decoded:
        decode_image(data, limits)
    assert decoded.value.code == code, decoded.value
    if sniff:
        with pytest.raises(ImageError) as sniffed:
            sniff_image(data, limits)
        assert sniffed.value.code == code
    return decoded.value


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- real photos in every accepted format ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_real_photo_in_each_supported_format(fmt: str, mime: str) -> None:
    original = photo("astronaut")
    data = encode(original, fmt)

    header = sniff_image(data, LIMITS)
    image = decode_image(data, LIMITS)

    assert header == ImageHeader(format=fmt, width=512, height=512, frames=1, mime=mime)
    assert image.mode == "RGB" and image.size == (512, 512)
    if fmt != "GIF":  # GIF quantises to 256 colours; the others are lossless or close
        difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(original, dtype=np.int16))
        assert difference.mean() < 4
    assert set(SUPPORTED_FORMATS) >= {header.format}


def test_decoded_image_is_loaded_and_detached_from_the_bytes() -> None:
    image = decode_image(encode(photo("chelsea"), "PNG"), LIMITS)

    assert type(image) is Image.Image  # not an ImageFile holding a file pointer
    assert image.size == (451, 300)
    assert image.getpixel((200, 150)) == photo("chelsea").getpixel((200, 150))


def test_camera_jpeg_with_an_embedded_second_picture_is_a_jpeg() -> None:
    mpo = encode(photo("coffee", (64, 48)), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"

    header = sniff_image(mpo, LIMITS)

    assert (header.format, header.mime, header.frames) == ("JPEG", "image/jpeg", 2)
    assert decode_image(mpo, LIMITS).size == (64, 48)


def test_limits_from_settings() -> None:
    settings = Settings(max_upload_bytes=1234, max_image_pixels=5678, max_image_side=90, min_image_side=3)
    assert ImageLimits.from_settings(settings) == ImageLimits(max_bytes=1234, max_pixels=5678, max_side=90, min_side=3)


# --- not images, or not accepted ones ------------------------------------------------------------------


def test_empty_bytes() -> None:
    error = expect_error(b"", "image_empty")
    assert error.http_status == 422


def test_random_bytes_are_not_an_image() -> None:
    noise = random.Random(7).randbytes(5000)
    error = expect_error(noise, "image_unsupported")
    assert error.http_status == 415
    assert "JPEG, PNG, WebP, GIF, BMP or TIFF" in error.message


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"hello, this is a caption file\nwith two lines\n", "text"),
        ("Beschreibung: rote Tasse, gr\u00fc\u00dfe \u2603\n".encode() * 60, "text"),  # a character cut at 1024
        (b"BMW 320d, blue, 2019 - text that happens to start with BM\n", "text"),
        (b"<!DOCTYPE html><html><body><img src='x.jpg'></body></html>", "HTML page"),
        (b"\n  <html>\n<head><title>403 Forbidden</title></head></html>", "HTML page"),
        (
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
            "SVG",
        ),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", "HEIF/AVIF"),
    ],
)
def test_other_content_is_refused_and_named(data: bytes, named: str) -> None:
    error = expect_error(data, "image_unsupported")
    assert named in error.message
    assert error.http_status == 415


@pytest.mark.parametrize(("fmt", "named"), [("ICO", "ICO"), ("PCX", "PCX"), ("PPM", None), ("TGA", None)])
def test_formats_pillow_reads_but_the_allow_list_refuses(fmt: str, named: str | None) -> None:
    data = encode(photo("coffee", (64, 48)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow alone would have opened it

    error = expect_error(data, "image_unsupported")

    if named:
        assert named in error.message


# --- size, pixels, sides --------------------------------------------------------------------------------


def test_over_the_byte_limit() -> None:
    data = encode(photo("astronaut"), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1, max_pixels=LIMITS.max_pixels, max_side=4096, min_side=8)

    error = expect_error(data, "image_too_large", limits=limits)

    assert error.http_status == 413
    assert str(len(data)) in error.message and str(len(data) - 1) in error.message
    assert "MODTAG_MAX_UPLOAD_BYTES" in error.message
    assert sniff_image(data, LIMITS).width == 512  # the same bytes pass a larger limit


def test_decompression_bomb_declared_in_the_header_is_refused_before_decoding() -> None:
    bomb = png_declaring(100_000, 100_000)  # 10 gigapixels in about 70 bytes
    assert len(bomb) < 100

    error = expect_error(bomb, "image_too_many_pixels")

    assert "10000.0 megapixels" in error.message
    assert "4.0 megapixels" in error.message and "MODTAG_MAX_IMAGE_PIXELS" in error.message
    assert error.http_status == 422


def test_too_many_pixels_below_pillows_own_guard_names_the_dimensions() -> None:
    error = expect_error(png_declaring(3000, 3000), "image_too_many_pixels")
    assert error.message == (
        "image is 3000x3000 = 9.0 megapixels; the limit is 4.0 megapixels (MODTAG_MAX_IMAGE_PIXELS)"
    )


def test_a_real_compressed_bomb_is_refused_at_the_header() -> None:
    # 6000x6000 black 1-bit pixels compress to a few KB; decoded as RGB they would be 108 MB.
    bomb = encode(Image.new("1", (6000, 6000)), "PNG")
    assert len(bomb) < 20_000
    expect_error(bomb, "image_too_many_pixels")


def test_pillows_bomb_warning_is_an_error_when_warnings_are_errors() -> None:
    # 10000x9000 is above Pillow's warning threshold but within these generous limits.
    generous = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=200_000_000, max_side=20_000, min_side=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        error = expect_error(png_declaring(10_000, 9_000), "image_too_many_pixels", limits=generous)
    assert "90.0 megapixels" in error.message


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ((1, 100_000), "no side may exceed 4096 pixels (MODTAG_MAX_IMAGE_SIDE)"),
        ((5000, 20), "no side may exceed 4096 pixels"),
        ((1, 1), "each side must be at least 8 pixels (MODTAG_MIN_IMAGE_SIDE)"),
        ((640, 4), "image is 640x4"),
    ],
)
def test_side_limits(size: tuple[int, int], fragment: str) -> None:
    data = encode(Image.new("L", size, 128), "PNG")
    error = expect_error(data, "image_dimensions")
    assert fragment in error.message
    assert error.http_status == 422


# --- broken files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP"])
def test_truncated_file_passes_the_header_check_but_not_the_decode(fmt: str) -> None:
    data = encode(photo("chelsea"), fmt)
    truncated = data[: len(data) * 2 // 3]

    assert sniff_image(truncated, LIMITS).width == 451  # the header is intact: the API cannot know
    with pytest.raises(ImageError) as caught:
        decode_image(truncated, LIMITS)

    assert caught.value.code in ("image_truncated", "image_corrupt")
    if fmt in ("JPEG", "PNG"):
        assert caught.value.code == "image_truncated"
        assert "truncated" in caught.value.message


def test_truncated_webp_is_refused_already_at_the_header() -> None:
    # libwebp parses the whole container when the file is opened, so the API catches this one.
    data = encode(photo("chelsea"), "WEBP")
    expect_error(data[: len(data) * 2 // 3], "image_corrupt")


def test_file_cut_inside_the_header() -> None:
    data = encode(photo("chelsea"), "PNG")[:20]
    error = expect_error(data, "image_truncated")
    assert "PNG image is truncated" in error.message


def test_corrupt_png_checksum() -> None:
    data = bytearray(encode(photo("coffee", (64, 48)), "PNG"))
    data[40] ^= 0xFF  # inside the first IDAT chunk: its CRC no longer matches
    with pytest.raises(ImageError) as caught:
        decode_image(bytes(data), LIMITS)
    assert caught.value.code in ("image_corrupt", "image_truncated")


def test_random_mutations_only_ever_raise_image_error() -> None:
    rng = random.Random(20240611)
    seeds = [
        encode(photo("chelsea", (64, 48)), "JPEG", quality=80),
        encode(photo("coffee", (48, 64)), "PNG"),
        encode(photo("astronaut", (40, 40)), "GIF"),
    ]
    outcomes: dict[str, int] = {}
    for _ in range(200):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 12)):
            operation = rng.random()
            position = rng.randrange(len(data))
            if operation < 0.6:
                data[position] = rng.randrange(256)
            elif operation < 0.8:
                del data[position : position + rng.randint(1, 64)]
            else:
                data[position:position] = rng.randbytes(rng.randint(1, 32))
        if rng.random() < 0.2:
            del data[rng.randrange(len(data)) :]
        try:
            image = decode_image(bytes(data), LIMITS)
        except ImageError as exc:
            outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
        else:
            assert image.mode == "RGB"
            outcomes["decoded"] = outcomes.get("decoded", 0) + 1
    # The mutations exercised both paths, not just one kind of failure.
    assert outcomes.get("decoded", 0) > 10
    assert sum(count for code, count in outcomes.items() if code != "decoded") > 50


# --- colour modes ------------------------------------------------------------------------------------------


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (8, 0, 16, 16))  # right half blue, left half index 0 = transparent red
    return encode(image, "PNG", transparency=0)


def grey_with_alpha() -> bytes:
    image = Image.new("LA", (16, 16), (0, 255))
    image.paste((0, 0), (0, 0, 8, 16))  # left half fully transparent black
    return encode(image, "PNG")


def half_transparent_red() -> bytes:
    return encode(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG")


def palette_alpha_tiff() -> bytes:
    image = Image.new("PA", (16, 16), (1, 0))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste((1, 255), (8, 0, 16, 16))
    return encode(image, "TIFF")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)


def sixteen_bit(mode: str, fmt: str, value: int) -> bytes:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    pixels = np.full((16, 16), value, dtype=dtype)
    pixels[:, 8:] = 65535
    return encode(Image.frombytes(mode, (16, 16), pixels.tobytes()), fmt)


def int32_tiff() -> bytes:
    pixels = np.full((16, 16), 32896, dtype=np.int32)
    return encode(Image.fromarray(pixels, mode="I"), "TIFF")


def float_tiff(values: tuple[float, float]) -> bytes:
    pixels = np.full((16, 16), values[0], dtype=np.float32)
    pixels[:, 8:] = values[1]
    return encode(Image.fromarray(pixels, mode="F"), "TIFF")


def one_bit() -> bytes:
    image = Image.new("1", (16, 16), 0)
    image.paste(1, (8, 0, 16, 16))
    return encode(image, "PNG")


def ycbcr_tiff() -> bytes:
    return encode(Image.new("RGB", (16, 16), (200, 30, 30)).convert("YCbCr"), "TIFF")


def grey_with_colour_key() -> bytes:
    return encode(Image.new("L", (16, 16), 40), "PNG", transparency=40)


@pytest.mark.parametrize(
    ("build", "source_mode", "left", "right"),
    [
        pytest.param(palette_with_transparency, "P", (255, 255, 255), (0, 0, 255), id="P-transparency"),
        pytest.param(palette_alpha_tiff, "PA", (255, 255, 255), (0, 255, 0), id="PA"),
        pytest.param(grey_with_alpha, "LA", (255, 255, 255), (0, 0, 0), id="LA"),
        pytest.param(half_transparent_red, "RGBA", (255, 127, 127), (255, 127, 127), id="RGBA"),
        pytest.param(grey_with_colour_key, "L", (255, 255, 255), (255, 255, 255), id="L-colour-key"),
        pytest.param(cmyk_jpeg, "CMYK", (0, 255, 255), (0, 255, 255), id="CMYK-JPEG"),
        pytest.param(ycbcr_tiff, "YCbCr", (200, 30, 30), (200, 30, 30), id="YCbCr"),
        pytest.param(lambda: sixteen_bit("I;16", "PNG", 32896), "I;16", (128, 128, 128), (255, 255, 255), id="I16"),
        pytest.param(lambda: sixteen_bit("I;16B", "TIFF", 1028), "I;16B", (4, 4, 4), (255, 255, 255), id="I16B"),
        pytest.param(int32_tiff, "I", (128, 128, 128), (128, 128, 128), id="I32"),
        pytest.param(lambda: float_tiff((0.5, 1.0)), "F", (128, 128, 128), (255, 255, 255), id="F-unit"),
        pytest.param(lambda: float_tiff((-10.0, 30.0)), "F", (0, 0, 0), (255, 255, 255), id="F-stretched"),
        pytest.param(one_bit, "1", (0, 0, 0), (255, 255, 255), id="1-bit"),
    ],
)
def test_every_mode_becomes_rgb(
    build: Callable[[], bytes], source_mode: str, left: tuple[int, int, int], right: tuple[int, int, int]
) -> None:
    data = build()
    assert Image.open(io.BytesIO(data)).mode == source_mode  # the file really carries that mode

    image = decode_image(data, LIMITS)

    assert image.mode == "RGB" and image.size == (16, 16)
    assert close(image.getpixel((2, 8)), left, tolerance=3), image.getpixel((2, 8))  # type: ignore[arg-type]
    assert close(image.getpixel((13, 8)), right, tolerance=3), image.getpixel((13, 8))  # type: ignore[arg-type]


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    # Clipping (Pillow's plain I;16 -> L) would turn every value above 255 white.
    ramp = np.linspace(0, 65535, 64 * 16).astype("<u2").reshape(16, 64)
    data = encode(Image.frombytes("I;16", (64, 16), ramp.tobytes()), "PNG")

    grey = np.asarray(decode_image(data, LIMITS))[..., 0]

    assert grey[0, 0] == 0 and grey[-1, -1] == 255
    assert 100 < grey[8, 32] < 156
    assert np.all(np.diff(grey.reshape(-1).astype(int)) >= 0)  # monotonic: no wrap-around either


# --- orientation and animation -------------------------------------------------------------------------------


def test_exif_orientation_6_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())

    assert sniff_image(data, LIMITS).width == 40  # the header describes the stored pixels
    image = decode_image(data, LIMITS)

    assert image.size == (20, 40)
    assert close(image.getpixel((17, 2)), (255, 0, 0), tolerance=30)  # type: ignore[arg-type]
    assert close(image.getpixel((2, 2)), (0, 0, 255), tolerance=30)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_block_does_not_refuse_a_readable_photo() -> None:
    data = encode(Image.new("RGB", (32, 32), (10, 200, 10)), "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")

    image = decode_image(data, LIMITS)

    assert image.size == (32, 32)
    assert close(image.getpixel((16, 16)), (10, 200, 10))  # type: ignore[arg-type]


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (32, 24), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize(("fmt", "counted"), [("GIF", None), ("PNG", 3), ("WEBP", 3)])
def test_animation_gives_its_first_frame(fmt: str, counted: int | None) -> None:
    first, *rest = frames()
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)

    header = sniff_image(data, LIMITS)
    image = decode_image(data, LIMITS)

    assert header.frames == counted  # GIF: "animated", without walking every frame
    assert image.size == (32, 24)
    assert close(image.getpixel((16, 12)), (255, 0, 0))  # type: ignore[arg-type]


def test_single_frame_gif_counts_one() -> None:
    assert sniff_image(encode(frames()[1], "GIF"), LIMITS).frames == 1

"""TextReader on the real PP-OCR models of the rapidocr-onnxruntime wheel: text, boxes, batching, hostile input.

Text is rendered with Pillow's bundled scalable font (and DejaVu Sans where installed) onto white and
onto scikit-image's astronaut photo; RapidOCR's own per-image pipeline is the reference for the text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from policies.outputs import TextLine
from worker.families.ocr.reader import TextReader

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def _font(size: int, dejavu: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if dejavu and DEJAVU.is_file():
        return ImageFont.truetype(str(DEJAVU), size)
    return ImageFont.load_default(size=size)


def _render(
    lines: list[tuple[str, tuple[int, int], int]],
    size: tuple[int, int] = (900, 300),
    background: Image.Image | None = None,
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """An RGB image with each (text, top-left, pixel size) drawn in black, and where each text's ink lies."""
    image = Image.new("RGB", size, "white") if background is None else background.resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    inked: list[tuple[int, int, int, int]] = []
    for text, at, px in lines:
        font = _font(px, dejavu=len(inked) % 2 == 1)
        draw.text(at, text, fill="black", font=font)
        x0, y0, x1, y1 = draw.textbbox(at, text, font=font)
        inked.append((int(x0), int(y0), int(x1), int(y1)))
    return image, inked


def _squash(text: str) -> str:
    # PP-OCR's English recognizer often leaves out the spaces between words; the characters are what count.
    return text.replace(" ", "")


def _contains(box: tuple[int, int, int, int], inked: tuple[int, int, int, int], slack: int = 4) -> bool:
    return (
        box[0] <= inked[0] + slack
        and box[1] <= inked[1] + slack
        and box[2] >= inked[2] - slack
        and box[3] >= inked[3] - slack
    )


@pytest.fixture(scope="module")
def reader() -> TextReader:
    return TextReader.from_wheel(threads=2)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def test_reads_rendered_lines_on_white_where_they_are_drawn(reader: TextReader) -> None:
    image, inked = _render([("CALL 555 0142", (40, 40), 32), ("mail me: bob@example.com", (40, 140), 32)])
    (lines,) = reader.read([image])
    assert [_squash(line.text) for line in lines] == ["CALL5550142", "mailme:bob@example.com"]
    for line, ink in zip(lines, inked, strict=True):
        assert isinstance(line, TextLine)
        assert 0.5 <= line.score <= 1.0
        assert _contains(line.box, ink), (line.box, ink)
        assert line.box[2] - line.box[0] < (ink[2] - ink[0]) + 40  # the line's box, not the whole image


def test_reads_text_on_a_photo(reader: TextReader, astronaut: Image.Image) -> None:
    labelled = astronaut.copy()
    labelled.paste((255, 255, 255), (20, 410, 330, 475))  # a white label on the photo, as on a real sign
    image, inked = _render([("SALE 50% OFF", (30, 420), 40)], size=(512, 512), background=labelled)
    (lines,) = reader.read([image])
    found = [line for line in lines if _squash(line.text) == "SALE50%OFF"]
    assert found, [line.text for line in lines]
    assert _contains(found[0].box, inked[0])


def test_boxes_are_in_original_pixels_for_large_and_tiny_images(reader: TextReader) -> None:
    large, large_ink = _render([("Free shipping today", (1500, 1200), 64)], size=(2400, 1600))
    tiny, tiny_ink = _render([("OPEN", (4, 4), 20)], size=(80, 30))
    read_large, read_tiny = reader.read([large, tiny])
    assert [_squash(line.text) for line in read_large] == ["Freeshippingtoday"]
    assert _contains(read_large[0].box, large_ink[0], slack=8)
    assert read_tiny and _squash(read_tiny[0].text) == "OPEN"
    x0, y0, x1, y1 = read_tiny[0].box
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 30
    assert _contains(read_tiny[0].box, tiny_ink[0], slack=3)


def test_no_text_gives_no_lines(reader: TextReader) -> None:
    plain = Image.new("RGB", (640, 480), (120, 160, 200))
    assert reader.read([plain]) == [()]
    assert reader.read([]) == []


def test_a_call_with_several_images_reads_each_as_alone(reader: TextReader, astronaut: Image.Image) -> None:
    images = [
        _render([("https://shop.example.org/sale", (20, 30), 28), ("hello world", (20, 120), 20)])[0],
        _render([("Order 7731", (60, 60), 48)], size=(400, 200))[0],
        astronaut,
        _render([("call 0800 123 456 now", (10, 10), 24)], size=(700, 60))[0],
    ]
    together = reader.read(images)
    assert together == [reader.read([image])[0] for image in images]
    assert sum(len(lines) for lines in together) >= 4


def test_hostile_images_do_not_crash(reader: TextReader) -> None:
    images = [
        Image.new("RGB", (1, 1), "white"),
        Image.new("RGB", (8000, 100), "white"),
        Image.new("RGB", (300, 300), "black"),
        Image.new("RGB", (5, 3000), "gray"),
    ]
    strip = images[1]
    ImageDraw.Draw(strip).text((3000, 30), "a very long strip", fill="black", font=_font(40))
    results = reader.read(images)
    assert len(results) == len(images)
    for image, lines in zip(images, results, strict=True):
        for line in lines:
            x0, y0, x1, y1 = line.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height


def test_same_text_as_rapidocr_per_image(reader: TextReader, astronaut: Image.Image) -> None:
    from rapidocr_onnxruntime import RapidOCR

    reference = RapidOCR(intra_op_num_threads=2, inter_op_num_threads=1)
    images = [
        _render([("CALL 555 0142", (40, 40), 32), ("mail me: bob@example.com", (40, 120), 24)])[0],
        _render([("Visit www.example.net", (30, 300), 36)], size=(512, 512), background=astronaut)[0],
        _render([("tiny text", (5, 5), 20)], size=(160, 40))[0],
    ]
    ours = reader.read(images)
    for image, lines in zip(images, ours, strict=True):
        result, _ = reference(np.asarray(image)[:, :, ::-1])  # RapidOCR reads arrays as BGR
        expected = [text for _, text, score in result or [] if text]
        assert [line.text for line in lines] == expected


def test_describe_names_the_wheel_and_its_models(reader: TextReader) -> None:
    described = reader.describe()
    assert described["source"].startswith("rapidocr-onnxruntime ")
    assert ".onnx" in described["source"]
    assert described["random"] is False
    assert (described["device"], described["dtype"]) == ("cpu", "float32")

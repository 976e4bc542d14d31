"""`modtag bench --ocr`: the OCR TextReader against RapidOCR's own one-call-per-image pipeline.

Two image sets: the bench's fixed photos (`common.photos`, almost no text: the detector's cost) and a
rendered-text set built here (lines 20 to 48 px high of words, phone numbers, e-mails and URLs, on white
and on photo crops, in Pillow's bundled font and DejaVu Sans where installed). Both pipelines run with the
same thread count, interleaved round by round (the order alternating) because the machine is noisy;
reported are the median ms per image, their ratio, whether the texts are identical, and the character
error rate of the rendered lines against what was drawn, overall and by line height.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core.errors import ConfigError
from modtag.bench.common import PHOTOS, Log, load_average, photos
from policies.outputs import TextLine

HEIGHTS = (20, 24, 28, 32, 40, 48)
"""Rendered font sizes in pixels (a line's cap-to-descender height is about this)."""
STRINGS = (
    "CALL 555 0142",
    "mail me: bob@example.com",
    "https://shop.example.org/sale",
    "Free shipping today",
    "www.example.net/login",
    "+1 (415) 555-2671",
    "support@modtag.io",
    "Order 7731 confirmed",
    "SALE 50% OFF",
    "Visit us at example.com",
    "text 0800 123 456",
    "Limited offer ends Friday",
    "user.name+tag@mail.co.uk",
    "http://bit.ly/3xYz9Q",
    "Open 9am - 5pm",
    "Fresh coffee beans",
)
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@dataclass(frozen=True)
class OcrBenchOptions:
    """What `modtag bench --ocr` runs."""

    images: int = 8  # bench photos, and rendered-text images
    rounds: int = 5  # timed rounds per pipeline, interleaved; medians are reported
    batch_size: int = 8  # images per TextReader.read call (the worker's micro-batch)
    threads: int | None = None  # ONNX Runtime threads for both pipelines; None: the cores this process may use
    progress: bool = True
    seed: int = 0


@dataclass(frozen=True)
class DrawnLine:
    text: str
    height: int  # font size, px
    box: tuple[int, int, int, int]  # the ink's bounds


def run_ocr_bench(options: OcrBenchOptions) -> dict[str, Any]:
    """Time both pipelines on both sets and score the rendered set's text; the report dict."""
    if options.images < 1 or options.rounds < 1 or options.batch_size < 1:
        raise ConfigError("bench --ocr: images, rounds and batch size must be at least 1", code="bench_invalid")
    from rapidocr_onnxruntime import RapidOCR

    from worker.families.ocr.reader import TextReader

    log = Log(options.progress)
    threads = options.threads or _cores()
    reader = TextReader.from_wheel(threads=threads)
    reference = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)

    def ours(images: Sequence[Image.Image]) -> list[list[str]]:
        read: list[tuple[TextLine, ...]] = []
        for start in range(0, len(images), options.batch_size):
            read += reader.read(images[start : start + options.batch_size])
        return [[line.text for line in lines] for lines in read]

    def theirs(images: Sequence[Image.Image]) -> list[list[str]]:
        texts = []
        for image in images:
            result, _ = reference(np.asarray(image)[:, :, ::-1])  # RapidOCR reads arrays as BGR
            texts.append([text for _, text, _ in result or [] if text])
        return texts

    fonts = _fonts()
    rendered, truth = render_set(options.images, fonts, random.Random(options.seed))
    report: dict[str, Any] = {
        "ocr": True,
        "workload": {
            "photos": options.images,
            "rendered_images": len(rendered),
            "rendered_lines": sum(len(lines) for lines in truth),
            "rounds": options.rounds,
            "batch_size": options.batch_size,
            "threads": threads,
            "fonts": [name for name, _ in fonts],
            "reader": reader.describe()["source"],
        },
    }
    for name, images in (("photos", photos(options.images)), ("rendered", rendered)):
        log(f"ocr: {name}, {len(images)} images, {options.rounds} rounds")
        report[name] = _compare(ours, theirs, images, options.rounds)
    read = [reader_lines for reader_lines in _read_lines(reader, rendered, options.batch_size)]
    report["rendered"].update(_accuracy(truth, read))
    report["machine"] = {"cpus": os.cpu_count(), "load_average_after": load_average()}
    return report


def render_set(
    count: int, fonts: Sequence[tuple[str, Callable[[int], Any]]], rng: random.Random
) -> tuple[list[Image.Image], list[list[DrawnLine]]]:
    """`count` images of 3 to 4 lines each, on white (even images) or a photo crop (odd), and what was drawn."""
    from skimage import data

    images, truth = [], []
    for index in range(count):
        width, height = rng.choice(((800, 360), (640, 480), (1024, 400)))
        if index % 2 == 0:
            image = Image.new("RGB", (width, height), "white")
        else:
            photo = Image.fromarray(getattr(data, PHOTOS[index % len(PHOTOS)])()).convert("RGB")
            image = photo.resize((width, height))
        draw = ImageDraw.Draw(image)
        drawn: list[DrawnLine] = []
        y = 12
        for line in range(4):
            px = HEIGHTS[(index + line * 2) % len(HEIGHTS)]
            text = STRINGS[(index * 4 + line) % len(STRINGS)]
            _, font = fonts[(index + line) % len(fonts)]
            face = font(px)
            x = rng.randint(8, 40)
            left, top, right, bottom = draw.textbbox((x, y), text, font=face)
            if right >= width - 4 or bottom >= height - 4:
                break
            if index % 2 == 1:  # on a photo: white letters with a dark outline, as captions and memes are drawn
                draw.text((x, y), text, fill="white", font=face, stroke_width=2, stroke_fill="black")
            else:
                draw.text((x, y), text, fill="black", font=face)
            drawn.append(DrawnLine(text, px, (int(left), int(top), int(right), int(bottom))))
            y = int(bottom) + max(14, px // 2)
        images.append(image)
        truth.append(drawn)
    return images, truth


def format_ocr_report(report: dict[str, Any]) -> str:
    """The report as a short table for people; the JSON has every figure."""
    workload = report["workload"]
    lines = [
        f"modtag bench --ocr: {workload['reader']}; {workload['threads']} threads, "
        f"{workload['rounds']} interleaved rounds, micro-batches of {workload['batch_size']}",
        f"fonts: {', '.join(workload['fonts'])}",
        "",
        f"{'set':<10}{'images':>8}{'reader ms':>12}{'RapidOCR ms':>13}{'ratio':>8}  identical text",
    ]
    for name in ("photos", "rendered"):
        part = report[name]
        lines.append(
            f"{name:<10}{part['images']:>8}{part['ms_per_image_reader']:>12.1f}{part['ms_per_image_rapidocr']:>13.1f}"
            f"{part['speedup']:>7.2f}x  {'yes' if part['identical'] else 'NO'}"
        )
    rendered = report["rendered"]
    by_height = ", ".join(f"{px}px {cer:.3f}" for px, cer in rendered["cer_by_height"].items())
    lines += [
        "",
        f"CER (spaces ignored) {rendered['cer']:.3f} over {rendered['lines']} lines; with spaces "
        f"{rendered['cer_with_spaces']:.3f}",
        f"by height: {by_height}",
    ]
    for failure in rendered["failures"][:12]:
        lines.append(
            f"  {failure['height']}px {failure['drawn']!r} read {failure['read']!r} (CER {failure['cer']:.2f})"
        )
    return "\n".join(lines)


def _compare(
    ours: Callable[[Sequence[Image.Image]], list[list[str]]],
    theirs: Callable[[Sequence[Image.Image]], list[list[str]]],
    images: Sequence[Image.Image],
    rounds: int,
) -> dict[str, Any]:
    ours_texts, theirs_texts = ours(images), theirs(images)  # warm-up, and the texts compared
    timings: dict[str, list[float]] = {"reader": [], "rapidocr": []}
    for round_index in range(rounds):
        pair = [("reader", ours), ("rapidocr", theirs)]
        for name, run in pair if round_index % 2 == 0 else pair[::-1]:
            started = time.perf_counter()
            run(images)
            timings[name].append((time.perf_counter() - started) * 1000 / len(images))
    reader_ms, rapidocr_ms = statistics.median(timings["reader"]), statistics.median(timings["rapidocr"])
    differing = [
        {"image": index, "reader": a, "rapidocr": b}
        for index, (a, b) in enumerate(zip(ours_texts, theirs_texts, strict=True))
        if a != b
    ]
    return {
        "images": len(images),
        "ms_per_image_reader": round(reader_ms, 2),
        "ms_per_image_rapidocr": round(rapidocr_ms, 2),
        "speedup": round(rapidocr_ms / reader_ms, 3),
        "identical": not differing,
        "differing": differing,
        "ms_per_round": {name: [round(ms, 2) for ms in values] for name, values in timings.items()},
    }


def _read_lines(reader: Any, images: Sequence[Image.Image], batch_size: int) -> list[tuple[TextLine, ...]]:
    read: list[tuple[TextLine, ...]] = []
    for start in range(0, len(images), batch_size):
        read += reader.read(images[start : start + batch_size])
    return read


def _accuracy(truth: Sequence[Sequence[DrawnLine]], read: Sequence[Sequence[TextLine]]) -> dict[str, Any]:
    """CER of each drawn line against the read lines whose box centre lies in it (left to right), by height."""
    errors: dict[int, list[int]] = {}
    errors_spaced = lengths_spaced = 0
    failures = []
    for drawn_lines, lines in zip(truth, read, strict=True):
        for drawn in drawn_lines:
            x0, y0, x1, y1 = drawn.box
            inside = sorted(
                (
                    line
                    for line in lines
                    if x0 - 4 <= (line.box[0] + line.box[2]) / 2 <= x1 + 4
                    and y0 - 4 <= (line.box[1] + line.box[3]) / 2 <= y1 + 4
                ),
                key=lambda line: line.box[0],
            )
            text = " ".join(line.text for line in inside)
            distance = levenshtein(_squash(text), _squash(drawn.text))
            length = len(_squash(drawn.text))
            counts = errors.setdefault(drawn.height, [0, 0])
            counts[0] += distance
            counts[1] += length
            errors_spaced += levenshtein(text, drawn.text)
            lengths_spaced += len(drawn.text)
            if distance:
                failures.append(
                    {"drawn": drawn.text, "read": text, "height": drawn.height, "cer": round(distance / length, 3)}
                )
    total_errors = sum(counts[0] for counts in errors.values())
    total_length = sum(counts[1] for counts in errors.values())
    return {
        "lines": sum(len(drawn) for drawn in truth),
        "cer": round(min(1.0, total_errors / total_length), 4) if total_length else 0.0,
        "cer_with_spaces": round(min(1.0, errors_spaced / lengths_spaced), 4) if lengths_spaced else 0.0,
        "cer_by_height": {
            px: round(min(1.0, counts[0] / counts[1]), 4) for px, counts in sorted(errors.items()) if counts[1]
        },
        "failures": sorted(failures, key=lambda failure: -failure["cer"]),
    }


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _squash(text: str) -> str:
    # PP-OCR's recognizer mostly leaves out the spaces between words: the headline CER ignores them.
    return text.replace(" ", "")


def _fonts() -> list[tuple[str, Callable[[int], Any]]]:
    fonts: list[tuple[str, Callable[[int], Any]]] = [
        (
            "Pillow's bundled default font (Aileron Regular, ImageFont.load_default)",
            lambda px: ImageFont.load_default(size=px),
        )
    ]
    if DEJAVU.is_file():
        fonts.append((str(DEJAVU), lambda px: ImageFont.truetype(str(DEJAVU), px)))
    return fonts


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)

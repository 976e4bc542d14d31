"""`modtag bench --ocr` on 2 images x 1 round: the report's keys, and a CER in [0, 1].

No timing assertions: only that the figures are present and measured.
"""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import ConfigError
from modtag.bench.ocr import OcrBenchOptions, format_ocr_report, levenshtein, run_ocr_bench


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_ocr_bench(OcrBenchOptions(images=2, rounds=1, batch_size=2, threads=2, progress=False))


def test_report_keys(report: dict[str, Any]) -> None:
    assert report["workload"]["fonts"] and report["workload"]["reader"].startswith("rapidocr-onnxruntime")
    for name in ("photos", "rendered"):
        part = report[name]
        assert part["images"] == 2
        assert part["ms_per_image_reader"] > 0 and part["ms_per_image_rapidocr"] > 0
        assert part["speedup"] > 0
        assert isinstance(part["identical"], bool)
    rendered = report["rendered"]
    assert rendered["lines"] >= 4
    assert 0.0 <= rendered["cer"] <= 1.0
    assert 0.0 <= rendered["cer_with_spaces"] <= 1.0
    assert rendered["cer_by_height"] and all(0.0 <= cer <= 1.0 for cer in rendered["cer_by_height"].values())
    assert isinstance(rendered["failures"], list)
    assert "CER" in format_ocr_report(report)


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError):
        run_ocr_bench(OcrBenchOptions(images=0))

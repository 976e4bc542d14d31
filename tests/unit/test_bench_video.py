"""`modtag bench --video` on tiny random models and a small clip: the report's figures are there and consistent.

No timing assertions: only what the sampler must keep, and that every figure was measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.video import Sampling
from modtag.bench import BenchOptions
from modtag.bench.common import Log
from modtag.bench.video import VideoBenchOptions, _clip, format_video_report, run_video_bench
from modtag.cli import main


@pytest.fixture(scope="module")
def report(tiny_models_dir: Path) -> Iterator[dict[str, Any]]:
    # One torch thread: on a machine shared with other test processes, OpenMP teams spinning for cores cost
    # seconds per tiny batch. The setting is the process's, so it is put back.
    threads = torch.get_num_threads()
    options = BenchOptions(
        cache_dir=tiny_models_dir.parent, models="tiny-random", dtype="float32", threads=1, batch_size=4, progress=False
    )
    try:
        yield run_video_bench(options, VideoBenchOptions(seconds=12, size=(320, 180), fps=10, sampling=Sampling()))
    finally:
        torch.set_num_threads(threads)


def test_the_report_compares_both_ways_on_the_same_clip(report: dict[str, Any]) -> None:
    assert report["clip"]["seconds"] == 12.0 and report["clip"]["size"] == "320x180"
    assert report["clip"]["cuts"] == 5 and report["clip"]["codec"] == "h264"
    modtag, naive = report["modtag"], report["naive"]
    assert naive["frames"] == 12  # one a second, every second
    # Still stretches cost a frame each, pans a frame a second, every cut is seen: fewer than the naive way's.
    # (cuts at 2.1, 3.6, 6.1, 7.3 and 9.1 s: between sample points, each one a scene change)
    assert modtag["reasons"]["first"] == 1 and modtag["reasons"]["scene"] == 5
    assert 6 <= modtag["frames"] < naive["frames"]
    for way in (modtag, naive):
        assert way["total_s"] > 0 and way["engine_s"] > 0
        assert way["seconds_per_minute_of_video"] == pytest.approx(way["total_s"] / 12 * 60)
    assert modtag["decode_sample_hash_s"] > 0 and naive["decode_s"] > 0
    assert report["speedup"] == pytest.approx(naive["total_s"] / modtag["total_s"])
    assert set(report["sampler_memory_rise_mb"]) == {"3s", "12s"}
    assert report["models"] == "tiny-random"


def test_the_summary_names_the_figures(report: dict[str, Any]) -> None:
    text = format_video_report(report)
    assert "per minute of video" in text and "frames kept" in text and "speedup" in text


def test_a_second_run_reuses_the_encoded_clip(report: dict[str, Any], tiny_models_dir: Path) -> None:
    assert report["clip"]["encode_s"] is None or report["clip"]["encode_s"] > 0
    video = VideoBenchOptions(seconds=12, size=(320, 180), fps=10)
    path, encode_s = _clip(tiny_models_dir.parent, video, 12, Log(False))
    assert encode_s is None and path.name == "clip-v2-12s-320x180-10fps.mp4"


@pytest.mark.slow
def test_the_command_line_prints_the_json_report(
    tiny_models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODTAG_VIDEO_PDQ_SKIP", "0")
    threads = torch.get_num_threads()  # --threads 1 (see `report`) must not outlive the test
    code = main(
        [
            "bench",
            "--video",
            "--video-seconds",
            "2",
            "--models",
            "tiny-random",
            "--models-cache",
            str(tiny_models_dir.parent),
            "--json",
            "--no-progress",
            "--batch-size",
            "2",
            "--dtype",
            "float32",
            "--threads",
            "1",
        ]
    )
    torch.set_num_threads(threads)
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["clip"]["size"] == "1920x1080" and printed["sampling"]["pdq_skip"] == 0
    assert printed["naive"]["frames"] == 2


@pytest.mark.parametrize("value", ["0", "-5", "601", "1e9", "sixty", ""])
def test_a_bad_clip_length_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--video", "--video-seconds", value])
    assert exited.value.code == 2
    assert "--video-seconds" in capsys.readouterr().err

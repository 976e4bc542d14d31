"""Calibration's arithmetic (the curve, the suggestion, the Wilson interval), the calibrated policy the CLI writes,
and `modtag policy calibrate` / `modtag labels export` refusing bad arguments before any request."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.calibration import curve, point_at, suggest, thinned, wilson
from modtag.calibrate import calibrated_policy
from modtag.cli import main
from modtag.servers import free_port
from policies import load_policies


def test_the_curve_counts_ties_once_and_needs_a_positive() -> None:
    pairs = [(0.9, True), (0.9, False), (0.5, True), (0.2, False)]
    points = [(p.threshold, p.precision, p.recall) for p in curve(pairs)]
    assert points == [(0.2, 0.5, 1.0), (0.5, round(2 / 3, 6), 1.0), (0.9, 0.5, 0.5)]
    assert curve([(0.3, False), (0.7, False)]) == []
    assert curve([]) == []


def test_the_suggestion_meets_the_targets_or_says_none() -> None:
    points = curve([(0.95, True), (0.9, True), (0.8, False), (0.6, True), (0.3, False), (0.1, True)])
    review, block = suggest(points, block_precision=1.0, review_recall=0.75)
    assert block == 0.9  # the lowest threshold with no false positive above it
    assert review == 0.6  # the highest threshold that still finds 3 of 4
    assert suggest(points, block_precision=1.0, review_recall=0.5) == (0.9, 0.9)  # review never above block
    assert suggest(curve([(0.9, False), (0.5, True)]), block_precision=0.95, review_recall=0.9) == (0.5, None)
    assert point_at(points, 0.85) == next(p for p in points if p.threshold == 0.9)
    assert point_at(points, 0.99) is None and point_at(points, None) is None


def test_wilson_interval() -> None:
    assert wilson(8, 10) == pytest.approx((0.490, 0.943), abs=1e-3)  # the textbook example
    low, high = wilson(0, 10)
    assert low == 0.0 and 0.27 < high < 0.28
    low, high = wilson(10, 10)
    assert high == 1.0 and 0.72 < low < 0.73
    low, high = wilson(990, 1000)
    assert low < 0.99 < high and high - low < 0.02


@pytest.mark.parametrize("name", ["moderation", "listing", "tagging"])
def test_the_calibrated_policy_of_a_builtin_validates_with_the_suggested_thresholds(name: str) -> None:
    """Every category gets review 0.41 / block 0.73 where it has that threshold; a threshold it leaves unset stays
    unset (listing's never block, tagging's never act), and the result validates (a tags check's taxonomy and
    defaults written back as an author would)."""
    policy = load_policies()[name]
    dumped = {**policy.model_dump(mode="json"), "version": policy.version}
    found = [{"category": c.name, "suggested": {"review": 0.41, "block": 0.73}} for c in policy.categories]
    text, written = calibrated_policy(dumped, found, f"{name}-calibrated")
    assert (written.name, written.shadows) == (f"{name}-calibrated", name)
    for category in policy.categories:
        new = written.category(category.name)
        assert new.review == (None if category.review is None else 0.41)
        assert new.block == (None if category.block is None else 0.73)
        assert new.checks == category.checks
    assert text.startswith(f"# {name}-calibrated: policy {name} (version {policy.version})")


@pytest.mark.parametrize(
    "extra",
    [
        ["--target-precision", "0"],
        ["--target-precision", "nan"],
        ["--target-precision", "1.5"],
        ["--target-recall", "abc"],
        ["--target-recall", "-1"],
    ],
)
def test_calibrate_refuses_bad_targets(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["policy", "calibrate", "moderation", "--api", "http://127.0.0.1:9", *extra])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and ("must be above 0 and at most 1" in err or "is not a number" in err)


def test_bad_since_and_an_unreachable_api_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    for argv in (
        ["policy", "calibrate", "moderation", "--api", api, "--since", "yesterday"],
        ["labels", "export", str(tmp_path / "out"), "--api", api, "--since", "9" * 40],
    ):
        assert main(argv) == 2
        assert "--since" in capsys.readouterr().err
    assert main(["policy", "calibrate", "moderation", "--api", api]) == 3
    assert "[api_unreachable]" in capsys.readouterr().err
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    assert main(["labels", "export", str(blocked), "--api", api, "--no-progress"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_a_long_curve_is_thinned_keeping_its_ends_and_the_thresholds_in_use() -> None:
    pairs = [(i / 10_000, i % 3 == 0) for i in range(10_000)]
    points = curve(pairs)
    assert len(points) == 10_000
    keep = [point_at(points, 0.12345), point_at(points, 0.9)]
    short = thinned(points, 500, keep=keep)
    assert 500 <= len(short) <= 502
    assert short[0] == points[0] and short[-1] == points[-1]
    assert all(point in short for point in keep)
    assert [p.threshold for p in short] == sorted(p.threshold for p in short)
    assert thinned(points[:10], 500) == points[:10]

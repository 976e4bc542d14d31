"""The policy and listing commands' argument handling: dates, attributes, case folders, exit statuses, dtypes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidField
from core.moments import parse_since
from modtag.cli import main
from modtag.listing import listing_failed, parse_attributes
from policies import builtin_dir
from tests.support.photos import photo_bytes
from worker.families.blip.quant import int8_linear_available
from worker.replay import find_cases


def test_since_takes_iso_dates_and_ages() -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since(" 12H ", now) == now - timedelta(hours=12)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T10:00:00+02:00") == datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    for bad in ("yesterday", "7", "-1d", "1y", "", "9999999d", "999999w"):
        with pytest.raises(ValueError, match="not a date"):
            parse_since(bad, now)


def test_attributes_are_name_value_pairs() -> None:
    assert parse_attributes(["color=red", " Count = 2 ", "note=a=b"]) == {"color": "red", "count": "2", "note": "a=b"}
    for bad in (["red"], ["=red"], [" =x"]):
        with pytest.raises(InvalidField):
            parse_attributes(bad)


def test_cases_are_images_in_action_folders(tmp_path: Path) -> None:
    with pytest.raises(InvalidField, match="not a directory"):
        find_cases(tmp_path / "missing")
    with pytest.raises(InvalidField, match="no images found"):
        find_cases(tmp_path)
    (tmp_path / "review" / "nested").mkdir(parents=True)
    (tmp_path / "review" / "nested" / "a.PNG").write_bytes(b"x")
    (tmp_path / "review" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "review" / "a.json").write_text("{}")
    (tmp_path / "allow").mkdir()
    (tmp_path / "allow" / "b.jpg").write_bytes(b"x")
    assert [(p.name, action) for p, action in find_cases(tmp_path)] == [("b.jpg", "allow"), ("a.PNG", "review")]
    (tmp_path / "Block").mkdir()
    with pytest.raises(InvalidField, match="unexpected folder"):
        find_cases(tmp_path)


def test_listing_check_refuses_bad_arguments_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    assert main(["listing", "check", str(tmp_path / "nope.jpg"), "--title", "x", "--api", "http://127.0.0.1:9"]) == 2
    assert "not a file" in capsys.readouterr().err
    assert main(["listing", "check", str(image), "--title", "x", "--attr", "red", "--api", "http://127.0.0.1:9"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["listing", "check", str(image)])  # --title is required
    assert exited.value.code == 2


def test_policy_commands_refuse_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ndescription: d\ncategories:\n"
        "  - {name: c, description: d, review: 2, checks: [{kind: probe, question: 'q?'}]}\n"
    )
    assert main(["policy", "replay", str(bad), "--since", "1d"]) == 3
    assert f"{bad}:4:" in capsys.readouterr().err
    assert main(["policy", "replay", str(bad), "--since", "1d", "--limit", "0"]) == 2
    assert main(["policy", "test", str(bad), str(tmp_path)]) == 3
    good = tmp_path / "good.yaml"
    good.write_text(bad.read_text().replace("review: 2", "review: 0.5"))
    assert main(["policy", "test", str(good), str(tmp_path / "cases")]) == 2
    assert "not a directory of cases" in capsys.readouterr().err
    assert main(["policy", "validate", str(good)]) == 0


def test_a_listing_fails_when_a_photo_could_not_be_checked() -> None:
    assert not listing_failed({"verdict": {"status": "done", "photos": {"failed": 0}}})
    assert listing_failed({"verdict": {"status": "done", "photos": {"failed": 1}}})
    assert listing_failed({"verdict": {"status": "pending"}})


def test_policy_test_decides_the_cases_at_two_dtypes_side_by_side(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODTAG_MODELS_CACHE_DIR", str(tiny_models_dir.parent))
    monkeypatch.setenv("MODTAG_DATA_DIR", str(tmp_path / "data"))
    cases = tmp_path / "cases"
    for folder, name in (("allow", "rocket"), ("review", "astronaut")):
        (cases / folder).mkdir(parents=True)
        (cases / folder / f"{name}.jpg").write_bytes(photo_bytes(name, size=(80, 60)))
    policy = str(builtin_dir() / "moderation.yaml")
    other = "int8" if int8_linear_available() else "bfloat16"  # int8 needs the CPU's int8 kernels
    command = ["policy", "test", policy, str(cases), "--models", "tiny-random", "--dtype", "float32"]

    def decided(*extra: str) -> tuple[int, list[dict[str, Any]]]:
        status = main([*command, *extra, "--json"])
        return status, json.loads(capsys.readouterr().out)

    status, single = decided()
    compared_status, compared = decided("--compare-dtype", other)
    assert [case["path"] for case in compared] == [case["path"] for case in single]
    # The first side is the plain run at --dtype; the second ran the same cases at the other dtype.
    assert [case["decided"]["float32"] for case in compared] == [case["decided"] for case in single]
    for case in compared:
        decisions = case["decided"]
        assert set(decisions) == {"float32", other}
        assert set(decisions.values()) <= {"allow", "review", "block"}
        assert case["same"] == (decisions["float32"] == decisions[other])
    all_passed = all(all(case["passed"].values()) for case in compared)
    assert compared_status == (0 if all_passed else 1) and status in (0, 1)

    main([*command, "--compare-dtype", other])
    out = capsys.readouterr().out
    assert "EXPECTED  FLOAT32" in out and other.upper() in out and out.count("\nsame ") + out.count("\nDIFF ") == 2
    assert f"2 cases: {sum(case['same'] for case in compared)} decided the same at float32 and {other}" in out

"""`modtag backfill` against a real API (real HTTP, Redis, PostgreSQL; no worker needed: it only submits): a run
killed halfway and run again submits each row once; bad rows become failures with reasons; a rerun sends nothing
twice; bad arguments and an unreachable API are one line each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, func, select

from core.db import session_scope
from core.errors import ModtagError
from core.tables import Job
from modtag.backfill import FAILURES_FILE, MAX_ROW_BYTES, RESULTS_FILE, backfill
from modtag.cli import main
from modtag.client import ApiClient
from modtag.servers import free_port
from tests.support.api import Api
from tests.support.waiting import wait_for

# One backend: what is tested is the command and the API's idempotency, the same on both.
pytestmark = [pytest.mark.timeout(300), pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]
ROWS = 1000


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def backfill_jobs(api: Api, policy: str = "moderation") -> tuple[int, int]:
    """How many jobs the API stored for backfill rows under `policy`, and how many distinct keys they have."""
    with session_scope(api.db_url) as session:
        query = select(func.count(), func.count(func.distinct(Job.idempotency_key))).where(
            col(Job.idempotency_key).startswith(f"backfill:{policy}:")
        )
        total, distinct = session.exec(query).one()
    return int(total), int(distinct)


def run_command(api: Api, source: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = ["backfill", str(source), "--api", api.base_url, "--api-key", api.key, "--out", str(out), *extra]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MODTAG_")}
    return subprocess.Popen(
        [sys.executable, "-m", "modtag", *args],
        cwd=out.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow  # about a minute here: 1,500 submissions through a real API on a shared machine
def test_a_run_killed_halfway_and_run_again_submits_every_row_once(api: Api, tmp_path: Path) -> None:
    source = tmp_path / "catalogue.jsonl"
    with source.open("w") as handle:
        for index in range(ROWS):
            row: dict[str, Any] = {"url": f"https://images.example/{index}.jpg", "context": {"sku": index}}
            if index % 2 == 0:  # half with ids, half known by their content
                row["id"] = f"sku-{index}"
            handle.write(json.dumps(row) + "\n")
    out = tmp_path / "out"
    first = run_command(api, source, out, "--rate", "100000", "--policy", "moderation")
    try:
        wait_for(lambda: line_count(out / RESULTS_FILE) >= ROWS // 2 or first.poll() is not None, 120, "half sent")
    finally:
        first.kill()  # SIGKILL: no chance to tidy up
        first.wait(10)
    sent_before = len(records(out / RESULTS_FILE))
    assert ROWS // 2 <= sent_before < ROWS, "the first run was to be stopped halfway"

    second = run_command(api, source, out, "--rate", "100000", "--no-progress")
    stdout, stderr = second.communicate(timeout=240)
    assert second.returncode == 0, stderr.decode()[-2000:]
    assert f"{ROWS - sent_before} submitted, 0 failed, {sent_before} done before" in stdout.decode()

    results = records(out / RESULTS_FILE)
    assert len(results) == ROWS and len({record["key"] for record in results}) == ROWS
    assert sorted(record["row"] for record in results) == list(range(1, ROWS + 1))
    # At most the row in flight when the first run was killed went out twice, and came back as the same job.
    assert sum(record["replayed"] for record in results) <= 1
    assert backfill_jobs(api) == (ROWS, ROWS)
    assert records(out / FAILURES_FILE) == []
    job = api.client.get(f"/v1/jobs/{results[0]['job_id']}").json()
    assert job["priority"] == "bulk" and job["context"] == {"sku": 0}


def test_bad_rows_become_failures_with_reasons_and_a_rerun_sends_nothing_twice(
    api: Api, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(next(iter(photos.values())))
    lines = [
        json.dumps({"id": "good-url", "url": "https://images.example/good.jpg"}),
        json.dumps({"id": "good-file", "path": "photo.jpg", "context": {"title": "a mug"}}),  # beside the file
        json.dumps({"id": "both", "url": "https://images.example/x.jpg", "path": "photo.jpg"}),
        json.dumps({"id": "neither", "context": {}}),
        json.dumps({"id": "context-list", "url": "https://images.example/x.jpg", "context": [1, 2]}),
        json.dumps({"id": "missing-file", "path": "nowhere/missing.jpg"}),
        json.dumps({"id": "not-an-image", "path": "catalogue.jsonl"}),  # the API refuses it
        json.dumps({"id": "ftp", "url": "ftp://images.example/x.jpg"}),  # the API refuses it
        json.dumps({"id": 12.5, "url": "https://images.example/x.jpg"}),
        json.dumps({"id": "\u00e9" * 500, "url": "https://images.example/long-id.jpg"}),  # a hashed key
        json.dumps({"url": "https://images.example/" + "a" * (MAX_ROW_BYTES + 10)}),  # an over-long line
        "[1, 2, 3]",
        "{not json",
        "",
        json.dumps({"url": "https://images.example/no-id.jpg"}),
    ]
    source = tmp_path / "catalogue.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with ApiClient(api.base_url, key=api.key) as client:
        report = backfill(client, source, out, policy="moderation", rate_per_s=1000, progress=False)
        assert (report.submitted, report.failed, report.skipped) == (4, 10, 0)
        failures = {record["row"]: record for record in records(out / FAILURES_FILE)}
        assert {row: failures[row]["code"] for row in failures} == {
            3: "row_invalid",
            4: "row_invalid",
            5: "row_invalid",
            6: "row_invalid",
            7: "image_unsupported",
            8: "url_invalid",
            9: "row_invalid",
            11: "row_too_large",
            12: "row_invalid",
            13: "row_invalid",
        }
        assert "exactly one of `url` and `path`" in failures[3]["reason"]
        assert "no such file" in failures[6]["reason"] and failures[7]["status"] == 415
        again = backfill(client, source, out, policy="moderation", rate_per_s=1000, progress=False)
    assert (again.submitted, again.failed, again.skipped) == (0, 0, 14)
    results = records(out / RESULTS_FILE)
    assert [record["row"] for record in results] == [1, 2, 10, 15]
    assert len(results[2]["key"]) < 120 and "sha256" in results[2]["key"]
    uploaded = api.client.get(f"/v1/jobs/{results[1]['job_id']}").json()
    assert uploaded["source"] == "upload" and uploaded["priority"] == "bulk"


def test_a_csv_catalogue_with_json_contexts(api: Api, tmp_path: Path) -> None:
    source = tmp_path / "catalogue.csv"
    source.write_text(
        "id,url,context\n"
        'c1,https://images.example/c1.jpg,"{""sku"": 1}"\n'
        "c2,https://images.example/c2.jpg,{broken\n"
        "c3,https://images.example/c3.jpg,,extra-cell\n"
        ",,\n"
        "c4,https://images.example/c4.jpg,\n"
    )
    with ApiClient(api.base_url, key=api.key) as client, pytest.raises(ModtagError, match="no policy named"):
        backfill(client, source, tmp_path / "out", policy="csv-test-missing", rate_per_s=1000, progress=False)
    # An unknown policy would refuse every row: the run stopped at the first, with nothing recorded.
    assert records(tmp_path / "out" / RESULTS_FILE) == records(tmp_path / "out" / FAILURES_FILE) == []
    with ApiClient(api.base_url, key=api.key) as client:
        report = backfill(client, source, tmp_path / "out", rate_per_s=1000, progress=False)
    assert (report.submitted, report.failed) == (2, 2)
    failures = records(tmp_path / "out" / FAILURES_FILE)
    assert {record["id"]: record["code"] for record in failures} == {"c2": "row_invalid", "c3": "row_invalid"}
    job = api.client.get(f"/v1/jobs/{records(tmp_path / 'out' / RESULTS_FILE)[0]['job_id']}").json()
    assert job["context"] == {"sku": 1}


def test_bad_arguments_and_an_unreachable_api_are_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"url": "https://images.example/a.jpg"}) + "\n")
    for rate in ("0", "-1", "abc", "nan"):
        with pytest.raises(SystemExit) as exited:
            main(["backfill", str(source), "--api", "http://127.0.0.1:1", "--rate", rate])
        assert exited.value.code == 2
    assert main(["backfill", str(tmp_path / "missing.csv"), "--api", "http://127.0.0.1:1", "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "headerless.csv").write_text("a,b\n1,2\n")
    headerless = ["backfill", str(tmp_path / "headerless.csv"), "--api", "http://127.0.0.1:1"]
    assert main([*headerless, "--out", str(tmp_path / "never")]) == 2
    assert "must name a `url` or `path` column" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # refused before anything was written
    out = tmp_path / "out"
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert main(["backfill", str(source), "--api", unreachable, "--out", str(out), "--no-progress"]) == 3
    assert "cannot reach the modtag API" in capsys.readouterr().err
    assert records(out / RESULTS_FILE) == records(out / FAILURES_FILE) == []  # nothing recorded: a rerun sends it


def test_sigterm_stops_after_the_row_in_flight(api: Api, tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"t{i}", "url": f"https://images.example/t{i}.jpg"}) + "\n" for i in range(500))
    )
    out = tmp_path / "out"
    process = run_command(api, source, out, "--rate", "50", "--no-progress")
    wait_for(lambda: line_count(out / RESULTS_FILE) >= 5 or process.poll() is not None, 60, "a few rows sent")
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "interrupted: run the same command again to resume" in stdout.decode()
    assert len(records(out / RESULTS_FILE)) < 500

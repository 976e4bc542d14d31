"""`modtag bench --through-stack` as a user runs it: a real stack (Redis, API, worker, SQLite) on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_bench_through_the_stack_reports_both_rates(tiny_models_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODTAG_")}
    env["MODTAG_DATA_DIR"] = str(tmp_path / "untouched")  # the bench runs its stack in a temporary directory
    command = [
        sys.executable, "-m", "modtag", "bench", "--models", "tiny-random",
        "--models-cache", str(tiny_models_dir.parent), "--images", "1", "--skip-baseline", "--repeat", "1",
        "--through-stack", "--stack-jobs", "3", "--json", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    stack = report["through_stack"]
    assert (stack["jobs"], stack["done"], stack["failed"]) == (3, 3, 0)
    assert stack["policy"] == "moderation" and stack["checks_per_image"]["probes"] > 0
    assert stack["jobs_per_s"] > 0 and stack["engine_images_per_s"] > 0
    assert stack["ratio"] == pytest.approx(stack["jobs_per_s"] / stack["engine_images_per_s"])
    assert report["targets"]["through_stack"] == (stack["ratio"] >= 0.9)
    # The profile comes from the worker's own /metrics: every timed job went through some batch.
    profile = stack["profile"]
    assert profile["batches"] >= 1 and profile["mean_batch_images"] * profile["batches"] == 3
    assert profile["engine_busy_s"] > 0 and 0 < profile["engine_busy_share"] <= 1
    assert set(profile["worker_s_per_job"]) == {"fetch", "decode", "evaluate", "store"}
    assert all(seconds >= 0 for seconds in profile["worker_s_per_job"].values())
    # Moderate-now calls on the idle worker, one at a time: each answered with its decision.
    now = stack["moderate_now"]
    assert (now["calls"], now["decided_in_time"]) == (3, 3)
    assert 0 < now["p50_s"] <= now["p99_s"] <= now["max_s"]
    assert not (tmp_path / "untouched").exists()

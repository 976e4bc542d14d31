"""`modtag up` keeps its workers up: a worker process that died is started again with the same command and
environment, a crash loop or any other child's death stops the stack. Real child processes (small Python commands
standing in for `modtag worker` and `modtag api`, which `modtag up`'s end-to-end test runs for real)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from modtag.stack import WORKER_RESTARTS, Stack, StackError
from tests.support.waiting import wait_for

EXITS = [sys.executable, "-c", "import sys; sys.exit(1)"]
LIVES = [sys.executable, "-c", "import time; time.sleep(120)"]


def stack_of(tmp_path: Path, worker: list[str]) -> Stack:
    stack = Stack(Settings(_env_file=None, data_dir=tmp_path), quiet=True, embedded_redis=False)
    stack.log_dir.mkdir(parents=True)
    env = {**os.environ, "MODTAG_TEST_MARK": "kept"}
    stack._spawn("api", LIVES, env)
    stack._spawn("worker-0", worker, env)
    return stack


def test_a_dead_worker_is_restarted_with_its_command_and_environment(tmp_path: Path) -> None:
    """Old code: one worker's exit (status 0 after Celery's unrecoverable broker error) stopped the whole stack."""
    marker = tmp_path / "started"
    worker = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x'); import sys; sys.exit(0)"]
    stack = stack_of(tmp_path, worker)
    try:
        wait_for(lambda: stack.processes["worker-0"].poll() is not None, 30, "the worker's exit")
        first = stack.processes["worker-0"]
        stack.supervise()
        assert stack.processes["worker-0"] is not first and stack.processes["api"].poll() is None
        wait_for(lambda: marker.read_text() == "xx", 30, "the worker started a second time")
        assert stack._envs["worker-0"]["MODTAG_TEST_MARK"] == "kept"
    finally:
        stack.stop()


def test_a_crash_loop_or_the_apis_death_stops_the_stack(tmp_path: Path) -> None:
    stack = stack_of(tmp_path, EXITS)
    try:
        for _ in range(WORKER_RESTARTS):
            wait_for(lambda: stack.processes["worker-0"].poll() is not None, 30, "the worker's exit")
            stack.supervise()
        wait_for(lambda: stack.processes["worker-0"].poll() is not None, 30, "the worker's exit")
        with pytest.raises(StackError, match="worker-0 exited with status 1"):
            stack.supervise()
    finally:
        stack.stop()
    stack = stack_of(tmp_path / "again", LIVES)
    try:
        stack.processes["api"].kill()
        wait_for(lambda: stack.processes["api"].poll() is not None, 30, "the API's death")
        with pytest.raises(StackError, match="api exited"):
            stack.supervise()
    finally:
        stack.stop()

"""The worker-wide budget of decoded pixels (worker/pixels.py) with real threads: past it, jobs wait their turn."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from core.errors import TransientError
from tests.support.waiting import wait_for
from worker.pixels import PixelBudget

MP = 1_000_000


def test_jobs_past_the_budget_wait_until_pixels_are_given_back() -> None:
    budget = PixelBudget(40 * MP)
    release_first = threading.Event()
    second_running = threading.Event()

    def first() -> None:
        with budget.hold(36 * MP, timeout_s=30):
            release_first.wait(30)

    def second() -> None:
        with budget.hold(36 * MP, timeout_s=30):
            second_running.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    wait_for(lambda: budget.held == 36 * MP, 10, "the first image held")
    threads[1].start()
    wait_for(lambda: budget.waiting == 1, 10, "the second image waiting")  # 72 MP would be over the budget
    assert not second_running.is_set() and budget.held == 36 * MP
    release_first.set()
    assert second_running.wait(10)
    for thread in threads:
        thread.join(10)
    assert budget.held == 0


def test_an_image_larger_than_the_budget_runs_alone_and_a_full_budget_times_out_as_transient() -> None:
    budget = PixelBudget(40 * MP)
    with budget.hold(100 * MP, timeout_s=1):
        assert budget.held == 40 * MP
        with pytest.raises(TransientError) as busy, budget.hold(1, timeout_s=0.05):
            pass
    assert busy.value.code == "worker_busy" and busy.value.retryable
    assert budget.held == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_arenas_are_limited_on_glibc_and_zero_keeps_its_default() -> None:
    # In a child process: the limit holds for the rest of a process's life.
    script = "from worker.pixels import limit_malloc_arenas as limit\nprint(limit(0), limit(2))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True"]

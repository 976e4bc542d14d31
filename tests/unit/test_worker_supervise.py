"""`modtag worker` restarts a Celery worker that ended on an error, in the same process, and gives up non-zero after
too many: the supervision loop driven by exit statuses and an injected clock (the Celery run itself is exercised
by tests/integration/test_broker_outage.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from worker import celery_app
from worker.celery_app import supervise


def runs(statuses: list[int]) -> tuple[Callable[[], int], list[int]]:
    calls: list[int] = []

    def run() -> int:
        calls.append(1)
        return statuses[len(calls) - 1]

    return run, calls


def test_a_worker_that_ended_on_an_error_is_started_again_until_it_is_asked_to_stop() -> None:
    run, calls = runs([1, 1, 0])
    status = supervise(run, stopping=lambda: False, last_error=lambda: "", restarts=5, window_s=60)
    assert status == 0 and len(calls) == 3


def test_a_requested_stop_is_never_restarted() -> None:
    run, calls = runs([1])
    assert supervise(run, stopping=lambda: True, last_error=lambda: "", restarts=5, window_s=60) == 1
    assert len(calls) == 1


def test_too_many_errors_in_the_window_end_the_process_non_zero_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = [0.0]

    def run() -> int:
        now[0] += 1.0
        return 1

    error = "Unrecoverable error: AttributeError(\"'NoneType' object has no attribute 'hostname'\")"
    status = supervise(
        run, stopping=lambda: False, last_error=lambda: error, restarts=2, window_s=60, clock=lambda: now[0]
    )
    assert status == 1 and now[0] == 3.0  # the first run and two restarts
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modtag worker:")]
    assert len(lines) == 1 and "3 times in 60 s" in lines[0] and "hostname" in lines[0]


def test_errors_spread_wider_than_the_window_are_restarted_forever() -> None:
    now = [0.0]
    statuses = iter([1] * 10 + [0])

    def run() -> int:
        now[0] += 100.0
        return next(statuses)

    assert (
        supervise(run, stopping=lambda: False, last_error=lambda: "", restarts=2, window_s=60, clock=lambda: now[0])
        == 0
    )


def test_the_background_threads_outlive_a_restarted_consumer_and_end_with_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stop = threading.Event()  # what the reconciler, webhook sender and lease renewals wait on
    monkeypatch.setattr(celery_app, "_stop", stop)
    seen: list[bool] = []

    def run() -> int:
        seen.append(stop.is_set())
        return 1 if len(seen) < 3 else 0

    assert supervise(run, stopping=lambda: False, last_error=lambda: "", restarts=5, window_s=60) == 0
    assert seen == [False, False, False] and stop.is_set()


def test_the_background_threads_end_when_supervision_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    monkeypatch.setattr(celery_app, "_stop", stop)
    assert supervise(lambda: 1, stopping=lambda: False, last_error=lambda: "", restarts=0, window_s=60) == 1
    assert stop.is_set()

"""The bulk gate: when it pauses and resumes the bulk queue, and the defaults that size it.

Through a real worker (Celery, Redis, the models) in tests/integration/test_priority_lane.py; here each rule alone,
against a consumer that records the calls Celery's would receive (with a real consumer, when the pause lands depends
on Redis's timing, not on the rules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from core.settings import Settings
from worker.bulk_gate import BulkGate

BULK = "modtag.inference.bulk"


class Consumer:
    """Records what the gate asks of Celery's consumer; `call_soon` runs the callback when `run_soon` says so."""

    def __init__(self, fail_cancel: bool = False) -> None:
        self.calls: list[str] = []
        self.soon: list[Callable[[], None]] = []
        self.fail_cancel = fail_cancel

    def cancel_task_queue(self, queue: str) -> None:
        if self.fail_cancel:
            raise ConnectionError("Redis went away")
        self.calls.append(f"cancel {queue}")

    def add_task_queue(self, queue: str) -> None:
        self.calls.append(f"add {queue}")

    def call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        self.soon.append(lambda: callback(*args))

    def run_soon(self) -> None:
        pending, self.soon = self.soon, []
        for callback in pending:
            callback()


def test_the_bulk_queue_pauses_at_the_cap_and_resumes_when_a_bulk_job_ends() -> None:
    gate, consumer = BulkGate(BULK, cap=2), Consumer()
    gate.received(consumer, "i1", "modtag.inference")  # interactive: not counted
    gate.received(consumer, "b1", BULK)
    assert (gate.held, gate.paused, consumer.calls) == (1, False, [])
    gate.received(consumer, "b2", BULK)
    assert (gate.held, gate.paused, consumer.calls) == (2, True, [f"cancel {BULK}"])
    gate.finished("i1")  # an interactive job ending changes nothing
    gate.finished("unknown")
    assert consumer.soon == []
    gate.finished("b1")
    assert (gate.held, gate.paused) == (1, False)
    consumer.run_soon()  # on the consumer's thread
    assert consumer.calls == [f"cancel {BULK}", f"add {BULK}"]
    gate.finished("b2")
    consumer.run_soon()
    assert consumer.calls == [f"cancel {BULK}", f"add {BULK}"]  # it was not paused: nothing more


def test_a_shutting_down_worker_never_resumes_and_a_new_one_starts_afresh() -> None:
    gate, consumer = BulkGate(BULK, cap=1), Consumer()
    gate.received(consumer, "b1", BULK)
    gate.close()
    gate.finished("b1")
    consumer.run_soon()
    assert consumer.calls == [f"cancel {BULK}"]
    gate.reset(cap=3)
    assert (gate.cap, gate.held, gate.paused) == (3, 0, False)


def test_a_resume_scheduled_before_a_shutdown_does_nothing() -> None:
    gate, consumer = BulkGate(BULK, cap=1), Consumer()
    gate.received(consumer, "b1", BULK)
    gate.finished("b1")
    gate.close()
    consumer.run_soon()
    assert consumer.calls == [f"cancel {BULK}"]


def test_a_pause_the_broker_refused_is_tried_again_at_the_next_bulk_message(caplog: pytest.LogCaptureFixture) -> None:
    gate, consumer = BulkGate(BULK, cap=1), Consumer(fail_cancel=True)
    gate.received(consumer, "b1", BULK)
    assert not gate.paused and "could not pause the bulk queue (Redis went away)" in caplog.text
    consumer.fail_cancel = False
    gate.received(consumer, "b2", BULK)
    assert gate.paused and consumer.calls == [f"cancel {BULK}"]


@pytest.mark.parametrize("cap", [0, -3])
def test_the_cap_is_at_least_one(cap: int) -> None:
    assert BulkGate(BULK, cap=cap).cap == 1


def test_a_worker_keeps_a_batch_of_threads_free_of_bulk_jobs() -> None:
    defaults = Settings(_env_file=None)
    assert defaults.resolved_worker_concurrency == 3 * defaults.batch_max_images == 24
    assert defaults.resolved_worker_bulk_held(24) == 16
    assert defaults.resolved_worker_bulk_held(4) == 2  # fewer threads than a batch: half of them
    assert defaults.resolved_worker_bulk_held(1) == 1
    chosen = Settings(_env_file=None, worker_concurrency=10, worker_bulk_held=3)
    assert (chosen.resolved_worker_concurrency, chosen.resolved_worker_bulk_held(10)) == (10, 3)
    with pytest.raises(ValidationError):
        Settings(_env_file=None, worker_bulk_held=0)

"""The micro-batcher: concurrent requests share one call; one bad request never fails its neighbours."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from worker.batcher import Batcher


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, requests: Sequence[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(requests))
        if self.fail_on is not None and self.fail_on in requests:
            raise ValueError(f"cannot handle {self.fail_on}")
        return [request * 10 for request in requests]


def run_concurrently(batcher: Batcher[int, int], values: list[int]) -> dict[int, object]:
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(values))

    def one(value: int) -> None:
        barrier.wait()
        try:
            results[value] = batcher.run(value, timeout_s=10)
        except Exception as exc:
            results[value] = exc

    threads = [threading.Thread(target=one, args=(value,)) for value in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_requests_are_gathered_up_to_the_batch_size() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder, max_images=4, wait_ms=300)
    results = run_concurrently(batcher, list(range(8)))
    assert results == {value: value * 10 for value in range(8)}
    assert sorted(len(batch) for batch in recorder.batches) == [4, 4]
    assert sorted(v for batch in recorder.batches for v in batch) == list(range(8))


def test_a_lone_request_does_not_wait_past_the_window() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder, max_images=64, wait_ms=0)
    assert batcher.run(3, timeout_s=5) == 30
    assert recorder.batches == [[3]]


def test_one_failing_request_fails_alone() -> None:
    recorder = Recorder(fail_on=2)
    batcher: Batcher[int, int] = Batcher(recorder, max_images=4, wait_ms=300)
    results = run_concurrently(batcher, [1, 2, 3, 4])
    assert isinstance(results[2], ValueError)
    assert {value: results[value] for value in (1, 3, 4)} == {1: 10, 3: 30, 4: 40}
    assert [2] in recorder.batches  # retried on its own after the batch failed


def test_timeout_while_waiting_raises_timeout_error() -> None:
    release = threading.Event()

    def slow(requests: Sequence[int]) -> list[int]:
        release.wait(5)
        return list(requests)

    batcher: Batcher[int, int] = Batcher(slow, max_images=1, wait_ms=0)
    with pytest.raises(TimeoutError):
        batcher.run(1, timeout_s=0.2)
    release.set()


def test_calls_run_on_the_model_thread_between_batches() -> None:
    threads: list[str] = []

    def run_batch(requests: Sequence[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return [request + 1 for request in requests]

    batcher: Batcher[int, int] = Batcher(run_batch, max_images=4, wait_ms=5)
    assert batcher.call(lambda: threading.current_thread().name) == "modtag-batcher"
    assert batcher.run(1, timeout_s=10) == 2
    assert threads == ["modtag-batcher"]
    with pytest.raises(KeyError, match="missing"):
        batcher.call(lambda: {}["missing"])
    assert batcher.run(2, timeout_s=10) == 3  # a failed call leaves the thread serving


def test_a_call_arriving_while_a_batch_gathers_runs_after_that_batch() -> None:
    order: list[str] = []
    gathering = threading.Event()

    def run_batch(requests: Sequence[int]) -> list[int]:
        order.append(f"batch {list(requests)}")
        return list(requests)

    batcher: Batcher[int, int] = Batcher(run_batch, max_images=8, wait_ms=300)
    first = batcher.submit(1)

    def call() -> None:
        order.append("call")

    caller = threading.Thread(target=lambda: (gathering.wait(), batcher.call(call)))
    caller.start()
    gathering.set()
    second = batcher.submit(2)
    assert first.result(timeout=10) == 1 and second.result(timeout=10) == 2
    caller.join(timeout=10)
    assert order == ["batch [1, 2]", "call"]


def test_close_runs_the_work_queued_before_it_then_ends_the_thread() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder, max_images=4, wait_ms=60_000)
    queued = [batcher.submit(value) for value in (1, 2)]
    batcher.close()  # the batch had not filled: closing lets it leave instead of waiting out the window
    assert [future.result(timeout=0) for future in queued] == [10, 20]
    assert recorder.batches == [[1, 2]]
    assert not batcher._thread.is_alive()


class Photo:
    """A request that can be watched being freed (a decoded image, in a worker)."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_the_model_thread_holds_no_request_once_it_answered() -> None:
    """Old code: the last batch's requests stayed referenced by the model thread until the next batch arrived, so a
    burst's decoded images outlived their jobs (and the budget's malloc_trim ran before they were freed)."""
    import weakref

    batcher: Batcher[Photo, int] = Batcher(lambda photos: [photo.value for photo in photos], max_images=4, wait_ms=0)
    try:
        for value in (1, 2):
            photo = Photo(value)
            freed = weakref.ref(photo)
            assert batcher.run(photo, timeout_s=10) == value
            del photo
            assert freed() is None, "the model thread still holds the request it answered"
    finally:
        batcher.close()


def test_interactive_requests_form_the_next_batch_alone_ahead_of_waiting_bulk_ones() -> None:
    recorder = Recorder()
    started, release = threading.Event(), threading.Event()

    def run_batch(requests: Sequence[int]) -> list[int]:
        if requests == [0]:
            started.set()
            release.wait(10)  # the batch in progress while the others arrive
        return recorder(requests)

    batcher: Batcher[int, int] = Batcher(run_batch, max_images=4, wait_ms=0)
    first = batcher.submit(0)
    assert started.wait(10)
    bulk = [batcher.submit(value, bulk=True) for value in range(100, 108)]
    live = batcher.submit(7)
    release.set()
    assert [future.result(timeout=10) for future in (first, live, *bulk)] == [0, 70, *range(1000, 1080, 10)]
    assert recorder.batches == [[0], [7], [100, 101, 102, 103], [104, 105, 106, 107]]


def test_a_live_request_arriving_while_a_bulk_batch_gathers_goes_first_and_alone() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder, max_images=2, wait_ms=60_000)
    bulk = batcher.submit(100, bulk=True)  # gathers for up to a minute: nothing else is bulk
    live = [batcher.submit(1), batcher.submit(2)]
    assert [future.result(timeout=10) for future in live] == [10, 20]
    batcher.close()  # the bulk batch runs before the thread ends, without waiting out its window
    assert bulk.result(timeout=10) == 1000
    assert recorder.batches == [[1, 2], [100]]

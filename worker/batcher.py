"""Micro-batching: concurrent jobs' images are gathered into one engine call.

Task threads decode and prepare their image, then `submit` it and wait; one model thread takes up to
`max_images` requests, or whatever arrived within `wait_ms` of the first, and runs them as a batch.
Decoding in the task threads overlaps with model compute in the model thread.

Requests come in two lanes. A `bulk` request (a backfill's) is batched only when no interactive one waits, and never
shares a batch with one: when a batch ends, the interactive requests that arrived meanwhile form the next batch
alone, however many bulk requests were there first. A live upload then waits for the batch in progress and its
own, not behind the bulk batches already decoded (the worker holds up to a batch of task threads back from the bulk
queue for it: worker/bulk_gate.py).

The model thread is the only thread that should run torch in a worker: `call` runs model loading and
warm-ups there too. On CPUs each thread that runs torch operators gets its own OpenMP thread team;
two teams on few cores make every parallel region wake sleeping threads instead of spinning ones
(a whole batch slower, its caption stage most, once another thread had run the model; figures in the README).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from core import metrics

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Output = TypeVar("Output")
Result = TypeVar("Result")


class _Call:
    """A function to run on the model thread (see Batcher.call), queued like a request."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.function = function


_STOP = object()  # queued by Batcher.close: the model thread ends when it reaches it


class Batcher(Generic[Request, Output]):
    """Runs `run_batch` on batches of submitted requests in one background thread."""

    def __init__(
        self, run_batch: Callable[[Sequence[Request]], list[Output]], *, max_images: int, wait_ms: float
    ) -> None:
        self._run_batch = run_batch
        self._max_images = max(1, max_images)
        self._wait_s = max(0.0, wait_ms) / 1000.0
        # (request, its future, bulk), a call or the stop mark, in arrival order; sorted into the lanes by the model
        # thread only.
        self._pending: queue.Queue[tuple[Any, Future[Any], bool]] = queue.Queue()
        self._interactive: deque[tuple[Request, Future[Output]]] = deque()
        self._bulk: deque[tuple[Request, Future[Output]]] = deque()
        self._calls: list[tuple[Any, Future[Any]]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="modtag-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request, *, bulk: bool = False) -> Future[Output]:
        """Queue `request` in its lane; its future."""
        future: Future[Output] = Future()
        self._pending.put((request, future, bulk))
        return future

    def run(self, request: Request, timeout_s: float | None = None, *, bulk: bool = False) -> Output:
        """Submit one request and wait for its output (raises what the batch raised for it)."""
        return self.submit(request, bulk=bulk).result(timeout=timeout_s)

    def call(self, function: Callable[[], Result]) -> Result:
        """Run `function` on the model thread, between batches, and return its result (or raise its error)."""
        return self.call_soon(function).result()

    def call_soon(self, function: Callable[[], Result]) -> Future[Result]:
        """Queue `function` to run on the model thread, between batches; its future, without waiting."""
        future: Future[Any] = Future()
        self._pending.put((_Call(function), future, False))
        return future

    def close(self) -> None:
        """End the model thread once the work queued before this call has run; later submissions never run."""
        self._pending.put((_STOP, Future(), False))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            if not (self._interactive or self._bulk or self._calls or self._stopping):
                self._sort(self._pending.get())
            self._sort_arrived()
            lane = self._interactive or self._bulk
            deadline = time.monotonic() + self._wait_s
            while lane and len(lane) < self._max_images and not self._stopping:
                remaining = deadline - time.monotonic()
                try:
                    self._sort(self._pending.get(timeout=remaining) if remaining > 0 else self._pending.get_nowait())
                except queue.Empty:
                    break
                if lane is self._bulk and self._interactive:
                    lane = self._interactive  # a live request arrived while a bulk batch gathered: it goes first
            batch = [lane.popleft() for _ in range(min(len(lane), self._max_images))]
            self._execute(batch)
            calls, self._calls = self._calls, []  # arrived while this batch gathered: run after it
            for call in calls:
                self._execute_call(call)
            if self._stopping and not (self._interactive or self._bulk):
                return

    def _sort_arrived(self) -> None:
        """Sort what has arrived so far into the lanes, without waiting (not past the stop mark)."""
        while not self._stopping:
            try:
                self._sort(self._pending.get_nowait())
            except queue.Empty:
                return

    def _sort(self, item: tuple[Any, Future[Any], bool]) -> None:
        work, future, bulk = item
        if work is _STOP:
            self._stopping = True
        elif isinstance(work, _Call):
            self._calls.append((work, future))
        else:
            (self._bulk if bulk else self._interactive).append((work, future))

    @staticmethod
    def _execute_call(item: tuple[Any, Future[Any]]) -> None:
        call, future = item
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call.function())
        except BaseException as exc:  # handed to the caller, whatever it is
            future.set_exception(exc)

    def _execute(self, batch: list[tuple[Request, Future[Output]]]) -> None:
        """Run the batch and answer each future; `batch` is emptied first, so that the model thread holds none of its
        requests (their decoded images) while it waits for the next one: a task thread that hands its image back
        after the answer frees it at once, and the worker's memory goes back down after a burst."""
        live = [(request, future) for request, future in batch if future.set_running_or_notify_cancel()]
        batch.clear()
        if not live:
            return
        metrics.BATCH_SIZE.observe(len(live))
        try:
            outputs = self._run_batch([request for request, _ in live])
        except Exception as exc:
            if len(live) == 1:
                live[0][1].set_exception(exc)
                return
            # One bad request must not fail its neighbours: run each alone to find it.
            log.warning("batch of %d failed (%s); retrying one by one", len(live), exc)
            for request, future in live:
                try:
                    future.set_result(self._run_batch([request])[0])
                except Exception as single_exc:
                    future.set_exception(single_exc)
            return
        futures = [future for _, future in live]
        live.clear()
        for future, output in zip(futures, outputs, strict=True):
            future.set_result(output)

"""How many bulk messages a worker holds at once: a live upload always finds a free task thread.

Celery reserves one message per free task thread and takes from the queues in priority order (core/broker.py): a bulk
message only while no interactive one waits. But a worker busy with a backfill has every thread on a bulk job, and a
live upload that arrives then waits in Redis until threads come free, behind the bulk batch in progress and the one
already decoded. The gate counts the bulk messages this worker holds (from their receipt by the consumer to the end of
their task) and, at `cap`, stops the consumer taking from the bulk queue; the first bulk task to end below it starts
it again. With `cap` = task threads minus a batch (the default), a batch of threads is always free for interactive
jobs, and the batcher (worker/batcher.py) runs them in the next batch, ahead of the bulk images already waiting.

Celery's own remote-control commands `cancel_consumer` and `add_consumer` do the same through the broker; the gate
calls the consumer's methods directly: on the consumer's thread, where the receipt is signalled (`task_received`),
and through `call_soon` from a task thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class BulkGate:
    """Pauses consuming `queue` while this worker holds `cap` of its messages."""

    def __init__(self, queue: str, cap: int) -> None:
        self.queue = queue
        self.cap = max(1, cap)
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._consumer: Any = None
        self._paused = False
        self._closed = False

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def paused(self) -> bool:
        return self._paused

    def reset(self, cap: int | None = None) -> None:
        """A new Celery worker in this process (a first start, or `supervise`'s restart): it consumes every queue."""
        with self._lock:
            self.cap = self.cap if cap is None else max(1, cap)
            self._held.clear()
            self._consumer = None
            self._paused = False
            self._closed = False

    def close(self) -> None:
        """The worker is shutting down: never start consuming again."""
        with self._lock:
            self._closed = True

    def received(self, consumer: Any, task_id: str, queue: str | None) -> None:
        """A message was reserved by `consumer` (on its thread): counted if it came from the bulk queue."""
        if queue != self.queue:
            return
        with self._lock:
            self._consumer = consumer
            self._held.add(task_id)
            pause = not self._paused and len(self._held) >= self.cap
            if pause:
                self._paused = True
        if pause:
            log.info("holding %d bulk jobs: bulk queue paused until one ends", len(self._held))
            try:
                consumer.cancel_task_queue(self.queue)
            except Exception as exc:  # the worker takes more bulk jobs than it should; nothing is lost
                log.warning("could not pause the bulk queue (%s)", exc)
                with self._lock:
                    self._paused = False

    def finished(self, task_id: str) -> None:
        """A task ended (any thread): a bulk one below the cap starts the bulk queue again."""
        with self._lock:
            if task_id not in self._held:
                return
            self._held.discard(task_id)
            resume = self._paused and not self._closed and len(self._held) < self.cap and self._consumer is not None
            consumer = self._consumer
            if resume:
                self._paused = False
        if resume:
            consumer.call_soon(self._resume, consumer)

    def _resume(self, consumer: Any) -> None:
        # On the consumer's thread. A broker error here is the consumer's to handle: it restarts its connection and
        # consumes from the queues selected, the bulk queue among them again (`add_task_queue` selects it first).
        with self._lock:
            if self._closed or self._paused:
                return
        log.info("bulk queue resumed")
        consumer.add_task_queue(self.queue)

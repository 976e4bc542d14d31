"""A worker-wide budget of decoded megapixels: a burst of huge images waits instead of exhausting memory.

Each task thread holds its image's pixels (width x height, read from the header before decoding) from decode
until inference is done. A decoded RGB image costs about 3 bytes per pixel, and the preprocessing makes more:
16 jobs of 36 MP took one worker from 0.8 to 4.9 GB. With `worker_decoded_megapixels` the threads past the budget
wait for pixels to be given back; an image larger than the whole budget waits until it is alone. A thread that
waits longer than `timeout_s` gives up with a transient error, so the job is retried later, not failed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from core.errors import TransientError


class PixelBudget:
    """At most `total` decoded pixels held at once by this process's jobs."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self.waiting = 0  # threads waiting for pixels (for tests and debugging)
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, timeout_s: float) -> Iterator[None]:
        """Hold `pixels` (at most the whole budget) for the wrapped decode and inference."""
        wanted = min(pixels, self.total)
        with self._changed:
            self.waiting += 1
            try:
                granted = self._changed.wait_for(lambda: self.held + wanted <= self.total, timeout=timeout_s)
            finally:
                self.waiting -= 1
            if not granted:
                raise TransientError(
                    f"the worker's decoded-image budget ({self.total / 1e6:g} MP, MODTAG_WORKER_DECODED_MEGAPIXELS) "
                    f"stayed full for {timeout_s:g} s",
                    code="worker_busy",
                )
            self.held += wanted
        try:
            yield
        finally:
            with self._changed:
                self.held -= wanted
                self._changed.notify_all()

"""A worker-wide budget of decoded pixel bytes: a burst of huge images waits instead of exhausting memory.

Each task thread holds its image's pixels from decode until inference is done, counted in the bytes Pillow
actually allocates for them (`pixel_bytes`: 1 per pixel for grey or palette, 2 for 16-bit grey, 4 for RGB,
which Pillow pads to 32 bits, RGBA, CMYK, 32-bit integer and float). Before decoding, the mode is unknown and
the decoder holds the source and its RGB copy at once, so a thread first holds `decode_peak_bytes` (the widest
source plus the RGB result) and, once decoded, settles to what the RGB image it keeps really holds. With
MODTAG_WORKER_DECODED_BYTES (or the deprecated MODTAG_WORKER_DECODED_MEGAPIXELS, read as 3 bytes per pixel) the
threads past the budget wait; an image larger than the whole budget waits until it is alone. A thread that waits
longer than `timeout_s` gives up with a transient error, so the job is retried later, not failed.

When the budget goes idle (nothing held), freed memory is handed back to the operating system (glibc's
`malloc_trim`): Pillow's 16 MB blocks are freed into malloc's arenas, which otherwise keep a burst's peak for good;
`limit_malloc_arenas` keeps the task threads from each keeping an arena of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from core.errors import TransientError

# Bytes per pixel of Pillow's storage by mode; every mode not listed is stored in 32 bits.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_WIDEST_PIXEL = 4
_RGB_PIXEL = 4


def pixel_bytes(width: int, height: int, mode: str) -> int:
    """What Pillow allocates for a `mode` image of `width` x `height`."""
    return width * height * _PIXEL_BYTES.get(mode, _WIDEST_PIXEL)


def decode_peak_bytes(width: int, height: int) -> int:
    """The most a decode to RGB holds at once, whatever the source's mode: the source and its RGB copy."""
    return width * height * (_WIDEST_PIXEL + _RGB_PIXEL)


class Hold:
    """Bytes one thread holds in the budget; `settle` gives back what it no longer needs."""

    def __init__(self, budget: PixelBudget, held: int) -> None:
        self._budget = budget
        self.held = held

    def settle(self, needed: int) -> None:
        """Keep only `needed` bytes (never more than held): the rest goes back to waiting threads at once."""
        needed = min(needed, self.held)
        self._budget._give_back(self.held - needed)
        self.held = needed


class PixelBudget:
    """At most `total` bytes of decoded pixels held at once by this process's jobs."""

    def __init__(self, total: int, *, on_idle: Callable[[], None] | None = None) -> None:
        self.total = total
        self.held = 0
        self.waiting = 0  # threads waiting for room (for tests and debugging)
        self._changed = threading.Condition()
        self._on_idle = release_freed_memory if on_idle is None else on_idle

    @contextmanager
    def hold(self, size: int, timeout_s: float) -> Iterator[Hold]:
        """Hold `size` bytes (at most the whole budget) for the wrapped decode and inference."""
        wanted = min(size, self.total)
        with self._changed:
            self.waiting += 1
            try:
                granted = self._changed.wait_for(lambda: self.held + wanted <= self.total, timeout=timeout_s)
            finally:
                self.waiting -= 1
            if not granted:
                raise TransientError(
                    f"the worker's decoded-image budget ({self.total / 1e6:g} MB, MODTAG_WORKER_DECODED_BYTES) "
                    f"stayed full for {timeout_s:g} s",
                    code="worker_busy",
                )
            self.held += wanted
        hold = Hold(self, wanted)
        try:
            yield hold
        finally:
            hold.settle(0)

    def _give_back(self, size: int) -> None:
        if size <= 0:
            return
        with self._changed:
            self.held -= size
            idle = self.held == 0 and self.waiting == 0
            self._changed.notify_all()
        if idle:
            self._on_idle()


def release_freed_memory() -> None:
    """Return the free pages of malloc's arenas to the operating system (glibc only; elsewhere nothing)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def limit_malloc_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas for the threads this process starts from now on (glibc's M_ARENA_MAX; 0 keeps
    glibc's default of eight per core); whether it was applied.

    glibc gives each new thread an arena of its own, up to eight per core: a burst over a worker's task threads left
    each of them an arena that `malloc_trim` could not empty (the long-lived small objects the threads left there
    pin its pages), about 45 MB resident apiece. Call it before the threads start (model loading, the pool)."""
    if _libc is None or arenas <= 0:
        return False
    return bool(_libc.mallopt(_M_ARENA_MAX, arenas))


_M_ARENA_MAX = -8  # glibc's malloc.h


def _load_glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]  # both absent from musl and macOS: AttributeError
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_glibc()

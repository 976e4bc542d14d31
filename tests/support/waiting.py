"""Waiting on a condition with a deadline: tests never sleep on a fixed interval hoping a thing happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.05


def wait_for(condition: Callable[[], T], timeout_s: float = 30, what: str = "condition") -> T:
    """Call `condition` until it returns something truthy, and return that; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g} s")
        time.sleep(POLL_S)

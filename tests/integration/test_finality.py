"""Final-state notices on a real Redis: a notice wakes the waiter at once, other notices do not, and with Redis down
the waiter falls back to its rechecks and the worker's publish neither raises nor hangs."""

from __future__ import annotations

import asyncio

from core.finality import FinalNotices, FinalWaiter, job_subject, listing_subject
from modtag.servers import free_port

LONG_S = 60.0  # a recheck interval no test waits out: only a notice can end these waits early


def test_a_notice_wakes_the_waiter_without_waiting_for_a_recheck(redis_url: str) -> None:
    waiter, notices = FinalWaiter(redis_url), FinalNotices(redis_url)
    decided = {"done": False}
    reads = {"count": 0}

    async def is_final() -> bool:
        reads["count"] += 1
        return decided["done"]

    async def scenario() -> bool:
        waiting = asyncio.create_task(waiter.until(job_subject("j1"), is_final, timeout_s=LONG_S / 2, recheck_s=LONG_S))
        while reads["count"] == 0:  # the first read found it pending
            await asyncio.wait({waiting}, timeout=0.01)
        decided["done"] = True
        # Published until the waiter has it: the first may go out before it subscribed (its recheck covers that
        # in production; here the recheck is longer than the wait, so only a notice can end it).
        while not waiting.done():
            notices.job_final("j1", "l1")
            await asyncio.wait({waiting}, timeout=0.05)
        return waiting.result()

    assert asyncio.run(scenario()) is True
    assert reads["count"] >= 2  # the first read, then one per notice that woke it


def test_notices_of_other_records_do_not_end_the_wait(redis_url: str) -> None:
    waiter, notices = FinalWaiter(redis_url), FinalNotices(redis_url)

    async def never() -> bool:
        return False

    async def scenario() -> bool:
        waiting = asyncio.create_task(waiter.until(listing_subject("mine"), never, timeout_s=0.5, recheck_s=LONG_S))
        while not waiting.done():
            notices.job_final("other", "not-mine")
            await asyncio.wait({waiting}, timeout=0.05)
        return waiting.result()

    assert asyncio.run(scenario()) is False


def test_with_redis_down_the_waiter_polls_and_the_worker_publishes_nothing_without_failing() -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    FinalNotices(down).job_final("j1", "l1")  # logged once, never raised
    waiter = FinalWaiter(down)
    reads = {"count": 0}

    async def third_read_final() -> bool:
        reads["count"] += 1
        return reads["count"] >= 3

    assert asyncio.run(waiter.until(job_subject("j1"), third_read_final, timeout_s=LONG_S, recheck_s=0.05)) is True
    assert reads["count"] == 3

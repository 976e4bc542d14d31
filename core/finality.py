"""Final-state notices: a worker says on Redis when a job or listing reached a final state; the API's moderate-now
calls (`Prefer: wait=N`) wait on them.

A notice is only a hint to look again: the database stays the truth. A waiter reads the record from the database
when a notice names it and, besides, every `recheck_s`, so a notice lost (published while the waiter subscribed,
Redis restarted, Redis down) costs at most one recheck interval, and no waiter holds a database connection between
two reads. Notices go on one channel (`CHANNEL`) as `job:<id>` or `listing:<id>`; each API process listens with one
connection, and only while at least one of its requests waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "modtag:final"
PUBLISH_TIMEOUT_S = 1.0  # a worker never waits longer than this on a notice: the waiters' rechecks cover a lost one
RETRY_LISTEN_MAX_S = 5.0  # the longest pause between two attempts to subscribe while Redis is down
SUBSCRIBE_WAIT_S = 0.25  # how long a waiter waits for the subscription before its first read (Redis down: once)


def job_subject(job_id: str) -> str:
    return f"job:{job_id}"


def listing_subject(listing_id: str) -> str:
    return f"listing:{listing_id}"


class FinalNotices:
    """The worker's side: publish that a job (and its listing, if any) reached a final state. Never raises."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._client: Any = None
        self._failing = False

    def job_final(self, job_id: str, listing_id: str | None = None) -> None:
        subjects = [job_subject(job_id)] + ([listing_subject(listing_id)] if listing_id else [])
        try:
            client = self._connection()
            for subject in subjects:
                client.publish(CHANNEL, subject)
            if self._failing:
                self._failing = False
                log.info("final-state notices published again")
        except Exception as exc:  # a waiter rereads the database anyway: a lost notice only delays its answer
            if not self._failing:
                self._failing = True
                log.warning("could not publish a final-state notice (%s); moderate-now calls fall back to polling", exc)

    def _connection(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self._url, socket_timeout=PUBLISH_TIMEOUT_S, socket_connect_timeout=PUBLISH_TIMEOUT_S
            )
        return self._client


class FinalWaiter:
    """The API's side: `until` waits for a record to be final, woken by notices, rechecking the database.

    One per API process (its event loop); it subscribes when the first request waits and unsubscribes when the
    last one is answered."""

    def __init__(self, redis_url: str, *, connect_timeout_s: float = 1.0) -> None:
        self._url = redis_url
        self._connect_timeout_s = connect_timeout_s
        self._events: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down = False

    async def until(
        self, subject: str, is_final: Callable[[], Awaitable[bool]], *, timeout_s: float, recheck_s: float
    ) -> bool:
        """True as soon as `is_final()` is, read when a notice names `subject` and every `recheck_s`; False once
        `timeout_s` passed without it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        event = self._register(subject, loop)
        try:
            # Subscribed before the first read, so a notice published after that read is not missed; a Redis that
            # does not answer in time leaves this call to its rechecks.
            with contextlib.suppress(TimeoutError):
                wait_s = min(SUBSCRIBE_WAIT_S, recheck_s, deadline - loop.time())
                await asyncio.wait_for(self._subscribed.wait(), max(0.0, wait_s))
            while True:
                event.clear()  # before the read: a notice that arrives during it wakes the next wait at once
                if await is_final():
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(recheck_s, remaining))
        finally:
            self._unregister(subject, event)

    def _register(self, subject: str, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        if self._loop is not loop:  # a new event loop (an app served again): nothing of the old one carries over
            self._loop, self._events, self._listener, self._subscribed = loop, {}, None, asyncio.Event()
        event = asyncio.Event()
        self._events.setdefault(subject, set()).add(event)
        if self._listener is None or self._listener.done():
            self._subscribed.clear()
            self._listener = loop.create_task(self._listen(), name="modtag-final-notices")
        return event

    def _unregister(self, subject: str, event: asyncio.Event) -> None:
        waiting = self._events.get(subject)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._events[subject]
        if not self._events and self._listener is not None:
            self._listener.cancel()
            self._listener = None
            self._subscribed.clear()

    async def _listen(self) -> None:
        """Subscribe and wake the waiters each notice names, until cancelled; Redis down: try again, waiting longer."""
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        pause = 0.1
        while True:
            # The health check pings a quiet subscription now and then: a connection that died without a word is
            # noticed and made again, instead of leaving the waiters to their rechecks for good.
            client = aioredis.Redis.from_url(
                self._url, socket_connect_timeout=self._connect_timeout_s, health_check_interval=30
            )
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self._subscribed.set()
                    if self._down:
                        self._down = False
                        log.info("final-state notices: Redis reachable again")
                    pause = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._wake(message.get("data"))
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                if not self._down:
                    self._down = True
                    log.warning("final-state notices: Redis unreachable (%s); moderate-now calls poll", exc)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(pause)
            pause = min(RETRY_LISTEN_MAX_S, pause * 2)

    def _wake(self, data: object) -> None:
        subject = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        for event in self._events.get(subject, ()):
            event.set()

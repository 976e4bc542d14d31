"""What this process last saw of each shared dependency (database, blob store, broker), and how long to wait for one.

An outage of a dependency fails every job that needs it at once, for a reason none of those jobs has: it is
waited out, never counted as a job's attempt (worker/lifecycle.py). Whoever meets a dependency (the worker's
job path, its lease renewer, its webhook sender) reports here. The first failure logs one WARNING
(`blob store unreachable: <reason>`), the first success after it one INFO with the outage's duration, and
`modtag_dependency_up{dependency}` is 0 in between: one line per outage and process, not a traceback per try.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from core import metrics
from core.errors import DependencyUnavailable

log = logging.getLogger(__name__)

# The first wait after an outage is seen: short, since most blips (a failover, a restarted pod) last seconds.
OUTAGE_FIRST_WAIT_S = 1.0


class Dependency(StrEnum):
    """The shared services a worker cannot do without; the value is the metric's label and the error's prefix."""

    DATABASE = "database"
    BLOB_STORE = "blob_store"
    BROKER = "broker"


def outage_of(exc: BaseException) -> DependencyUnavailable | None:
    """The dependency outage `exc` stands for, or None when it is something else (the job's own error, a bug).

    The database is down when the driver cannot talk to it (OperationalError, InterfaceError, an invalidated
    connection, a pool that waited past its timeout); a constraint or a bad statement is an answer, not an outage.
    """
    if isinstance(exc, DependencyUnavailable):
        return exc
    from sqlalchemy import exc as db

    if isinstance(exc, db.OperationalError | db.InterfaceError | db.TimeoutError) or (
        isinstance(exc, db.DBAPIError) and exc.connection_invalidated
    ):
        return DependencyUnavailable(Dependency.DATABASE, _reason(exc))
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, RedisConnectionError | RedisTimeoutError | KombuOperationalError):
        return DependencyUnavailable(Dependency.BROKER, _reason(exc))
    return None


def outage_delay(waits: int, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before the `waits`-th try (1, 2, ...) during an outage: capped exponential, full jitter.

    Uniform in [0, min(cap_s, 1 s x 2^(waits-1))]: the jobs handed back in one outage spread out over the
    window instead of returning together, and none waits more than `cap_s` however long the outage lasts.
    """
    ceiling = min(cap_s, OUTAGE_FIRST_WAIT_S * 2.0 ** min(max(waits, 1) - 1, 62))
    return ceiling * rand()


@dataclass
class _Outage:
    since: float
    reason: str


class DependencyRecord:
    """Each dependency's state in this process: up, or down since when and why. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, gauge: Any = metrics.DEPENDENCY_UP) -> None:
        self._clock = clock
        self._gauge = gauge
        self._outages: dict[str, _Outage] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def is_up(self, dependency: str) -> bool:
        with self._lock:
            return dependency not in self._outages

    def failed(self, outage: DependencyUnavailable) -> bool:
        """The dependency could not be reached; True when this starts an outage (and logged its one line)."""
        with self._lock:
            self._seen.add(outage.dependency)
            if outage.dependency in self._outages:
                return False
            self._outages[outage.dependency] = _Outage(self._clock(), outage.reason)
            self._gauge.labels(outage.dependency).set(0)
        log.warning("%s unreachable: %s", _named(outage.dependency), outage.reason)
        return True

    def succeeded(self, dependency: str) -> float | None:
        """The dependency answered; the outage's length in seconds when this ends one (and logged its line)."""
        with self._lock:
            first = dependency not in self._seen
            self._seen.add(dependency)
            outage = self._outages.pop(dependency, None)
            if outage is None and not first:
                return None  # the common case: up before, up now
            self._gauge.labels(dependency).set(1)
            if outage is None:
                return None
            duration = self._clock() - outage.since
        log.info("%s reachable again after %.1f s (down: %s)", _named(dependency), duration, outage.reason)
        return duration

    @contextmanager
    def watch(self, dependency: str) -> Iterator[None]:
        """Report the block's outcome for `dependency`: success, or an outage raised as DependencyUnavailable.

        Other errors (of another dependency, of the job, a bug) pass through unreported: they say nothing
        about whether this dependency answered.
        """
        try:
            yield
        except Exception as exc:
            outage = outage_of(exc)
            if outage is None or outage.dependency != dependency:
                raise
            self.failed(outage)
            if outage is exc:
                raise
            raise outage from exc
        self.succeeded(dependency)


# The process's record: every dependency client in it reports here, so an outage logs once per process.
RECORD = DependencyRecord()


def _named(dependency: str) -> str:
    return dependency.replace("_", " ")


def _reason(exc: BaseException) -> str:
    """The exception's class and the first line of its message (drivers append SQL and parameters below it)."""
    cause = getattr(exc, "orig", None) or exc
    first_line = next(iter(str(cause).strip().splitlines()), "")
    return f"{type(cause).__name__}: {first_line[:200]}" if first_line else type(cause).__name__

"""Moderate now: `Prefer: wait=N` (RFC 7240) on a submission holds the answer until the decision, at most N seconds.

Decided in time, the answer is 200 with the record as `GET` shows it; otherwise the usual 202 (or the replay's
200). Either way `Preference-Applied: wait=N` says the wait that was honoured (N capped by
MODTAG_MAX_PREFER_WAIT_S). The wait runs on the event loop without a database connection: it is woken by the
worker's notice in Redis (core/finality.py) and reads the record, each time in a short session of its own, when
woken and every MODTAG_PREFER_WAIT_RECHECK_S.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request, status
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.deps import new_session
from api.submissions import Intake
from core.finality import FinalWaiter

Body = TypeVar("Body")
MAX_PREFERENCES = 32  # of a Prefer header, the first this many are read: a header of thousands is not parsed whole
_MAX_WAIT_DIGITS = 12  # `wait=` with more digits than this is capped like any other large value


@dataclass(frozen=True)
class Preferences:
    """What the request's `Prefer` headers ask of a submission: a wait in seconds (None: none asked)."""

    wait_s: int | None = None
    respond_async: bool = False

    def wait_within(self, cap_s: float) -> int | None:
        """The wait honoured under the cap, in whole seconds; None when none was asked or the cap is 0 (off)."""
        if self.wait_s is None or cap_s <= 0:
            return None
        return min(self.wait_s, math.floor(cap_s))


def parse_prefer(values: list[str]) -> Preferences:
    """The preferences of `Prefer` header values (RFC 7240): `wait=<delta-seconds>` and `respond-async`.

    Names are case-insensitive, a value may be quoted, parameters after `;` are ignored, and only the first
    instance of a preference counts (RFC 7240 section 2). Anything unreadable (a negative, fractional or non-numeric
    wait, stray characters) is ignored, as the RFC asks of preferences a server does not understand."""
    wait_s: int | None = None
    seen_wait = False
    respond_async = False
    for preference in _preferences(values):
        name, _, value = preference.partition(";")[0].partition("=")
        name = name.strip().lower()
        if name == "respond-async" and not value.strip():
            respond_async = True
        elif name == "wait" and not seen_wait:
            seen_wait = True
            wait_s = _delta_seconds(value.strip().strip('"'))
    return Preferences(wait_s=wait_s, respond_async=respond_async)


def read_preferences(
    request: Request,
    prefer: Annotated[
        str | None,
        Header(
            alias="Prefer",
            description="`wait=N` (RFC 7240): answer 200 with the decided record if it is decided within N seconds "
            "(at most MODTAG_MAX_PREFER_WAIT_S), else 202 as without it; `Preference-Applied` says the wait honoured.",
        ),
    ] = None,
) -> Preferences:
    """The request's `Prefer` headers (each of several); documented as one."""
    return parse_prefer(request.headers.getlist("prefer")) if prefer is not None else Preferences()


PreferencesDep = Annotated[Preferences, Depends(read_preferences)]


async def wait_for_final(
    intake: Intake,
    preferences: Preferences,
    wait_s: int,
    subject: str,
    read: Callable[[Session], tuple[bool, Body]],
    waiter: FinalWaiter,
) -> Body:
    """The body `read` gives (with whether the record is final) once the record is final or `wait_s` ran out;
    200 when final in time, else the status the submission had (202 new, 200 replayed); `Preference-Applied`."""
    settings = intake.services.settings
    # Nothing of the request's session stays open while waiting: each read below has a session of its own.
    await run_in_threadpool(intake.session.close)
    last: list[tuple[bool, Body]] = []

    def read_once() -> bool:
        with new_session(settings) as session:
            last[:] = [read(session)]
        return last[0][0]

    async def is_final() -> bool:
        return await run_in_threadpool(read_once)

    final = await waiter.until(subject, is_final, timeout_s=wait_s, recheck_s=settings.prefer_wait_recheck_s)
    applied = [f"wait={wait_s}"]
    if final:
        intake.response.status_code = status.HTTP_200_OK
    elif preferences.respond_async:
        applied.insert(0, "respond-async")
    intake.response.headers["Preference-Applied"] = ", ".join(applied)
    return last[0][1]


def final_waiter(request: Request) -> FinalWaiter:
    """The app's waiter (one per API process), made on first use."""
    state = request.app.state
    waiter: FinalWaiter | None = getattr(state, "final_waiter", None)
    if waiter is None:
        waiter = state.final_waiter = FinalWaiter(state.settings.redis_url)
    return waiter


FinalWaiterDep = Annotated[FinalWaiter, Depends(final_waiter)]


def _preferences(values: list[str]) -> Iterator[str]:
    """The comma-separated preferences of the header values, commas inside quotes kept; at most MAX_PREFERENCES."""
    count = 0
    for value in values:
        current: list[str] = []
        quoted = False
        for char in value:
            if char == '"':
                quoted = not quoted
            if char == "," and not quoted:
                yield "".join(current)
                count += 1
                if count >= MAX_PREFERENCES:
                    return
                current = []
            else:
                current.append(char)
        yield "".join(current)
        count += 1
        if count >= MAX_PREFERENCES:
            return


def _delta_seconds(text: str) -> int | None:
    """RFC 7234's delta-seconds: digits only; a huge number stays huge (the cap applies later)."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text[:_MAX_WAIT_DIGITS]) if len(text) <= _MAX_WAIT_DIGITS else 10**_MAX_WAIT_DIGITS

"""Moments as people type them: ISO 8601 or an age (`7d`, `12h`), read alike by the CLI and the API."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from core.tables import as_utc

_RELATIVE = re.compile(r"^(\d{1,6})\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A moment: ISO 8601 (`2026-11-01`, `2026-11-01T12:00:00+00:00`, naive means UTC) or an age (`7d`, `12h`).

    Raises ValueError with what is accepted.
    """
    text = text.strip()
    relative = _RELATIVE.match(text.lower())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        try:
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
        except OverflowError:
            raise ValueError(f"{text!r} is not a date: it reaches before year 1") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date: use ISO 8601 (2026-11-01 or 2026-11-01T12:00:00Z) or an age such as 7d, 12h, 30m"
        ) from None
    return as_utc(moment)

"""Flood protection for banks: a banked hash that matches more than a set share of a tenant's uploads of the day.

One banked item matching a large share of uploads usually means the bank holds something common (a blank frame,
a platform's own watermark, a meme everyone posts) rather than a real wave of copies of one bad image; either way a
person should look before it blocks (or, on an allow-list, lets through) a good part of the day's traffic.

The worker counts, per tenant and UTC day, the images it looked up in banks and each item's matches, in Redis, so
the whole fleet counts together (keys expire after two days). When an item has at least
MODTAG_BANK_FLOOD_MIN_MATCHES matches and they are more than MODTAG_BANK_FLOOD_SHARE of the day's lookups, it
counts one warning in modtag_bank_flood_warnings_total{tenant, bank_kind} (once per item and day: no item label)
and logs the tenant, bank and item. The ModtagBankFlood alert and deploy/RUNBOOK.md take it from there.

Counting never fails or delays a job: on a Redis error this image is not counted, and the error is logged once
until Redis answers again (a Redis outage is the broker's, waited out there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

import redis

from core import metrics
from core.hashes import BankMatch
from core.tables import utcnow

log = logging.getLogger(__name__)
_KEEP_S = 2 * 24 * 3600  # a day's counts outlive the day, so a late image of it still counts against it


class FloodWatch:
    """Counts a tenant's bank lookups and matches per day, and warns once per item that floods."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        share: float,
        min_matches: int,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.client = client
        self.share = share
        self.min_matches = min_matches
        self.clock = clock
        self._failing = False

    def observe(self, tenant: str, matches: Iterable[BankMatch]) -> list[BankMatch]:
        """Count one image looked up in the tenant's banks and the items it matched; the matches whose item is now
        flooding for the first time today (each already counted in the metric and logged)."""
        matched = {match.item: match for match in matches if match.item is not None}
        prefix = f"modtag:bankflood:{self.clock().date().isoformat()}:{tenant}"
        try:
            pipe = self.client.pipeline()
            pipe.incr(f"{prefix}:lookups")
            pipe.expire(f"{prefix}:lookups", _KEEP_S)
            for item in matched:
                pipe.incr(f"{prefix}:item:{item}")
                pipe.expire(f"{prefix}:item:{item}", _KEEP_S)
            counts = pipe.execute()
            lookups = int(counts[0])
            flooding = [
                (match, int(count))
                for match, count in zip(matched.values(), counts[2::2], strict=True)
                if int(count) >= self.min_matches and int(count) > self.share * lookups
            ]
            fresh = [
                (match, count)
                for match, count in flooding
                if self.client.set(f"{prefix}:warned:{match.item}", 1, nx=True, ex=_KEEP_S)
            ]
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("bank flood counts skipped: Redis did not answer (%s)", exc)
            self._failing = True
            return []
        self._failing = False
        for match, count in fresh:
            metrics.BANK_FLOOD_WARNINGS.labels(tenant, match.kind).inc()
            log.warning(
                "bank flood: item %s of %s bank %r matched %d of tenant %r's %d images looked up today (over %g%%)",
                match.item,
                match.kind,
                match.bank,
                count,
                tenant,
                lookups,
                self.share * 100,
            )
        return [match for match, _ in fresh]

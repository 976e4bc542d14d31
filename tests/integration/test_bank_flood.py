"""Flood protection (core/bankflood.py) on a real Redis, with the clock injected: a banked hash matching more than
the set share of a tenant's images of the day warns once, per tenant and per day, and a Redis that does not answer
costs the count, never the job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis
from prometheus_client import REGISTRY

from core.bankflood import FloodWatch
from core.hashes import BankMatch

pytestmark = pytest.mark.timeout(60)
NO_MATCH = BankMatch("known_bad")
COMMON = BankMatch("known_bad", item="common-item", distance=4, by="pdq")


def warnings(tenant: str, kind: str = "block") -> float:
    value = REGISTRY.get_sample_value("modtag_bank_flood_warnings_total", {"tenant": tenant, "bank_kind": kind})
    return value or 0.0


def test_a_hash_matching_a_large_share_of_the_day_warns_once(redis_url: str) -> None:
    now = [datetime(2026, 12, 6, 9, tzinfo=UTC)]
    watch = FloodWatch(redis.Redis.from_url(redis_url), share=0.2, min_matches=3, clock=lambda: now[0])
    before = warnings("acme")
    for _ in range(10):
        assert watch.observe("acme", [NO_MATCH]) == []
    assert watch.observe("acme", [COMMON]) == [] and watch.observe("acme", [COMMON]) == []  # under the minimum
    assert watch.observe("acme", [COMMON, COMMON]) == [COMMON]  # 3 of 13 images: over 20 %
    assert warnings("acme") == before + 1
    assert watch.observe("acme", [COMMON]) == []  # once a day
    assert warnings("acme") == before + 1

    # Another tenant's day is its own: 3 matches of 20 images is 15 %, under the share.
    for _ in range(17):
        watch.observe("globex", [NO_MATCH])
    assert [watch.observe("globex", [COMMON]) for _ in range(3)] == [[], [], []]

    # The next day counts afresh, and an allow-list item floods the same way.
    now[0] += timedelta(days=1)
    allowed = BankMatch("our_logos", item="logo", distance=0, by="sha256", kind="allow")
    assert [watch.observe("acme", [allowed]) for _ in range(3)] == [[], [], [allowed]]
    assert warnings("acme", "allow") >= 1


def test_an_unreachable_redis_skips_the_count() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, socket_timeout=1)
    watch = FloodWatch(client, share=0.01, min_matches=1)
    assert watch.observe("acme", [COMMON]) == []
    assert watch.observe("acme", [COMMON]) == []

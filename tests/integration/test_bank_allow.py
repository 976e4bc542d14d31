"""Allow-list banks through real processes: an image on an allow-list is not blocked by a block bank that matches
it (the worker's `hash` checks say so in the evidence), a copy that is not on the list still is, and the worker
counts the matches for flood protection in the fleet's Redis."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
import redis

from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import near_copy, photo_bytes

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_an_allow_listed_image_is_not_blocked_by_a_matching_bad_bank(deployment: Deployment) -> None:
    deployment.start_api()
    deployment.start_worker(MODTAG_BANK_FLOOD_MIN_MATCHES="2", MODTAG_BANK_FLOOD_SHARE="0.5")
    client = deployment.client
    assert client.create_bank("known_bad").status == 201
    banked = client.post("/v1/banks/known_bad/items", files={"image": ("a.jpg", photo_bytes("astronaut"))}).json()
    # The platform's own press copy of the photo is fine: its exact bytes go on an allow-list.
    press_copy = near_copy("astronaut")
    assert client.create_bank("press_kit", kind="allow").status == 201
    allowed_item = client.post(
        "/v1/banks/press_kit/items", json={"sha256": hashlib.sha256(press_copy).hexdigest(), "note": "our press kit"}
    ).json()

    job = wait_final(deployment, submit(deployment, press_copy)["id"])
    decision = job["decision"]
    assert job["status"] == "done" and decision["categories"]["known_bad"]["score"] == 0, decision
    assert not decision["categories"]["known_bad"]["fired"]
    [entry] = [e for e in decision["evidence"] if e["kind"] == "hash"]
    assert (entry["score"], entry["matched"], entry["field"]) == (0.0, banked["id"], "pdq")
    assert entry["seen"] == f"press_kit/{allowed_item['id']}" and entry["scores"]["distance"] > 0
    assert decision["models"] != {}  # not decided by the bank: the models judged it

    # Another re-upload of the same photo is not on the allow-list: the bad bank blocks it, before any model.
    other = wait_final(deployment, submit(deployment, near_copy("astronaut", scale=0.8, quality=60))["id"])
    assert other["decision"]["action"] == "block" and other["decision"]["models"] == {}
    [blocked] = other["decision"]["evidence"]
    assert blocked["score"] == 1.0 and blocked["seen"] is None

    # Two images, both matching the one banked item: over 50 % of the day with 2 matches, a flood.
    day = datetime.now(UTC).date().isoformat()
    fleet_redis = redis.Redis.from_url(deployment.env["MODTAG_REDIS_URL"])
    assert fleet_redis.get(f"modtag:bankflood:{day}:default:item:{banked['id']}") == b"2"
    assert fleet_redis.exists(f"modtag:bankflood:{day}:default:warned:{banked['id']}")

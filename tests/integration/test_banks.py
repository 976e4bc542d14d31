"""Known content through real processes: hash banks block copies before the models, decisions are reused for the
same bytes, and erasure and retention remove images (a shared blob only when no job uses it)."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest

from core.auth import create_key
from core.blobs import LocalBlobStore
from core.db import session_scope
from core.erasure import sweep_retention
from core.errors import NotFound
from core.principals import cli_principal
from core.tables import utcnow
from modtag.client import ApiClient
from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import near_copy, photo_bytes

pytestmark = pytest.mark.timeout(300)


def blob_exists(deployment: Deployment, key: str) -> bool:
    try:
        LocalBlobStore(Path(deployment.env["MODTAG_DATA_DIR"]) / "blobs").get(key)
    except NotFound:
        return False
    return True


def test_banks_reuse_erasure_and_retention(deployment: Deployment) -> None:
    deployment.start_api()
    deployment.start_worker()
    client = deployment.client
    assert client.create_bank("known_bad", "copies of images we removed").status == 201
    banked = client.post("/v1/banks/known_bad/items", files={"image": ("a.jpg", photo_bytes("astronaut"))})
    assert banked.status_code == 201, banked.text
    item = banked.json()
    assert item["pdq_quality"] >= 50 and len(item["pdq"]) == 64
    chelsea = photo_bytes("chelsea")
    exact = client.post("/v1/banks/known_bad/items", json={"sha256": hashlib.sha256(chelsea).hexdigest()})
    assert exact.status_code == 201, exact.text
    [bank] = client.get("/v1/banks").json()["data"]
    assert (bank["name"], bank["description"], bank["items"]) == ("known_bad", "copies of images we removed", 2)

    # A near copy is blocked by PDQ, and no model ran: only the bank's category, no model described.
    copy = wait_final(deployment, submit(deployment, near_copy("astronaut"))["id"])
    decision = copy["decision"]
    assert decision["action"] == "block" and set(decision["categories"]) == {"known_bad"}, decision
    [evidence] = decision["evidence"]
    assert evidence["kind"] == "hash" and evidence["query"] == "known_bad" and evidence["matched"] == item["id"]
    assert evidence["field"] == "pdq" and 0 < evidence["scores"]["distance"] <= 31
    assert decision["models"] == {} and "PDQ distance" in decision["reason"]
    assert copy["hashes"]["pdq_quality"] >= 50

    # The same bytes match exactly by SHA-256.
    same = wait_final(deployment, submit(deployment, chelsea)["id"])["decision"]
    assert same["action"] == "block" and same["evidence"][0]["field"] == "sha256"
    assert same["evidence"][0]["scores"]["distance"] == 0

    # An unrelated photo is judged by the models; its second upload reuses that decision.
    coffee = photo_bytes("coffee")
    first = wait_final(deployment, submit(deployment, coffee)["id"])
    assert first["decision"]["categories"]["known_bad"]["score"] == 0
    assert {e["kind"] for e in first["decision"]["evidence"]} >= {"hash", "probe", "match", "caption"}
    assert first["decision"]["reused_from"] is None
    second = wait_final(deployment, submit(deployment, coffee)["id"])
    assert second["decision"]["reused_from"] == first["id"]
    assert second["decision"]["categories"] == first["decision"]["categories"]

    # Another tenant's jobs never match this tenant's bank.
    with session_scope(deployment.env["MODTAG_DATABASE_URL"]) as session:
        _, other_key = create_key(session, role="submit", tenant="globex", name="g", actor=cli_principal("globex"))
    with ApiClient(deployment.api_url, key=other_key) as other:
        job = other.post("/v1/jobs", files={"image": ("a.jpg", near_copy("astronaut"))}).json()
        theirs = other.wait_job(job["id"], timeout_s=60)
        assert theirs["decision"]["categories"]["known_bad"]["score"] == 0
        assert theirs["decision"]["reused_from"] is None
        # Not their job: 404, as any other tenant's id.
        assert other.erase_job(first["id"]).status == 404

    # Erasure: the blob the two coffee jobs share stays until neither uses it.
    key = first["hashes"]["sha256"]
    assert client.get(f"/v1/jobs/{second['id']}/thumbnail").status_code == 200
    erased = client.erase_job(second["id"])
    assert erased.status == 200 and erased.body["erased_at"] is not None
    assert erased.body["decision"]["action"] == second["decision"]["action"]
    assert erased.body["decision"]["evidence"] == [] and erased.body["decision"]["caption"] is None
    assert erased.body["decision"]["categories"]["known_bad"]["score"] == 0
    assert blob_exists(deployment, key)
    gone = client.get(f"/v1/jobs/{second['id']}/thumbnail")
    assert gone.status_code == 404 and gone.json()["code"] == "job_erased"
    assert client.erase_job(first["id"]).status == 200
    assert not blob_exists(deployment, key)
    audit = client.get("/v1/audit", params={"action": "job.erase"}).json()["data"]
    assert {entry["target"]["id"] for entry in audit} == {first["id"], second["id"]}
    assert {e["action"] for e in client.get("/v1/audit", params={"action": "bank."}).json()["data"]} == {
        "bank.create",
        "bank.item_add",
    }

    # Retention: with the clock 31 days on, a 30-day sweep erases every other finished job (all tenants) and its blob.
    blobs = LocalBlobStore(Path(deployment.env["MODTAG_DATA_DIR"]) / "blobs")
    later = utcnow() + timedelta(days=31)
    assert sweep_retention(deployment.env["MODTAG_DATABASE_URL"], blobs, 30, now=utcnow()) == 0
    assert (
        sweep_retention(deployment.env["MODTAG_DATABASE_URL"], blobs, 30, now=later) == 3
    )  # the copy, chelsea, globex
    assert client.job(copy["id"])["erased_at"] is not None
    assert not blob_exists(deployment, copy["hashes"]["sha256"])

"""The banks API over real HTTP (SQLite and PostgreSQL): who may change banks, what items look like, what is
refused, the audit trail, a reviewer banking what they block, and `modtag banks import` through the CLI."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from core.db import session_scope
from core.hashes import pdq_hash
from core.jobs import claim_job, record_hashes, store_decision
from core.tables import Decision
from modtag.cli import main
from modtag.client import ApiClient
from tests.support.api import Api, admin_key, assert_error
from tests.support.photos import photo_bytes, photo_image

pytestmark = pytest.mark.timeout(120)
PDQ = "f" * 16 + "0" * 48


def client_as(api: Api, role: str, tenant: str = "default") -> ApiClient:
    return ApiClient(api.base_url, key=admin_key(api.db_url, role=role, tenant=tenant, name=f"{tenant} {role}"))


def test_banks_items_and_who_may_change_them(api: Api) -> None:
    admin = api.client
    assert admin.create_bank("csam-list", "shared list").status == 201
    assert_error(admin.post("/v1/banks", json={"name": "csam-list"}), 409, "bank_exists")
    assert admin.post("/v1/banks", json={"name": "Bad Name"}).status_code == 422
    with client_as(api, "review") as reviewer, client_as(api, "submit") as submitter:
        assert_error(reviewer.post("/v1/banks", json={"name": "mine"}), 403, "forbidden")
        assert_error(submitter.get("/v1/banks"), 403, "forbidden")
        assert_error(submitter.post("/v1/banks/csam-list/items", json={"pdq": PDQ}), 403, "forbidden")
        added = reviewer.post("/v1/banks/csam-list/items", json={"pdq": PDQ.upper(), "note": "from a partner"})
        assert added.status_code == 201, added.text
    item = added.json()
    assert (item["bank"], item["pdq"], item["sha256"], item["note"]) == ("csam-list", PDQ, None, "from a partner")
    assert admin.get(f"/v1/banks/csam-list/items/{item['id']}").json() == item

    uploaded = admin.post("/v1/banks/csam-list/items", files={"image": ("c.jpg", photo_bytes("coffee"))}).json()
    assert uploaded["sha256"] == hashlib.sha256(photo_bytes("coffee")).hexdigest()
    assert (uploaded["pdq"], uploaded["pdq_quality"]) == pdq_hash(Image.open(io.BytesIO(photo_bytes("coffee"))))

    assert_error(admin.post("/v1/banks/csam-list/items", json={"pdq": "abc"}), 422, "pdq_invalid")
    assert_error(admin.post("/v1/banks/csam-list/items", json={"note": "x"}), 422, "bank_item_empty")
    assert_error(admin.post("/v1/banks/nope/items", json={"pdq": PDQ}), 404, "bank_not_found")
    assert admin.post("/v1/banks/csam-list/items", files={"image": ("x.jpg", b"not an image")}).status_code == 415

    # Another tenant sees neither the bank nor its items.
    with client_as(api, "admin", "globex") as other:
        assert other.get("/v1/banks").json() == {"data": []}
        assert_error(other.get(f"/v1/banks/csam-list/items/{item['id']}"), 404, "bank_not_found")

    assert admin.delete(f"/v1/banks/csam-list/items/{item['id']}").status_code == 204
    assert_error(admin.get(f"/v1/banks/csam-list/items/{item['id']}"), 404, "bank_item_not_found")
    [bank] = admin.get("/v1/banks").json()["data"]
    assert bank["items"] == 1
    actions = [e["action"] for e in admin.get("/v1/audit", params={"action": "bank."}).json()["data"]]
    assert actions == ["bank.item_delete", "bank.item_add", "bank.item_add", "bank.create"]


def test_a_reviewer_banks_what_they_block(api: Api) -> None:
    admin = api.client
    assert admin.create_bank("known_bad").status in (201, 409)
    job_id = admin.submit_job(photo_bytes("rocket"), filename="r.jpg").body["id"]
    pdq, quality = pdq_hash(photo_image("rocket"))
    with session_scope(api.db_url) as session:
        job = claim_job(session, job_id, "test-worker", 60)
        assert job is not None
        record_hashes(session, job, hashlib.sha256(photo_bytes("rocket")).hexdigest(), pdq, quality)
        categories = {"weapons": {"score": 0.7, "action": "review", "fired": True, "decided_by": "x", "reason": None}}
        decision = Decision(
            job_id=job_id, action="review", policy="moderation", policy_version="v", categories=categories
        )
        store_decision(session, job, decision)
    body = {"action": "allow", "reason": "fine", "add_to_bank": "known_bad"}
    assert_error(admin.post(f"/v1/review/{job_id}/resolve", json=body), 422, "add_to_bank_needs_block")
    body = {"action": "block", "reason": "a copy of a banned photo", "add_to_bank": "missing"}
    assert_error(admin.post(f"/v1/review/{job_id}/resolve", json=body), 404, "bank_not_found")
    body["add_to_bank"] = "known_bad"
    resolved = admin.post(f"/v1/review/{job_id}/resolve", json=body)
    assert resolved.status_code == 200, resolved.text
    added = admin.get("/v1/audit", params={"action": "bank.item_add"}).json()["data"][0]
    assert added["after"]["pdq"] == pdq and added["after"]["bank"] == "known_bad"
    assert job_id in added["after"]["note"]


def test_cli_imports_a_csv_of_hashes(api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "hashes.csv"
    rows = [f"{index:064x},partner list" for index in range(1, 26)]
    listing.write_text("pdq,note\n" + "\n".join(rows) + "\n")
    args = ["banks", "import", "partner", str(listing), "--create", "--api", api.base_url, "--api-key", api.key]
    assert main([*args, "--no-progress"]) == 0
    assert "25 hashes added" in capsys.readouterr().out
    [bank] = [b for b in api.client.get("/v1/banks").json()["data"] if b["name"] == "partner"]
    assert bank["items"] == 25
    listing.write_text(f"{1:064x}\nnot-a-hash\n")
    assert main([*args, "--signal-type", "pdq"]) == 2
    assert "line 2: 'not-a-hash' is not a pdq hash" in capsys.readouterr().err


def test_importing_a_list_twice_adds_it_once(api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "again.csv"
    listing.write_text("\n".join(f"{index:064x}" for index in range(100, 110)) + "\n")
    args = ["banks", "import", "twice", str(listing), "--create", "--api", api.base_url, "--api-key", api.key]
    args += ["--signal-type", "pdq", "--no-progress"]
    assert main(args) == 0
    assert "10 hashes added, 0 skipped" in capsys.readouterr().out
    listing.write_text("\n".join(f"{index:064x}" for index in range(105, 115)) + "\n")
    assert main(args) == 0
    assert "5 hashes added, 5 skipped (already in the bank)" in capsys.readouterr().out
    [bank] = [b for b in api.client.get("/v1/banks").json()["data"] if b["name"] == "twice"]
    assert bank["items"] == 15
    repeated = [{"pdq": f"{200:064x}"}, {"pdq": f"{200:064x}"}, {"pdq": f"{105:064x}"}]
    answer = api.client.post("/v1/banks/twice/import", json={"items": repeated})
    assert answer.status_code == 201, answer.text
    assert answer.json() == {"bank": "twice", "added": 1, "skipped": 2, "unsupported": {}}

"""Listings, shadows and policy reload through real processes: `modtag api` and `modtag worker` (tiny random BLIP),
Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import col, select

from core.db import session_scope
from core.tables import Job, ShadowDecision
from modtag.cli import main
from policies import load_policy
from tests.support.deployment import Deployment, submit, wait_final, wait_listing
from tests.support.photos import photo_bytes
from tests.support.policies import gun_shadow

pytestmark = pytest.mark.timeout(300)

SHADOW = gun_shadow("A candidate for moderation, watched before it is switched on.")


def shadow_rows(deployment: Deployment) -> list[ShadowDecision]:
    with session_scope(deployment.env["MODTAG_DATABASE_URL"]) as session:
        return list(session.exec(select(ShadowDecision).order_by(col(ShadowDecision.decided_at))).all())


def test_workers_run_shadows_and_pick_up_policy_edits_without_a_restart(deployment: Deployment, tmp_path: Path) -> None:
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    path = policies_dir / "next.yaml"
    path.write_text(SHADOW)
    deployment.env["MODTAG_POLICIES_DIR"] = str(policies_dir)
    deployment.env["MODTAG_POLICY_RELOAD_S"] = "0"  # the worker looks at the files on every job: no waiting
    deployment.start_api()
    worker = deployment.start_worker()
    first = wait_final(deployment, submit(deployment, photo_bytes("astronaut"))["id"])
    assert first["status"] == "done" and first["policy"] == "moderation"
    [row] = shadow_rows(deployment)
    assert (row.job_id, row.policy, row.action) == (first["id"], "moderation-next", "review")
    assert row.active_action == first["decision"]["action"]

    path.write_text(SHADOW.replace("review: 0.0", "review: 1.0"))  # an edit: the shadow now never reviews
    edited = load_policy(path).version
    second = wait_final(deployment, submit(deployment, photo_bytes("coffee"))["id"])
    assert second["status"] == "done"
    latest = shadow_rows(deployment)[-1]
    assert (latest.policy_version, latest.action) == (edited, "allow")

    path.write_text(SHADOW.replace("review: 0.0", "review: [oops"))  # a broken edit: the last good version stays
    third = wait_final(deployment, submit(deployment, photo_bytes("rocket"))["id"])
    assert third["status"] == "done" and shadow_rows(deployment)[-1].policy_version == edited
    assert worker.poll() is None  # the same worker process throughout
    assert "cannot be loaded; still using the previous versions" in deployment.log("worker")

    report = deployment.client.get("/v1/policies/moderation/shadow").json()
    compared = {summary["version"]: summary["compared"] for summary in report["data"]}
    assert compared == {load_policy_text_version(SHADOW): 1, edited: 2}


def load_policy_text_version(text: str) -> str:
    from policies import load_policy_text

    return load_policy_text(text).version


def jpeg(name: str) -> bytes:
    return photo_bytes(name, size=(120, 90))


def test_a_listing_is_checked_photo_by_photo_with_a_listing_verdict(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start_api()
    deployment.start_worker()
    response = deployment.client.post(
        "/v1/listings",
        files=[("images", (f"{name}.jpg", jpeg(name), "image/jpeg")) for name in ("coffee", "chelsea", "rocket")],
        data={
            "title": "Red ceramic coffee mug",
            "description": "A large mug. Holds 300 ml.\nDishwasher safe; ships in two days.",
            "attributes": json.dumps({"color": "crimson", "count": 1, "material": "ceramic"}),
        },
    )
    assert response.status_code == 202, response.text
    listing = wait_listing(deployment, response.json()["id"])
    verdict = listing["verdict"]
    assert verdict["status"] == "done" and verdict["action"] in ("allow", "review")
    assert verdict["photos"] == {"total": 3, "decided": 3, "failed": 0}
    assert isinstance(verdict["matches_description"], bool) and isinstance(verdict["findings"], list)
    for photo in listing["photos"]:
        decision = photo["decision"]
        assert decision["policy"] == "listing" and decision["reason"]
        kinds = {entry["kind"] for entry in decision["evidence"]}
        assert kinds == {"describe", "attribute", "tags", "text", "photo"}
        describe = next(e for e in decision["evidence"] if e["kind"] == "describe")
        assert describe["matched"] and set(describe["scores"]) >= {"Red ceramic coffee mug", "A large mug."}
        colour = next(e for e in decision["evidence"] if e["category"] == "color_mismatch")
        assert colour["claimed"] == "red" and colour["seen"] and "red" in colour["scores"]
        product = next(e for e in decision["evidence"] if e["category"] == "product_mismatch")
        assert product["claimed"] is None and product["score"] == 0.0  # not claimed: not asked
        tags = next(e for e in decision["evidence"] if e["kind"] == "tags")
        assert len(tags["scores"]) == 3 * 4  # top 3 of each of the 4 groups, re-scored by ITM
        assert all(0.0 <= tag["score"] <= 1.0 and tag["score"] >= 0.5 for tag in decision["tags"])
        for contradiction in decision["contradictions"]:
            assert contradiction["field"].startswith(("attributes.", "title"))
    # The same listing through the CLI, against this API.
    files = []
    for name in ("coffee", "rocket"):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(jpeg(name))
        files.append(str(path))
    code = main(
        ["listing", "check", *files, "--title", "A mug", "--attr", "color=red", "--api", deployment.api_url,
         "--api-key", deployment.key, "--timeout", "120"]
    )  # fmt: skip
    assert code == 0


def test_listing_jobs_without_their_context_fail_with_a_clear_code(deployment: Deployment) -> None:
    """A job whose context lacks what the policy needs by the time a worker takes it fails with `context_missing`."""
    deployment.start_api()
    job = submit(deployment, photo_bytes("coffee"), policy="listing", context=json.dumps({"title": "a mug"}))
    with session_scope(deployment.env["MODTAG_DATABASE_URL"]) as session:
        stored = session.get(Job, job["id"])
        assert stored is not None
        stored.context = {"attributes": {"color": "red"}}  # as if the API had let it through
        session.add(stored)
    deployment.start_worker()
    final = wait_final(deployment, job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "context_missing"
    assert "'title' or 'description'" in final["error"]["message"]

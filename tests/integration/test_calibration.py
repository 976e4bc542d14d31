"""The learning loop through the real API (SQLite and PostgreSQL): 200 decided jobs resolved through the review
routes with per-category labels; GET /v1/calibration and `modtag policy calibrate` give the same curve and
suggestion; the written policy validates and its replay shows what it would change; another tenant's labels never
count; the labels export (route and CLI) never holds an erased job.

Decisions are rows this test stores (the real evaluation of given probe scores, stored by core.jobs.store_decision
as the worker stores them): the curve depends on scores and labels only, and the test picks both.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from core.blobs import LocalBlobStore
from core.db import session_scope
from core.tables import AuditEntry, utcnow
from modtag.cli import main
from modtag.client import ApiClient
from policies import load_policy
from tests.support.api import Api, admin_key, assert_error
from tests.support.labels import QUESTIONS, decided_job, load_probe_policy, probe_policy
from tests.support.photos import photo_bytes
from worker.replay import replay_policy

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # 230 jobs resolved over HTTP on each backend

POLICY = load_probe_policy(probe_policy())
JOBS = 200
OTHER_JOBS = 30


@pytest.fixture(scope="module")
def api_overrides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    policies = tmp_path_factory.mktemp("policies")
    (policies / "calib.yaml").write_text(probe_policy())
    return {"policies_dir": policies}


class Labelled:
    """What the test sent: each job's scores and labels, per tenant."""

    def __init__(self, since: str) -> None:
        self.since = since
        self.jobs: dict[
            str, tuple[dict[str, float], dict[str, bool], str, str]
        ] = {}  # id: scores, labels, machine, res

    def pairs(self, category: str) -> list[tuple[float, bool]]:
        return [(scores[category], labels[category]) for scores, labels, _, _ in self.jobs.values()]


@pytest.fixture(scope="module")
def labelled(api: Api) -> Iterator[Labelled]:
    """200 jobs of tenant `default` and 30 of tenant `other` (labels inverted), every one resolved with labels.

    Every automatic decision is stored as an audit sample (audit_rate 1), so allows and blocks are labelled too."""
    since = (utcnow() - timedelta(minutes=5)).isoformat()
    image = photo_bytes("coffee", size=(64, 48))
    blob_key = LocalBlobStore(api.settings.resolved_blob_dir).put(image)
    rng = random.Random(22)
    result = Labelled(since)
    other_key = admin_key(api.db_url, role="review", tenant="other", name="other reviewer")
    for index in range(JOBS + OTHER_JOBS):
        tenant = "default" if index < JOBS else "other"
        truth = {"weapons": index % 5 < 2, "drugs": index % 3 == 0}
        scores = {
            category: round(min(1.0, max(0.0, rng.gauss(0.65 if applies else 0.35, 0.18))), 4)
            for category, applies in truth.items()
        }
        job_id, decision = decided_job(
            api.db_url, POLICY, scores, tenant=tenant, blob_key=blob_key, image=image, audit_rate=1.0
        )
        labels = truth if tenant == "default" else {name: not value for name, value in truth.items()}
        resolution = "block" if any(labels.values()) else "allow"
        body = {"action": resolution, "reason": "labelled by the test", "categories": labels}
        if tenant == "default":
            response = api.client.post(f"/v1/review/{job_id}/resolve", json=body)
            result.jobs[job_id] = (scores, labels, decision.action, resolution)
        else:
            with ApiClient(api.base_url, key=other_key) as other:
                response = other.post(f"/v1/review/{job_id}/resolve", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["resolution"]["labels"] == labels
    yield result


def expected_curve(pairs: list[tuple[float, bool]]) -> list[dict[str, float]]:
    """Precision and recall at each distinct score, counted the plain way."""
    positives = sum(label for _, label in pairs)
    points = []
    for threshold in sorted({score for score, _ in pairs}):
        above = [label for score, label in pairs if score >= threshold]
        points.append(
            {
                "threshold": threshold,
                "precision": round(sum(above) / len(above), 6),
                "recall": round(sum(above) / positives, 6),
            }
        )
    return points


def calibration(api: Api, **params: Any) -> dict[str, Any]:
    response = api.client.get("/v1/calibration", params={"policy": "calib", **params})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_calibration_is_the_curve_of_the_tenants_labels(api: Api, labelled: Labelled) -> None:
    for category in QUESTIONS:
        body = calibration(api, category=category, since=labelled.since)
        pairs = labelled.pairs(category)
        assert body["labelled"] == JOBS  # tenant `other`'s 30 inverted labels never count
        assert body["positives"] == sum(label for _, label in pairs)
        assert body["points"] == expected_curve(pairs)
        assert body["current"] == {"review": 0.3, "block": 0.8}
        assert body["target"] == {"block_precision": 0.95, "review_recall": 0.9}
        block = min(p["threshold"] for p in body["points"] if p["precision"] >= 0.95)
        review = max(p["threshold"] for p in body["points"] if p["recall"] >= 0.9)
        assert body["suggested"] == {"review": min(review, block), "block": block}
        # Stricter targets move the thresholds the way they must.
        strict = calibration(api, category=category, since=labelled.since, block_precision=1.0, review_recall=1.0)
        assert strict["suggested"]["block"] >= block and strict["suggested"]["review"] <= review
    # The audit sample: the automatic allows and blocks, and how often people agreed, with a Wilson interval.
    audit = body["audit"]
    for action in ("allow", "block"):
        sampled = [res for _, _, machine, res in labelled.jobs.values() if machine == action]
        agreed = sum(res == action for res in sampled)
        assert (audit[action]["sampled"], audit[action]["agreed"]) == (len(sampled), agreed)
        assert audit[action]["low"] <= audit[action]["precision"] <= audit[action]["high"]
        assert audit[action]["low"] >= 0 and audit[action]["high"] <= 1
    # Another tenant sees only its own labels.
    other = admin_key(api.db_url, role="review", tenant="other", name="other reader")
    with ApiClient(api.base_url, key=other) as client:
        theirs = client.get(
            "/v1/calibration", params={"policy": "calib", "category": "weapons", "since": labelled.since}
        ).json()
    assert theirs["labelled"] == OTHER_JOBS


def test_calibrate_cli_gives_the_same_curve_writes_a_valid_policy_and_its_replay(
    api: Api, labelled: Labelled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written, plots = tmp_path / "calibrated.yaml", tmp_path / "plots"
    argv = ["policy", "calibrate", "calib", "--api", api.base_url, "--api-key", api.key, "--since", labelled.since]
    assert main([*argv, "--json", "--write", str(written), "--plots", str(plots)]) == 0
    printed = json.loads(capsys.readouterr().out)["categories"]
    assert printed == [calibration(api, category=category, since=labelled.since) for category in QUESTIONS]
    for path in (plots / "calib-weapons.png", plots / "calib-drugs.png"):
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    policy = load_policy(written)  # validates, as any policy file
    assert (policy.name, policy.shadows) == ("calib-calibrated", "calib") and policy.version != POLICY.version
    for found in printed:
        category = policy.category(found["category"])
        assert (category.review, category.block) == (found["suggested"]["review"], found["suggested"]["block"])
    # The table a person reads names the same thresholds.
    assert main(argv) == 0
    table = capsys.readouterr().out
    weapons = printed[0]
    assert f"{weapons['suggested']['block']:g}" in table and "audit sample: automatic blocks agreed" in table

    report = replay_policy(policy, api.settings, since=utcnow() - timedelta(hours=1), tenant="default")
    assert report.target == "calib" and report.roles_loaded == []  # stored evidence alone: no model loaded
    replayed = {job.job_id: job for job in report.jobs}
    changed = 0
    for job_id, (scores, _, machine, _) in labelled.jobs.items():
        actions = [
            "block" if score >= category.block else "review" if score >= category.review else "allow"
            for name, score in scores.items()
            for category in [policy.category(name)]
        ]
        expected = max(actions, key=["allow", "review", "block"].index)
        assert replayed[job_id].new_action == expected
        changed += expected != machine
    assert changed > 0 and sum(job.new_action != job.old_action for job in report.changed) == changed


def test_hostile_calibration_queries_are_refused_clearly(api: Api, labelled: Labelled) -> None:
    def refused(status: int, code: str, **params: Any) -> dict[str, Any]:
        return assert_error(api.client.get("/v1/calibration", params=params), status, code)

    base = {"policy": "calib", "category": "weapons"}
    assert "did you mean 'weapons'" in refused(422, "unknown_category", policy="calib", category="weapon")["detail"]
    refused(404, "policy_not_found", policy="nope", category="weapons")
    for since in ("yesterday", "2026-13-45", "9" * 30, "1d; DROP TABLE jobs", "\x00"):
        refused(422, "invalid_field", **base, since=since)
    for bad in ("0", "-0.5", "1.5", "nan", "inf", "abc", "9" * 400):
        refused(422, "invalid_field", **base, block_precision=bad)
        refused(422, "invalid_field", **base, review_recall=bad)
    refused(422, "invalid_field", policy="../../etc", category="weapons")
    refused(422, "invalid_field", policy="calib", category="w" * 10_000)
    response = api.client.get("/v1/calibration", params={"policy": "calib"})
    assert response.status_code == 422
    # A future `since` is an empty curve, not an error.
    empty = calibration(api, category="weapons", since=(utcnow() + timedelta(days=1)).isoformat())
    assert (empty["labelled"], empty["points"], empty["suggested"]) == (0, [], {"review": None, "block": None})


def test_resolve_labels_are_checked_and_default_from_the_action(api: Api) -> None:
    ids = [
        decided_job(api.db_url, POLICY, {"weapons": 0.5, "drugs": 0.9}, audit_rate=1.0)[0] for _ in range(3)
    ]  # weapons fired (review), drugs fired (block)
    resolve = "/v1/review/{}/resolve"
    for categories, code in (
        ({"weapon": True}, "unknown_category"),
        ({"weapons": "yes"}, "invalid_field"),
        ({"weapons": 1}, "invalid_field"),
        ({f"c{i}": True for i in range(5000)}, "invalid_field"),
        ([True], "invalid_field"),
    ):
        body = {"action": "block", "reason": "r", "categories": categories}
        error = assert_error(api.client.post(resolve.format(ids[0]), json=body), 422, code)
        if code == "unknown_category":
            assert "did you mean 'weapons'" in error["detail"]
    assert api.client.get(f"/v1/jobs/{ids[0]}").json()["review"]["state"] == "open"  # nothing changed
    # Not given: a block labels the fired categories, an allow labels every category false.
    blocked = api.client.post(resolve.format(ids[0]), json={"action": "block", "reason": "r"}).json()
    assert blocked["resolution"]["labels"] == {"weapons": True, "drugs": True}
    allowed = api.client.post(resolve.format(ids[1]), json={"action": "allow", "reason": "r"}).json()
    assert allowed["resolution"]["labels"] == {"weapons": False, "drugs": False}
    mixed = api.client.post(
        resolve.format(ids[2]), json={"action": "block", "reason": "r", "categories": {"weapons": False}}
    ).json()
    assert mixed["resolution"]["labels"] == {"weapons": False, "drugs": True}
    # In the audit log, with who gave them.
    with session_scope(api.db_url) as session:
        entry = session.exec(
            select(AuditEntry).where(AuditEntry.target_id == ids[2], AuditEntry.action == "review.resolved")
        ).one()
    assert entry.after is not None and entry.after["resolution"]["labels"] == {"weapons": False, "drugs": True}
    assert entry.after["resolution"]["by"]["name"] == "test admin"
    # Reopened, the labels go with the resolution (the audit log keeps them).
    reopened = api.client.post(f"/v1/review/{ids[2]}/reopen", json={"reason": "appeal"}).json()
    assert reopened["resolution"] is None
    # Another tenant's item answers 404, whatever the labels.
    other = admin_key(api.db_url, role="review", tenant="other", name="other reviewer 2")
    with ApiClient(api.base_url, key=other) as client:
        assert_error(
            client.post(resolve.format(ids[2]), json={"action": "allow", "reason": "r"}), 404, "review_not_found"
        )


def test_labels_export_pages_the_tenants_labels_and_never_an_erased_job(
    api: Api, labelled: Labelled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    erased = next(iter(labelled.jobs))
    assert api.client.delete(f"/v1/jobs/{erased}").status_code == 200
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"since": labelled.since, "limit": 37, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/labels", params=params).json()
        seen.extend(page["data"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    ours = {row["job_id"]: row for row in seen if row["job_id"] in labelled.jobs}
    assert erased not in ours and len(ours) == JOBS - 1
    assert all(row["policy"] == "calib" for row in ours.values())  # no row of tenant `other`
    row = next(iter(ours.values()))
    scores, labels, machine, resolution = labelled.jobs[row["job_id"]]
    assert (row["scores"], row["labels"], row["decision"], row["resolution"]) == (scores, labels, machine, resolution)
    assert row["reviewer"]["name"] == "test admin" and row["kind"] in ("review", "audit")
    assert_error(api.client.get(f"/v1/labels/{erased}/image"), 404, "job_erased")
    assert_error(api.client.get("/v1/labels", params={"cursor": "not-a-cursor"}), 400, "invalid_cursor")
    reviewer = admin_key(api.db_url, role="review", name="a reviewer")
    with ApiClient(api.base_url, key=reviewer) as client:
        assert_error(client.get("/v1/labels"), 403, "forbidden")

    out = tmp_path / "export"
    argv = ["labels", "export", str(out), "--api", api.base_url, "--api-key", api.key, "--since", labelled.since]
    assert main([*argv, "--no-progress"]) == 0
    lines = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    exported = {line["job_id"]: line for line in lines if line["job_id"] in labelled.jobs}
    assert erased not in exported and len(exported) == JOBS - 1
    image = out / exported[row["job_id"]]["image_file"]
    assert image.read_bytes() == photo_bytes("coffee", size=(64, 48))
    assert not list(out.glob("images/*erased*")) and not (out / "images" / f"{erased}.jpg").exists()
    assert "labelled jobs written" in capsys.readouterr().out
    assert main(["labels", "export", str(out), "--api", api.base_url, "--since", "not a date"]) == 2

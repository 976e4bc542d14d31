"""The Quality page and the review form's label checkboxes in a real Chromium, against the API served in-process
(SQLite, real HTTP). Decisions are rows the test stores (the real evaluation of given probe scores), labelled
through the review route; the page must show the same suggestion as GET /v1/calibration, with no script."""

from __future__ import annotations

import random
import re
from datetime import timedelta
from pathlib import Path

import pytest

from core.blobs import LocalBlobStore
from core.tables import utcnow
from tests.support.api import admin_key, api_settings, running_api
from tests.support.browser import chromium, screenshot_dir
from tests.support.labels import QUESTIONS, decided_job, load_probe_policy, probe_policy
from tests.support.photos import photo_bytes

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

POLICY = load_probe_policy(probe_policy())


def test_quality_page_draws_each_curve_and_the_review_form_labels_categories(tmp_path: Path, redis_url: str) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "calib.yaml").write_text(probe_policy())
    settings = api_settings(tmp_path, f"sqlite:///{tmp_path / 'modtag.db'}", redis_url, policies_dir=policies)
    shots = screenshot_dir(tmp_path)
    with running_api(settings) as api, chromium() as browser:
        image = photo_bytes("chelsea", size=(64, 48))
        blob_key = LocalBlobStore(settings.resolved_blob_dir).put(image)
        rng = random.Random(7)
        for index in range(60):
            truth = {"weapons": index % 3 == 0, "drugs": index % 4 == 0}
            scores = {
                name: round(rng.uniform(0.5, 1.0) if on else rng.uniform(0.0, 0.6), 4) for name, on in truth.items()
            }
            job_id, _ = decided_job(api.db_url, POLICY, scores, blob_key=blob_key, image=image, audit_rate=1.0)
            body = {"action": "block" if any(truth.values()) else "allow", "reason": "test", "categories": truth}
            assert api.client.post(f"/v1/review/{job_id}/resolve", json=body).status_code == 200
        open_job, _ = decided_job(api.db_url, POLICY, {"weapons": 0.2, "drugs": 0.5}, blob_key=blob_key, image=image)
        audit_job, allowed = decided_job(
            api.db_url, POLICY, {"weapons": 0.1, "drugs": 0.0}, blob_key=blob_key, image=image, audit_rate=1.0
        )
        assert allowed.action == "allow"
        since = (utcnow() - timedelta(days=30)).isoformat()
        expected = {
            name: api.client.get("/v1/calibration", params={"policy": "calib", "category": name, "since": since}).json()
            for name in QUESTIONS
        }
        reviewer = admin_key(api.db_url, role="review", name="Rui (reviewer)")

        page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        scripts: list[str] = []
        page.on("request", lambda request: scripts.append(request.url) if request.resource_type == "script" else None)
        page.goto(f"{api.base_url}/dashboard/login?next=/dashboard/quality")
        page.fill("#key", reviewer)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/dashboard/quality$"))
        assert page.locator("nav a.here, header a.here").first.inner_text() == "Quality"
        for name, calibration in expected.items():
            card = page.locator(f"article[data-category='{name}']")
            assert f"{calibration['labelled']} labelled, {calibration['positives']} applied" in card.inner_text()
            assert card.locator("[data-testid=suggested-block]").inner_text() == f"{calibration['suggested']['block']}"
            assert card.locator("[data-testid=today-block]").inner_text() == "0.8"
            curve = card.locator("svg[data-testid=curve]")
            assert curve.is_visible() and curve.locator("polyline").count() == 1
            points = curve.locator("polyline").get_attribute("points") or ""
            assert len(points.split()) == len(calibration["points"])
            assert card.locator("[data-testid=mark-suggested-block]").count() == 1
            assert card.locator("[data-testid=mark-today-review]").count() == 1
        audit = page.locator("[data-testid=audit-precision]").inner_text()
        sampled = expected["weapons"]["audit"]["block"]
        assert f"block\t{sampled['sampled']}\t{sampled['agreed']}" in audit
        page.screenshot(path=str(shots / "quality.png"), full_page=True)
        assert page.locator("script").count() == 0 and scripts == []

        # The review form: a checkbox per category, the fired one first; the ticked one is labelled true.
        page.goto(f"{api.base_url}/dashboard/review")
        assert page.locator(f"article[data-job='{audit_job}'] [data-testid=audit]").inner_text() == "audit"
        assert page.locator(f"article[data-job='{open_job}'] [data-testid=audit]").count() == 0
        card = page.locator(f"article[data-job='{open_job}']")
        boxes = card.locator("[data-testid=label-choices] input[type=checkbox]")
        assert [boxes.nth(i).get_attribute("value") for i in range(boxes.count())] == ["drugs", "weapons"]
        card.locator("[data-testid=label-weapons]").check()
        card.locator("textarea[name=reason]").fill("a rifle, no drugs")
        page.screenshot(path=str(shots / "review-form.png"), full_page=True)
        card.locator("[data-testid=block]").click()
        page.wait_for_load_state()
        assert "Resolved" in page.inner_text("[role=status]")
        page.screenshot(path=str(shots / "review-labelled.png"), full_page=True)
        # A hostile form (a category the policy lacks, a flood of labels) changes nothing and says why.
        csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
        for labels in (["weaponz"], ["weapons"] * 300):
            form = [("csrf_token", csrf), ("next", "/dashboard/review"), ("action", "block"), ("reason", "x")]
            form += [("label", name) for name in labels] + [("shown", "drugs")]
            answer = page.request.post(
                f"{api.base_url}/dashboard/review/{audit_job}/resolve",
                data="&".join(f"{name}={value}" for name, value in form),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                max_redirects=0,
            )
            assert answer.status == 303 and answer.headers["location"].endswith(
                "notice=unknown_category" if len(labels) == 1 else "notice=invalid_field"
            )
        assert api.client.get(f"/v1/jobs/{audit_job}").json()["review"]["state"] == "open"
        resolution = api.client.get(f"/v1/jobs/{open_job}").json()["review"]["resolution"]
        assert resolution["labels"] == {"weapons": True, "drugs": False}
        assert resolution["by"]["name"] == "Rui (reviewer)"

"""A reviewer works the queue in a real Chromium: sign in, see the flagged item, claim, block; an admin finds the audit.

The stack is real: `modtag api` and a `modtag worker` (tiny random BLIP models) as child processes, Redis,
SQLite. A test policy sends every image to review, so the worker's own decision fills the queue.
Chromium is Debian's (`apt-get install chromium`), driven by Playwright for Python (`pip install
playwright`; `playwright install` is not needed). Screenshots go to $MODTAG_SCREENSHOT_DIR (default: the
test's temporary directory); their paths are printed.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from core.db import session_scope
from core.jobs import claim_job, store_decision
from core.tables import Decision
from tests.support.api import admin_key, api_settings, running_api
from tests.support.deployment import Deployment, child_env, submit, wait_final
from tests.support.photos import photo_bytes

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CHROMIUM = os.environ.get("MODTAG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REVIEW_ALL_POLICY = """\
name: review-all
description: Test policy that sends every image to human review.
categories:
  - name: suspicious
    description: Anything at all (the caption rule matches any caption).
    review: 0.0
    block: null
    checks:
      - kind: probe
        question: is there a weapon in the picture?
      - kind: caption
        patterns: ['.']
        score: 0.7
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MODTAG_CHROMIUM)")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} cannot be launched here: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MODTAG_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, models_cache: Path) -> Iterator[Deployment]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "review-all.yaml").write_text(REVIEW_ALL_POLICY)
    database_url = f"sqlite:///{tmp_path / 'modtag.db'}"
    env = child_env(
        tmp_path,
        inherited={k: v for k, v in os.environ.items() if not k.startswith("MODTAG_")},
        database_url=database_url,
        redis_url=redis_url,
        models_cache=models_cache,
        MODTAG_POLICIES_DIR=str(policies),
    )
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    deployment = Deployment(env=env, log_dir=log_dir, key=admin_key(database_url, name="Ada (admin)"))
    deployment.start_api()
    deployment.start_worker()
    yield deployment
    deployment.stop_all()


def test_reviewer_works_the_queue_and_the_admin_finds_the_audit_trail(
    stack: Deployment, browser: Any, screenshots: Path
) -> None:
    database_url = stack.env["MODTAG_DATABASE_URL"]
    reviewer_key = admin_key(database_url, role="review", name="Rui (reviewer)")
    outsider_key = admin_key(database_url, role="admin", tenant="globex", name="Other tenant admin")
    job_id = _judged_by_the_worker(stack)
    shots: list[Path] = []

    def shot(page: Any, name: str) -> None:
        path = screenshots / f"{len(shots) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shots.append(path)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        # Not signed in: the dashboard answers with the sign-in form.
        response = page.goto(f"{stack.api_url}/dashboard/review")
        assert response.status == 401
        page.fill("#key", "not-a-key")
        page.click("button[type=submit]")
        assert "not valid" in page.inner_text("[role=alert]")
        page.fill("#key", reviewer_key)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/dashboard/review$"))
        cookie = next(c for c in context.cookies() if c["name"] == "modtag_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # The worker's decision is in the queue, with its thumbnail, caption and scores.
        card = page.locator(f"article[data-job='{job_id}']")
        card.wait_for()
        assert "review" in card.inner_text() and "suspicious" in card.inner_text()
        image = card.locator("img.thumb")
        image.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        shot(page, "review-queue")

        card.locator("[data-testid=claim]").click()
        page.wait_for_load_state()
        assert "Claimed" in page.inner_text("[role=status]")
        card = page.locator(f"article[data-job='{job_id}']")
        assert "claimed by you" in card.inner_text()
        shot(page, "claimed")

        card.locator("textarea[name=reason]").fill("Replica rifle pointed at the camera: block per policy 4.2")
        card.locator("[data-testid=block]").click()
        page.wait_for_load_state()
        assert "Resolved" in page.inner_text("[role=status]")
        assert page.locator(f"article[data-job='{job_id}']").count() == 0  # it left the open queue
        shot(page, "queue-after-resolve")

        page.goto(f"{stack.api_url}/dashboard/jobs/{job_id}")
        text = page.inner_text("main")
        assert "Machine decision: review" in text and "Human review: block" in text
        assert "Replica rifle" in text and "Evidence of every check" in text
        assert "probe" in text and "caption" in text
        shot(page, "job-detail")

        # Reviewers cannot read the audit log; admins can.
        assert page.goto(f"{stack.api_url}/dashboard/audit").status == 403
        page.goto(f"{stack.api_url}/dashboard/review")
        page.click("text=Sign out")
        page.wait_for_url(re.compile(r"/dashboard/login$"))

        page.fill("#key", stack.key)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/dashboard/flagged$"))
        assert page.locator(f"article[data-job='{job_id}']").count() == 1
        shot(page, "flagged-content")

        page.goto(f"{stack.api_url}/dashboard/audit?job_id={job_id}")
        rows = page.locator("tr.audit-entry")
        actions = [rows.nth(i).get_attribute("data-action") for i in range(rows.count())]
        assert actions == ["review.resolved", "review.claimed", "review.enqueued"]
        resolved = rows.nth(0).inner_text()
        assert "Rui (reviewer)" in resolved and "block" in resolved and "Replica rifle" in resolved
        shot(page, "audit-log")

        page.goto(f"{stack.api_url}/dashboard/summary?range=24h")
        assert "Flag rate per hour" in page.inner_text("main")
        assert page.locator("svg rect").count() >= 1
        shot(page, "summary")
        context.close()

        # Another tenant's admin sees none of it.
        other = browser.new_context()
        page = other.new_page()
        page.goto(f"{stack.api_url}/dashboard/login")
        page.fill("#key", outsider_key)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/dashboard/flagged$"))
        assert job_id not in page.content()
        assert page.goto(f"{stack.api_url}/dashboard/jobs/{job_id}").status == 404
        page.goto(f"{stack.api_url}/dashboard/audit")
        assert job_id not in page.content()
        shot(page, "other-tenant-audit")
        other.close()
    finally:
        print("\nscreenshots:\n" + "\n".join(f"  {path}" for path in shots))

    job = stack.client.job(job_id)
    assert job["decision"]["action"] == "review"  # the machine's call is kept
    assert job["review"]["resolution"]["action"] == "block"
    assert job["review"]["resolution"]["by"]["name"] == "Rui (reviewer)"
    assert all(path.stat().st_size > 5000 for path in shots)


def test_the_job_page_draws_the_text_boxes_over_the_image(
    tmp_path: Path, redis_url: str, browser: Any, screenshots: Path
) -> None:
    """The boxes of the lines read land on the drawn text in the thumbnail (no worker: the decision is stored)."""
    settings = api_settings(tmp_path / "api", f"sqlite:///{tmp_path / 'modtag.db'}", redis_url)
    image, lines = _image_with_text()
    with running_api(settings) as api:
        response = api.upload(image, filename="sign.png", mime="image/png")
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        with session_scope(api.db_url) as session:
            job = claim_job(session, job_id, "test-worker", 60)
            assert job is not None
            decision = Decision(job_id=job_id, action="block", policy="moderation", policy_version="v1", text=lines)
            store_decision(session, job, decision)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{api.base_url}/dashboard/login?next=/dashboard/jobs/{job_id}")
        page.fill("#key", api.key)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(f"/dashboard/jobs/{job_id}$"))
        thumb = page.locator(".ocr-frame img.thumb")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
        path = screenshots / "job-text-boxes.png"
        page.screenshot(path=str(path), full_page=True)
        page.locator(".ocr-frame").screenshot(path=str(screenshots / "job-text-boxes-thumbnail.png"))
        print(f"\nscreenshots: {path} and its thumbnail beside it")
        assert page.locator("[data-testid=ocr-lines] tr").count() == len(lines) + 1
        # Where each box lands on screen against where its line is drawn in the thumbnail (object-fit: contain).
        drawn = page.evaluate(
            """img => {
                const r = img.getBoundingClientRect();
                const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
                const [w, h] = [img.naturalWidth * s, img.naturalHeight * s];
                return {left: r.left + (r.width - w) / 2, top: r.top + (r.height - h) / 2, width: w};
            }""",
            thumb.element_handle(),
        )
        scale = drawn["width"] / 640
        rects = page.locator("[data-testid=ocr-boxes] rect")
        assert rects.count() == len(lines)
        for index, line in enumerate(lines):
            box = rects.nth(index).bounding_box()
            x0, y0, x1, y1 = line["box"]
            assert box is not None
            assert abs(box["x"] - (drawn["left"] + x0 * scale)) < 3, (line, box, drawn)
            assert abs(box["y"] - (drawn["top"] + y0 * scale)) < 3, (line, box, drawn)
            assert abs(box["width"] - (x1 - x0) * scale) < 3, (line, box, drawn)
            assert abs(box["height"] - (y1 - y0) * scale) < 3, (line, box, drawn)
        page.context.close()
    assert path.stat().st_size > 5000


def _image_with_text() -> tuple[bytes, list[dict[str, Any]]]:
    """A 640x400 sign with three lines drawn, and those lines as OCR would report them (boxes from the font)."""
    image = Image.new("RGB", (640, 400), (250, 246, 232))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    lines = []
    for text, origin in (("CALL 555-0100", (40, 40)), ("<b>Vintage</b> lamp", (180, 170)), ("100% cotton", (60, 300))):
        draw.text(origin, text, fill=(20, 20, 20), font=font)
        x0, y0, x1, y1 = (int(v) for v in draw.textbbox(origin, text, font=font))
        lines.append({"text": text, "score": 0.9, "box": [x0, y0, x1, y1]})
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), lines


def _judged_by_the_worker(stack: Deployment) -> str:
    context = '{"title": "<b>vintage</b> toy rifle"}'
    job_id = submit(stack, photo_bytes("astronaut"), "astronaut.jpg", policy="review-all", context=context)["id"]
    job = wait_final(stack, job_id, timeout_s=120)
    assert job["status"] == "done", job
    assert job["decision"]["action"] == "review" and job["review"]["state"] == "open", job
    return str(job_id)

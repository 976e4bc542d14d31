"""The dashboard in a real Chromium: a reviewer works the queue (sign in, see the flagged item, claim, block) and an
admin finds the audit; the job page's text boxes; the kinder review desk (images blurred until clicked, blurred
again on a second click, greyscale remembered, an erased job's placeholder, the Banks page, block and add to bank);
single sign-on through a real OpenID Connect provider process.

The first test's stack is `modtag api` and a `modtag worker` (tiny random BLIP models) as child processes,
Redis, SQLite, with a policy that sends every image to review. The others share one in-process API per module
(`desk`) whose decisions are stored as the worker stores them, and one provider process (`oidc-provider-mock`).
Chromium is Debian's, driven by Playwright (tests/support/browser.py). Screenshots go to
$MODTAG_SCREENSHOT_DIR (default: the test's temporary directory); their paths are printed.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from core.db import session_scope
from core.jobs import claim_job, store_decision
from core.tables import Decision
from tests.support.api import Api, admin_key, api_settings, running_api
from tests.support.browser import chromium, screenshot_dir
from tests.support.dashboard import decided_upload
from tests.support.deployment import Deployment, child_env, submit, wait_final
from tests.support.oidc import OidcProvider, oidc_provider
from tests.support.photos import photo_bytes

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

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


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module; each test opens its own contexts (cookies apart)."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    return screenshot_dir(tmp_path)


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


# -- the kinder review desk and single sign-on: one API and one identity provider for the module ------------------


@dataclass
class Desk:
    api: Api
    provider: OidcProvider
    reviewer_key: str
    kept: str  # a job in the review queue
    erased: str  # a job whose image was erased


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[Desk]:
    folder = tmp_path_factory.mktemp("desk")
    with oidc_provider(folder) as provider:
        settings = api_settings(
            folder / "api", f"sqlite:///{folder / 'modtag.db'}", redis_server.url, **provider.settings()
        )
        with running_api(settings) as api:
            kept, erased = decided_upload(api, "astronaut"), decided_upload(api, "coffee")
            assert api.client.delete(f"/v1/jobs/{erased}").status_code == 200
            reviewer_key = admin_key(api.db_url, role="review", name="Rui (reviewer)")
            yield Desk(api, provider, reviewer_key, kept, erased)


def signed_in_page(browser: Any, base_url: str, key: str, next_path: str) -> Any:
    """A page of a new browser context signed in with `key` through the form, at `next_path`."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{base_url}/dashboard/login?next={next_path}")
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(next_path) + "$"))
    return page


def css_filter(locator: Any) -> str:
    return str(locator.evaluate("element => getComputedStyle(element).filter"))


def loaded(page: Any, image: Any) -> None:
    image.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())


def test_images_are_blurred_until_clicked_and_greyscale_is_remembered(
    desk: Desk, browser: Any, screenshots: Path
) -> None:
    base = desk.api.base_url
    page = signed_in_page(browser, base, desk.reviewer_key, "/dashboard/review")
    card = page.locator(f"article[data-job='{desk.kept}']")
    image = card.locator("img.thumb")
    loaded(page, image)
    every_image_blurred = (
        "() => [...document.querySelectorAll('main img')].every(i => /blur/.test(getComputedStyle(i).filter))"
    )
    assert page.evaluate(every_image_blurred)
    assert css_filter(image) == "blur(24px)"
    page.screenshot(path=str(screenshots / "desk-blurred.png"), full_page=True)

    card.locator("label.sensitive").click()  # reveal this one
    assert css_filter(image) == "none"
    card.screenshot(path=str(screenshots / "desk-revealed.png"))
    card.locator("label.sensitive").click()  # and blur it again
    assert css_filter(image) == "blur(24px)"
    card.locator("input.reveal").focus()  # the keyboard does the same: Space on the focused control
    page.keyboard.press("Space")
    assert css_filter(image) == "none"

    page.click("[data-testid=greyscale]")
    page.wait_for_url(re.compile(r"/dashboard/review$"))
    image = page.locator(f"article[data-job='{desk.kept}'] img.thumb")
    assert css_filter(image) == "grayscale(1) blur(24px)"  # still blurred after the reload, grey too
    page.locator(f"article[data-job='{desk.kept}'] label.sensitive").click()
    assert css_filter(image) == "grayscale(1)"
    page.screenshot(path=str(screenshots / "desk-greyscale.png"), full_page=True)

    # Remembered: on every page, in a new tab, and after signing out and in again in this browser.
    page.goto(f"{base}/dashboard/jobs/{desk.kept}")
    assert css_filter(page.locator("img.thumb")) == "grayscale(1) blur(24px)"
    other_tab = page.context.new_page()
    other_tab.goto(f"{base}/dashboard/flagged?action=all")
    assert other_tab.locator("body.greyscale").count() == 1
    other_tab.click("text=Sign out")
    other_tab.fill("#key", desk.reviewer_key)
    other_tab.click("button[type=submit]")
    other_tab.wait_for_url(re.compile(r"/dashboard/flagged$"))
    assert other_tab.locator("body.greyscale").count() == 1

    # An erased job: a placeholder where its image was, never a broken image.
    other_tab.goto(f"{base}/dashboard/jobs/{desk.erased}")
    assert other_tab.locator("[data-testid=erased]").is_visible()
    assert other_tab.locator("main img").count() == 0
    other_tab.goto(f"{base}/dashboard/flagged?action=all")
    erased_card = other_tab.locator(f"article[data-job='{desk.erased}']")
    assert erased_card.locator("[data-testid=erased]").is_visible() and erased_card.locator("img").count() == 0
    other_tab.screenshot(path=str(screenshots / "desk-erased-placeholder.png"), full_page=True)

    other_tab.click("[data-testid=greyscale]")  # back to colour
    other_tab.wait_for_load_state()
    assert other_tab.locator("body.greyscale").count() == 0
    page.context.close()


def test_the_banks_page_and_block_and_add_to_bank(desk: Desk, browser: Any, screenshots: Path, tmp_path: Path) -> None:
    base = desk.api.base_url
    created = desk.api.client.post("/v1/banks", json={"name": "known-bad", "description": "images reviewers blocked"})
    assert created.status_code == 201, created.text
    job_id = decided_upload(desk.api, "chelsea")
    page = signed_in_page(browser, base, desk.api.key, "/dashboard/review")

    card = page.locator(f"article[data-job='{job_id}']")
    card.locator("textarea[name=reason]").fill("Known bad image: bank it")
    card.locator("[data-testid=bank]").select_option("known-bad")
    card.locator("[data-testid=block-and-bank]").click()
    page.wait_for_load_state()
    assert "hashes added to the bank" in page.inner_text("[role=status]")

    page.click("header >> text=Banks")
    page.wait_for_url(re.compile(r"/dashboard/banks$"))
    row = page.locator("tr.bank[data-bank='known-bad']")
    assert "block" in row.inner_text() and "images reviewers blocked" in row.inner_text()
    page.screenshot(path=str(screenshots / "banks.png"), full_page=True)
    row.locator("a").click()
    page.wait_for_url(re.compile(r"/dashboard/banks/known-bad$"))
    items = page.locator("tr.bank-item")
    assert items.count() == 1 and f"review of job {job_id}: Known bad image" in items.first.inner_text()

    hash_list = tmp_path / "partner-list.csv"
    hash_list.write_text(f"signal_type,signal,note\npdq,{'a' * 64},from a partner\nsha256,{'c' * 64},\n")
    page.set_input_files("[data-testid=import] input[type=file]", str(hash_list))
    page.click("[data-testid=import] button[type=submit]")
    page.wait_for_url(re.compile(r"/dashboard/banks/known-bad\?notice=imported"))
    assert "2 hashes added, 0 the bank already held" in page.inner_text("[role=status]")
    assert items.count() == 3
    page.screenshot(path=str(screenshots / "bank-items.png"), full_page=True)

    items.first.locator("[data-testid=remove]").click()
    page.wait_for_url(re.compile(r"notice=item_removed$"))
    assert "Removed" in page.inner_text("[role=status]") and items.count() == 2
    page.context.close()
    job = desk.api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["review"]["resolution"]["action"] == "block"


def test_signing_in_through_the_identity_provider(desk: Desk, browser: Any, screenshots: Path) -> None:
    """The provider's own sign-in form in Chromium; back on the dashboard with the mapped tenant and role."""
    desk.provider.set_user("mia", {"name": "Mia Moderator", "modtag_tenant": "default", "modtag_role": "review"})
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    assert page.goto(f"{desk.api.base_url}/dashboard/review").status == 401
    page.click("[data-testid=sso]")
    page.wait_for_url(re.compile(re.escape(desk.provider.issuer) + r"/oauth2/authorize\?"))
    page.screenshot(path=str(screenshots / "sso-provider-form.png"), full_page=True)
    page.fill("input[name=sub]", "mia")
    page.click("button:text-is('Authorize')")
    page.wait_for_url(re.compile(r"/dashboard/review$"))
    assert "Mia Moderator (sso) · review · tenant default" in page.inner_text("header")
    assert page.locator(f"article[data-job='{desk.kept}']").count() == 1  # the tenant's queue
    cookie = next(c for c in context.cookies() if c["name"] == "modtag_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.screenshot(path=str(screenshots / "sso-signed-in.png"), full_page=True)
    assert page.goto(f"{desk.api.base_url}/dashboard/audit").status == 403  # a reviewer, not an admin
    page.goto(f"{desk.api.base_url}/dashboard/review")
    page.click("text=Sign out")
    # Signing out ends the provider's session too (RP-initiated logout): its page, then back to modtag's sign-in.
    page.wait_for_url(re.compile(re.escape(desk.provider.issuer) + r"/oauth2/end_session\?"))
    assert not any(c["name"] == "modtag_session" for c in context.cookies())  # modtag's own session ended first
    page.click("button:text-is('End session')")
    page.wait_for_url(re.compile(r"/dashboard/login$"))
    context.close()

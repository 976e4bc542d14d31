"""The kinder review desk over real HTTP (SQLite and PostgreSQL): every dashboard image is blurred until clicked, the
greyscale choice is a cookie the pages honour, an erased job shows a placeholder instead of a broken image.

Decisions are stored the way the worker stores them (`claim_job` + `store_decision`); no worker runs.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import httpx
import pytest
from PIL import Image

from core.db import session_scope
from core.jobs import claim_job, store_decision
from core.tables import Decision
from tests.support.api import Api, admin_key, assert_error
from tests.support.dashboard import csrf_of, signed_in

pytestmark = pytest.mark.timeout(120)

CATEGORIES = {"weapons": {"score": 0.8, "action": "review", "fired": True, "decided_by": "probe", "reason": None}}
THUMBNAIL = re.compile(r'<img class="thumb" src="/v1/jobs/([0-9a-f]+)/thumbnail"')


@dataclass
class Jobs:
    kept: str
    erased: str
    reviewer_key: str


@pytest.fixture(scope="module")
def jobs(api: Api) -> Jobs:
    kept, erased = upload(api), upload(api)
    assert api.client.delete(f"/v1/jobs/{erased}").status_code == 200
    return Jobs(kept, erased, admin_key(api.db_url, role="review", name="Rui (reviewer)"))


def upload(api: Api) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    response = api.upload(buffer.getvalue(), filename="photo.png", mime="image/png")
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    with session_scope(api.db_url) as session:
        job = claim_job(session, job_id, "test-worker", 60)
        assert job is not None
        decision = Decision(
            job_id=job_id, action="review", policy="moderation", policy_version="v1", categories=CATEGORIES
        )
        store_decision(session, job, decision)
    return job_id


def veiled_images(html: str) -> tuple[list[str], list[str]]:
    """(ids of every thumbnail on the page, ids of those inside a `sensitive` label with its reveal checkbox)."""
    every = THUMBNAIL.findall(html)
    veiled = re.findall(
        r'<label class="sensitive"[^>]*>\s*<input type="checkbox" class="reveal"[^>]*>\s*'
        r'(?:<div class="ocr-frame">\s*)?<img class="thumb" src="/v1/jobs/([0-9a-f]+)/thumbnail"',
        html,
    )
    return every, veiled


def test_every_thumbnail_on_every_page_is_blurred_until_clicked(api: Api, jobs: Jobs) -> None:
    with signed_in(api.base_url, jobs.reviewer_key) as browser:
        pages = {
            "flagged": browser.get("/dashboard/flagged", params={"action": "all"}),
            "review": browser.get("/dashboard/review"),
            "job": browser.get(f"/dashboard/jobs/{jobs.kept}"),
        }
    for name, page in pages.items():
        assert page.status_code == 200, (name, page.text[:500])
        every, veiled = veiled_images(page.text)
        assert jobs.kept in every, name
        assert every == veiled, name  # none shown bare
        assert 'class="greyscale"' not in page.text  # colour until the viewer asks


def test_an_erased_job_shows_a_placeholder_not_a_broken_image(api: Api, jobs: Jobs) -> None:
    with signed_in(api.base_url, api.key) as browser:
        flagged = browser.get("/dashboard/flagged", params={"action": "all"}).text
        job_page = browser.get(f"/dashboard/jobs/{jobs.erased}").text
        review = browser.get("/dashboard/review").text
        assert browser.get(f"/v1/jobs/{jobs.erased}/thumbnail").status_code == 404  # what the <img> would have got
    for html in (flagged, job_page, review):
        assert f"/v1/jobs/{jobs.erased}/thumbnail" not in html
    card = re.search(rf'<article class="card" data-job="{jobs.erased}">(.*?)</article>', flagged, re.S)
    assert card and 'data-testid="erased"' in card.group(1)
    assert 'data-testid="erased"' in job_page


def test_greyscale_is_remembered_in_a_cookie_and_needs_the_csrf_token(api: Api, jobs: Jobs) -> None:
    with signed_in(api.base_url, jobs.reviewer_key) as browser:
        page = browser.get("/dashboard/review")
        token = csrf_of(page)
        assert_error(browser.post("/dashboard/preferences", data={"greyscale": "on"}), 403, "csrf_invalid")
        assert_error(
            browser.post("/dashboard/preferences", data={"greyscale": "on", "csrf_token": "forged"}),
            403,
            "csrf_invalid",
        )
        hostile = browser.post("/dashboard/preferences", data={"greyscale": "x" * 10_000, "csrf_token": token})
        assert hostile.status_code == 422
        assert "modtag_greyscale" not in browser.cookies

        on = browser.post(
            "/dashboard/preferences",
            data={"greyscale": "on", "csrf_token": token, "next": "https://evil.example/"},
            follow_redirects=False,
        )
        assert on.status_code == 303 and on.headers["location"] == "/dashboard/flagged"  # no open redirect
        cookie = on.headers["set-cookie"]
        assert "modtag_greyscale=1" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        for path in ("/dashboard/flagged", "/dashboard/review", f"/dashboard/jobs/{jobs.kept}"):
            html = browser.get(path).text
            assert '<body class="greyscale">' in html, path
            assert 'aria-pressed="true"' in html

        off = browser.post(
            "/dashboard/preferences",
            data={"greyscale": "off", "csrf_token": token, "next": f"/dashboard/jobs/{jobs.kept}"},
            follow_redirects=False,
        )
        assert off.headers["location"] == f"/dashboard/jobs/{jobs.kept}"
        assert "modtag_greyscale" not in browser.cookies
        assert '<body class="greyscale">' not in browser.get("/dashboard/review").text


def test_the_greyscale_switch_needs_a_sign_in(api: Api) -> None:
    with httpx.Client(base_url=api.base_url) as anonymous:
        assert_error(anonymous.post("/dashboard/preferences", data={"greyscale": "on"}), 401, "auth_required")

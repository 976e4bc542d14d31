"""The text OCR read, on the dashboard over real HTTP (SQLite and PostgreSQL): the job page draws its boxes over the
thumbnail and lists its lines, escaped; the Flagged page filters by it, literally, within the signed-in tenant.

Decisions are stored the way the worker stores them (`claim_job` + `store_decision`); no worker runs.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from PIL import Image

from core.db import session_scope
from core.jobs import claim_job, store_decision
from core.tables import Decision
from modtag.client import ApiClient
from tests.support.api import Api, admin_key, assert_error
from tests.support.jobs import claimed_url_job

pytestmark = pytest.mark.timeout(120)

WIDTH, HEIGHT = 640, 400
XSS_LINE = "<script>alert(1)</script>"
CATEGORIES = {"contact": {"score": 0.9, "action": "block", "fired": True, "decided_by": "text", "reason": None}}
PHONE = {"text": "CALL 555-0100", "score": 0.934, "box": [40, 30, 300, 80]}
PERCENT = {"text": "100% cotton_blend", "score": 0.75, "box": [40, 300, 420, 350]}
ESCAPED = {"text": XSS_LINE, "score": 0.5, "box": [350, 120, 600, 170]}
# Wildcards read as LIKE's would match these lines too: "0%" any "0", "n_b" "n-b".
DECOY = [{"text": "1000 watts, cotton-blend", "score": 0.88, "box": [10, 10, 200, 40]}]


@dataclass
class Jobs:
    """The jobs of the module: tenant `default` (the `api` fixture's admin) and one of tenant `globex`."""

    with_text: str
    decoy: str
    no_text: str
    erased: str
    other_tenant: str
    other_key: str


@pytest.fixture(scope="module")
def jobs(api: Api) -> Jobs:
    with_text = upload(api, [PHONE, ESCAPED, PERCENT])
    decoy = upload(api, DECOY)
    no_text = upload(api, None)
    erased = upload(api, [{"text": "erased secret line", "score": 0.9, "box": [0, 0, 10, 10]}])
    assert api.client.delete(f"/v1/jobs/{erased}").status_code == 200
    other_key = admin_key(api.db_url, tenant="globex", name="globex admin")
    with ApiClient(api.base_url, key=other_key, timeout_s=30) as other:
        response = other.post("/v1/jobs", files={"image": ("photo.png", png(), "image/png")})
    assert response.status_code == 202, response.text
    other_tenant = response.json()["id"]
    store(api.db_url, other_tenant, [PHONE])
    return Jobs(with_text, decoy, no_text, erased, other_tenant, other_key)


def upload(api: Api, lines: list[dict[str, Any]] | None) -> str:
    response = api.upload(png(), filename="photo.png", mime="image/png")
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    store(api.db_url, job_id, lines)
    return job_id


def store(db_url: str, job_id: str, lines: list[dict[str, Any]] | None) -> None:
    """The worker's write path: claim the job, store a `block` decision with the lines read."""
    with session_scope(db_url) as session:
        job = claim_job(session, job_id, "test-worker", 60)
        assert job is not None
        decision = Decision(
            job_id=job_id, action="block", policy="moderation", policy_version="v1", categories=CATEGORIES, text=lines
        )
        store_decision(session, job, decision)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (240, 240, 240)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def sign_in(api: Api, key: str) -> Iterator[httpx.Client]:
    """A client signed in through the form, as a browser would: it holds the session cookie, no key."""
    with ApiClient(api.base_url, timeout_s=30) as client:
        form = client.get("/dashboard/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token, form.text
        response = client.post(
            "/dashboard/login", data={"key": key, "csrf_token": token.group(1)}, follow_redirects=False
        )
        assert response.status_code == 303, response.text
        yield client


def flagged_ids(client: httpx.Client, **params: str) -> list[str]:
    page = client.get("/dashboard/flagged", params=params)
    assert page.status_code == 200, page.text[:500]
    return re.findall(r'<article class="card" data-job="([0-9a-f]+)"', page.text)


def test_the_job_page_draws_the_boxes_and_lists_the_lines_escaped(api: Api, jobs: Jobs) -> None:
    with sign_in(api, api.key) as browser:
        page = browser.get(f"/dashboard/jobs/{jobs.with_text}")
    assert page.status_code == 200, page.text[:500]
    html = page.text
    svg = re.search(r'<svg viewBox="([^"]+)"[^>]*data-testid="ocr-boxes">(.*?)</svg>', html, re.S)
    assert svg, html
    assert svg.group(1) == f"0 0 {WIDTH} {HEIGHT}"  # the original image's pixels, whatever the thumbnail's size
    rects = re.findall(
        r'<rect x="(\d+)" y="(\d+)" width="(\d+)" height="(\d+)"[^>]*><title>(.*?)</title>', svg.group(2)
    )
    assert rects == [
        ("40", "30", "260", "50", "CALL 555-0100"),
        ("350", "120", "250", "50", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("40", "300", "380", "50", "100% cotton_blend"),
    ]
    table = re.search(r'<table data-testid="ocr-lines">(.*?)</table>', html, re.S)
    assert table, html
    cells = re.findall(r"<tr><td>(\d+)</td><td>(.*?)</td><td>([0-9.]+)</td>", table.group(1))
    assert cells == [
        ("1", "CALL 555-0100", "0.934"),
        ("2", "&lt;script&gt;alert(1)&lt;/script&gt;", "0.500"),
        ("3", "100% cotton_blend", "0.750"),
    ]
    assert XSS_LINE not in html


def test_no_text_and_erased_jobs_show_nothing_extra(api: Api, jobs: Jobs) -> None:
    with sign_in(api, api.key) as browser:
        for job_id in (jobs.no_text, jobs.erased):
            page = browser.get(f"/dashboard/jobs/{job_id}")
            assert page.status_code == 200, page.text[:500]
            assert "ocr-boxes" not in page.text and "ocr-lines" not in page.text and "<rect" not in page.text
            assert "Text read in the image" not in page.text and "erased secret" not in page.text
        # Another tenant's job page is not found, its lines never shown.
        assert_error(browser.get(f"/dashboard/jobs/{jobs.other_tenant}"), 404, "job_not_found")


def test_the_flagged_page_filters_by_the_text_read(api: Api, jobs: Jobs) -> None:
    with sign_in(api, api.key) as browser:
        everything = flagged_ids(browser)
        assert {jobs.with_text, jobs.decoy, jobs.no_text} <= set(everything)
        assert jobs.other_tenant not in everything
        assert flagged_ids(browser, text="call 555") == [jobs.with_text]  # case-insensitive
        assert flagged_ids(browser, text="  CALL 555-0100 ") == [jobs.with_text]  # trimmed
        assert flagged_ids(browser, text="watts") == [jobs.decoy]
        assert flagged_ids(browser, text="0%") == [jobs.with_text]  # % is a percent sign, not "anything"
        assert flagged_ids(browser, text="n_b") == [jobs.with_text]  # _ is an underscore, not "any character"
        assert flagged_ids(browser, text="%") == [jobs.with_text]
        assert flagged_ids(browser, text="/") == [jobs.with_text]  # the LIKE escape character is itself too
        assert flagged_ids(browser, text="//") == []
        assert flagged_ids(browser, text="<script>") == [jobs.with_text]
        assert flagged_ids(browser, text="score") == []  # the JSON's keys are not text read
        assert flagged_ids(browser, text="erased secret") == []
        assert flagged_ids(browser, text="call", action="allow") == []  # with the other filters
        assert flagged_ids(browser, text="call", action="block", policy="moderation") == [jobs.with_text]
        assert flagged_ids(browser, text="") == everything  # an empty box filters nothing
        page = browser.get("/dashboard/flagged", params={"text": "<b>100%"})
        assert 'value="&lt;b&gt;100%"' in page.text  # the box keeps what was typed, escaped
        assert_error(browser.get("/dashboard/flagged", params={"text": "x" * 201}), 422, "invalid_field")
        assert flagged_ids(browser, text="x" * 200) == []
    with sign_in(api, jobs.other_key) as other:
        assert flagged_ids(other, text="call 555") == [jobs.other_tenant]  # never the default tenant's


def test_the_text_filter_pages_with_the_others(api: Api, jobs: Jobs) -> None:
    with session_scope(api.db_url) as session:
        for _ in range(31):
            job = claimed_url_job(
                session,
                tenant="default",
                policy="moderation",
                policy_version="v1",
                image_url="https://example.com/a.jpg",
                worker="test-worker",
            )
            decision = Decision(
                job_id=job.id,
                action="block",
                policy="moderation",
                policy_version="v1",
                categories=CATEGORIES,
                text=[{"text": "Bulk line for paging", "score": 0.9, "box": [0, 0, 5, 5]}],
            )
            store_decision(session, job, decision)
    with sign_in(api, api.key) as browser:
        first = browser.get("/dashboard/flagged", params={"text": "BULK LINE"})
        ids = re.findall(r'data-job="([0-9a-f]+)"', first.text)
        assert len(ids) == 30
        pager = re.search(r'<p class="pager"><a href="\?([^"]+)">', first.text)
        assert pager and "text=BULK%20LINE" in pager.group(1), first.text[-800:]
        second = browser.get("/dashboard/flagged?" + pager.group(1).replace("&amp;", "&"))
        more = re.findall(r'data-job="([0-9a-f]+)"', second.text)
        assert len(more) == 1 and not set(more) & set(ids)
        # A URL job has no thumbnail to draw on: its lines are listed, without boxes.
        page = browser.get(f"/dashboard/jobs/{more[0]}")
        assert "ocr-lines" in page.text and "ocr-boxes" not in page.text and "Bulk line for paging" in page.text

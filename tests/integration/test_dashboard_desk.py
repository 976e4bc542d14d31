"""The kinder review desk over real HTTP (SQLite and PostgreSQL): every dashboard image is blurred until clicked, the
greyscale choice is a cookie the pages honour, an erased job shows a placeholder instead of a broken image, the
Banks pages (list, items, remove, import a hash list), and "Block and add to bank" on a review item.

Decisions are stored the way the worker stores them (`claim_job` + `store_decision`); no worker runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx
import pytest
from sqlmodel import select

from core.db import session_scope
from core.tables import Bank, BankItem
from tests.support.api import Api, admin_key, assert_error
from tests.support.dashboard import csrf_of, decided_upload, signed_in

pytestmark = pytest.mark.timeout(120)

THUMBNAIL = re.compile(r'<img class="thumb" src="/v1/jobs/([0-9a-f]+)/thumbnail"')


@dataclass
class Jobs:
    kept: str
    erased: str
    reviewer_key: str


@pytest.fixture(scope="module")
def jobs(api: Api) -> Jobs:
    kept, erased = decided_upload(api), decided_upload(api)
    assert api.client.delete(f"/v1/jobs/{erased}").status_code == 200
    return Jobs(kept, erased, admin_key(api.db_url, role="review", name="Rui (reviewer)"))


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


# -- Banks ------------------------------------------------------------------------------------------------------

PDQ_A, PDQ_B = "a" * 64, "b" * 63 + "0"
SHA_C = "c" * 64


def make_bank(api: Api, name: str, kind: str = "block") -> None:
    response = api.client.post("/v1/banks", json={"name": name, "description": f"{name} <i>list</i>", "kind": kind})
    assert response.status_code == 201, response.text


def bank_items(api: Api, name: str) -> list[BankItem]:
    with session_scope(api.db_url) as session:
        bank = session.exec(select(Bank).where(Bank.name == name, Bank.tenant == "default")).one()
        return list(session.exec(select(BankItem).where(BankItem.bank_id == bank.id)).all())


def import_file(client: httpx.Client, bank: str, token: str, content: bytes, fmt: str = "csv") -> httpx.Response:
    return client.post(
        f"/dashboard/banks/{bank}/import",
        data={"csrf_token": token, "format": fmt},
        files={"file": ("list.csv", content, "text/csv")},
        follow_redirects=False,
    )


def test_the_banks_pages_list_import_and_remove(api: Api, jobs: Jobs) -> None:
    make_bank(api, "csam-hashes")
    make_bank(api, "our-logos", kind="allow")
    with signed_in(api.base_url, api.key) as admin:
        listing = admin.get("/dashboard/banks")
        assert listing.status_code == 200, listing.text[:500]
        assert re.findall(r'<tr class="bank" data-bank="([^"]+)">', listing.text)[:2] == ["csam-hashes", "our-logos"]
        assert "csam-hashes &lt;i&gt;list&lt;/i&gt;" in listing.text  # escaped

        page = admin.get("/dashboard/banks/csam-hashes")
        token = csrf_of(page)
        assert 'data-testid="import"' in page.text and "This bank is empty." in page.text
        csv = f"signal_type,signal,note\npdq,{PDQ_A},from a partner\npdq,{PDQ_B},\nsha256,{SHA_C},<b>x</b>\n".encode()
        done = import_file(admin, "csam-hashes", token, csv)
        assert done.status_code == 303, done.text[:500]
        shown = admin.get(done.headers["location"])
        assert "Imported: 3 hashes added, 0 the bank already held." in shown.text
        assert len(re.findall(r'<tr class="bank-item"', shown.text)) == 3
        assert "&lt;b&gt;x&lt;/b&gt;" in shown.text and "<b>x</b>" not in shown.text
        again = admin.get(import_file(admin, "csam-hashes", token, csv).headers["location"])
        assert "Imported: 0 hashes added, 3 the bank already held." in again.text
        hma = admin.get(
            import_file(admin, "csam-hashes", token, f"pdq {'d' * 64}\n".encode(), "hma").headers["location"]
        )
        assert "Imported: 1 hash added" in hma.text

        # Broken, hostile and huge lists: a page naming the problem, nothing added.
        bad = import_file(admin, "csam-hashes", token, b"signal_type,signal\npdq,not-a-hash\npdq," + b"f" * 64 + b"\n")
        assert bad.status_code == 422 and "line 2" in bad.text and "nothing was added" in bad.text
        binary = import_file(admin, "csam-hashes", token, b"\xff\xfe\x00garbage\n" * 10)
        assert binary.status_code == 422 and "not UTF-8" in binary.text
        huge = import_file(
            admin, "csam-hashes", token, b"pdq," + b"a" * 64 + b"\n" * (api.settings.bank_import_max_bytes)
        )
        assert huge.status_code == 413, huge.text[:300]
        assert 'role="alert"' in huge.text or huge.headers["content-type"].startswith("application/json")
        assert_error(import_file(admin, "csam-hashes", "forged", csv), 403, "csrf_invalid")
        assert_error(import_file(admin, "no-such-bank", token, csv), 404, "bank_not_found")
        assert len(bank_items(api, "csam-hashes")) == 4

        # Remove an item: CSRF first, then it is gone (and the audit log says who).
        item = bank_items(api, "csam-hashes")[0]
        remove = f"/dashboard/banks/csam-hashes/items/{item.id}/delete"
        assert_error(admin.post(remove, data={"csrf_token": "forged"}), 403, "csrf_invalid")
        removed = admin.post(remove, data={"csrf_token": token}, follow_redirects=False)
        assert removed.headers["location"] == "/dashboard/banks/csam-hashes?notice=item_removed"
        assert item.id not in {row.id for row in bank_items(api, "csam-hashes")}
        twice = admin.post(remove, data={"csrf_token": token}, follow_redirects=True)
        assert "removed already?" in twice.text
        assert admin.get("/v1/audit", params={"action": "bank.item_delete"}).status_code == 200

    with signed_in(api.base_url, jobs.reviewer_key) as reviewer:
        page = reviewer.get("/dashboard/banks/csam-hashes")
        assert page.status_code == 200 and 'data-testid="remove"' in page.text
        assert 'data-testid="import"' not in page.text  # importing is for admins
        assert_error(import_file(reviewer, "csam-hashes", csrf_of(page), b"pdq," + PDQ_A.encode()), 403, "forbidden")

    other_key = admin_key(api.db_url, tenant="globex", name="globex admin")
    with signed_in(api.base_url, other_key) as outsider:
        assert "csam-hashes" not in outsider.get("/dashboard/banks").text
        assert_error(outsider.get("/dashboard/banks/csam-hashes"), 404, "bank_not_found")
        token = csrf_of(outsider.get("/dashboard/banks"))
        assert_error(outsider.post(remove, data={"csrf_token": token}), 404, "bank_not_found")


def test_block_and_add_to_bank_in_one_click(api: Api, jobs: Jobs) -> None:
    make_bank(api, "reviewed-bad")
    make_bank(api, "reviewed-fine", kind="allow")
    job_id = decided_upload(api, "coffee")
    with signed_in(api.base_url, jobs.reviewer_key) as reviewer:
        queue = reviewer.get("/dashboard/review")
        card = re.search(rf'<article class="card" data-job="{job_id}">(.*?)</article>', queue.text, re.S)
        assert card and 'data-testid="block-and-bank"' in card.group(1)
        choices = re.findall(r'<option value="([^"]+)">', card.group(1))
        assert "reviewed-bad" in choices and "reviewed-fine" not in choices  # no allow-lists offered
        token = csrf_of(queue)
        form = {
            "csrf_token": token,
            "next": "/dashboard/review",
            "reason": "known bad image",
            "action": "block_and_bank",
        }

        assert_error(
            reviewer.post(f"/dashboard/review/{job_id}/resolve", data={**form, "csrf_token": "x"}), 403, "csrf_invalid"
        )
        for bank, notice in (
            ("no-such-bank", "bank_not_found"),
            ("reviewed-fine", "bank_is_allow_list"),
            ("x" * 65, None),
        ):
            refused = reviewer.post(
                f"/dashboard/review/{job_id}/resolve", data={**form, "bank": bank}, follow_redirects=False
            )
            if notice is None:
                assert refused.status_code == 422
            else:
                assert refused.headers["location"].endswith(f"notice={notice}")
        assert api.client.get(f"/v1/jobs/{job_id}").json()["review"]["state"] == "open"  # nothing changed

        done = reviewer.post(
            f"/dashboard/review/{job_id}/resolve", data={**form, "bank": "reviewed-bad"}, follow_redirects=False
        )
        assert done.headers["location"] == "/dashboard/review?notice=resolved_banked"
        assert "hashes added to the bank" in reviewer.get(done.headers["location"]).text

    job = api.client.get(f"/v1/jobs/{job_id}").json()
    assert (
        job["review"]["resolution"]["action"] == "block" and job["review"]["resolution"]["reason"] == "known bad image"
    )
    (item,) = bank_items(api, "reviewed-bad")
    assert (item.sha256, item.pdq) == (job["hashes"]["sha256"], job["hashes"]["pdq"])
    assert item.note == f"review of job {job_id}: known bad image"
    audit = api.client.get("/v1/audit", params={"job_id": job_id}).json()["data"]
    assert "review.resolved" in {entry["action"] for entry in audit}

"""The dashboard as a browser without JavaScript uses it (sign in through the form, read a page's CSRF token), and
jobs to show on it, stored the way the worker stores them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from core.db import session_scope
from core.hashes import image_hashes
from core.images import ImageLimits, decode_image
from core.jobs import claim_job, record_hashes, store_decision
from core.tables import Decision
from modtag.client import ApiClient
from tests.support.api import Api
from tests.support.photos import photo_bytes

REVIEW_CATEGORIES = {
    "weapons": {"score": 0.8, "action": "review", "fired": True, "decided_by": "probe", "reason": None}
}


@contextmanager
def signed_in(base_url: str, key: str, next_path: str = "/dashboard/flagged") -> Iterator[httpx.Client]:
    """A client signed in through the form: it holds the session cookie, never the key."""
    with ApiClient(base_url, timeout_s=30) as client:
        form = client.get("/dashboard/login")
        response = client.post(
            "/dashboard/login",
            data={"key": key, "csrf_token": csrf_of(form), "next": next_path},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text
        yield client


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token a page's forms carry."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text[:2000]
    return match.group(1)


def decided_upload(api: Api, photo: str = "astronaut", categories: dict[str, Any] | None = None) -> str:
    """A job of `photo` uploaded through the API and decided `review` the way the worker stores it (its hashes
    recorded, then the decision, which puts it in the review queue); no worker runs."""
    data = photo_bytes(photo)
    response = api.upload(data, filename=f"{photo}.jpg", mime="image/jpeg")
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    hashes = image_hashes(data, decode_image(data, ImageLimits.from_settings(api.settings)))
    with session_scope(api.db_url) as session:
        job = claim_job(session, job_id, "test-worker", 60)
        assert job is not None
        record_hashes(session, job, hashes.sha256, hashes.pdq, hashes.pdq_quality)
        decision = Decision(
            job_id=job_id,
            action="review",
            policy="moderation",
            policy_version="v1",
            categories=categories or REVIEW_CATEGORIES,
        )
        store_decision(session, job, decision)
    return job_id

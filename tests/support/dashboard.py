"""The dashboard as a browser without JavaScript uses it: sign in through the form, read a page's CSRF token."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from modtag.client import ApiClient


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

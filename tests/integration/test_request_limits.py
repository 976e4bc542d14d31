"""Limits applied before any route reads a body (api/limits.py, api.app.server_config), over real HTTP: missing,
wrong and revoked keys refused unread, small bodies on every route but the uploads, no stray multipart, bounded
headers."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core.auth import cli_principal, create_key, revoke_key
from core.db import session_scope
from tests.support.api import Api, assert_error
from tests.support.sockets import connection, read_answer

BIG = 50 * 1024 * 1024
CHUNK = b"x" * (1024 * 1024)


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    return {"max_body_bytes": 4096, "max_header_bytes": 8192}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _promise_a_big_body(
    sock: socket.socket,
    extra_headers: str = "",
    *,
    path: str = "/v1/review/x/resolve",
    content_type: str = "application/json",
    length: int = BIG,
) -> tuple[int, dict[str, Any]]:
    """Send only the head of a post (50 MB of JSON by default): a server that waited for the body would never
    answer (the socket's timeout is only a safety net)."""
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n".encode()
        + f"{extra_headers}Content-Length: {length}\r\n\r\n".encode()
    )
    return read_answer(sock)


def test_an_anonymous_50_mb_post_is_refused_before_its_body_is_read(api: Api) -> None:
    before = _rss_bytes()
    for _ in range(3):
        with connection(api.base_url) as sock:
            status, body = _promise_a_big_body(sock)
            assert (status, body["code"]) == (401, "auth_required")
            with contextlib.suppress(OSError):  # the server may close while the rest arrives
                for _ in range(BIG // len(CHUNK)):
                    sock.sendall(CHUNK)
    assert _rss_bytes() - before < 40 * 1024 * 1024


@pytest.mark.parametrize(
    ("path", "content_type", "length"),
    [
        ("/v1/review/x/resolve", "application/json", BIG),
        ("/v1/review/x/resolve", "application/json", 4000),  # under the cap: a route that parsed first would wait
        ("/v1/jobs", "multipart/form-data; boundary=b", BIG),
        ("/v1/listings", "multipart/form-data; boundary=b", BIG),
    ],
)
def test_a_wrong_or_revoked_key_is_refused_before_the_body_is_read(
    api: Api, path: str, content_type: str, length: int
) -> None:
    with session_scope(api.db_url) as session:
        row, revoked = create_key(session, role="admin", tenant="default", name="old", actor=cli_principal("default"))
        revoke_key(session, row.id, cli_principal("default"))
    for header, code in (
        ("Authorization: Bearer mtk_wrong", "auth_invalid"),
        ("X-API-Key: mtk_wrong", "auth_invalid"),
        ("Authorization: Basic abc", "auth_invalid"),
        (f"Authorization: Bearer {revoked}", "auth_revoked"),
        ("Cookie: modtag_session=stale", "auth_required"),  # a cookie never makes a /v1 write
    ):
        with connection(api.base_url) as sock:
            status, body = _promise_a_big_body(
                sock, header + "\r\n", path=path, content_type=content_type, length=length
            )
        assert (status, body["code"]) == (401, code), (header, body)
    # The same key check as the route's: a valid key reaches the route (which reads and judges the body).
    with connection(api.base_url) as sock:
        sock.sendall(
            b"POST /v1/review/x/resolve HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {api.key}\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        )
        status, body = read_answer(sock)
    assert (status, body["code"]) == (422, "invalid_field")


def test_a_large_body_is_413_on_every_route_but_the_uploads(api: Api) -> None:
    with connection(api.base_url) as sock:
        status, body = _promise_a_big_body(sock, f"Authorization: Bearer {api.key}\r\n")
    assert (status, body["code"]) == (413, "body_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap is counted as the body arrives
        yield b'{"action": "allow", "reason": "'
        for _ in range(16):
            yield b"y" * 1024
        yield b'"}'

    response = api.client.post("/v1/review/x/resolve", content=chunked(), headers={"Content-Type": "application/json"})
    assert_error(response, 413, "body_too_large")
    # A small body is the route's business as before: an unknown job is 404.
    small = api.client.post("/v1/review/x/resolve", json={"action": "allow", "reason": "fine"})
    assert_error(small, 404, "review_not_found")
    with httpx.Client(base_url=api.base_url) as browser:  # the dashboard's forms are capped the same way
        assert_error(browser.post("/dashboard/login", content=b"k=" + b"z" * 8192), 413, "body_too_large")


def test_multipart_goes_only_to_the_upload_routes(api: Api) -> None:
    with httpx.Client(base_url=api.base_url) as browser:
        spooled = browser.post("/dashboard/logout", files={"csrf_token": ("x.bin", b"0" * 2048)})
        assert_error(spooled, 415, "unsupported_media_type")
    form = api.client.post("/v1/review/x/resolve", files={"action": ("a", b"allow")})
    assert_error(form, 415, "unsupported_media_type")


def test_oversized_headers_are_refused(api: Api) -> None:
    with connection(api.base_url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Padding: " + b"p" * 64 * 1024 + b"\r\n\r\n")
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    assert received.split(b" ", 2)[1] in (b"400", b"431"), received[:200]  # 400 from h11 when it arrives in parts
    assert_error(api.client.get("/healthz", headers={"X-Padding": "p" * 9000}), 431, "headers_too_large")
    assert api.client.get("/healthz", headers={"X-Padding": "p" * 1024}).status_code == 200

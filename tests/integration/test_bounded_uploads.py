"""Memory and connections bounded by design (api/bodies.py, api/limits.py, api.app.server_config), over real HTTP
to uvicorn served with the API's own server configuration, from raw sockets: uploads spooled and streamed to the
store, a cap on upload bytes in flight (503 `busy` with Retry-After), and slow senders of headers or bodies cut
off at their deadline."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

from api.app import create_app
from api.bodies import UploadBudget
from core.blobs import open_blob_store
from tests.support.api import Api, assert_error, running_api
from tests.support.photos import photo_bytes
from tests.support.waiting import wait_for

BOUNDARY = "modtagboundary"


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    # Room for one photo upload at a time; short deadlines so that a slow sender is cut off within the test.
    return {
        "upload_bytes_in_flight": 600_000,
        "upload_wait_s": 0.3,
        "body_read_timeout_s": 1.5,
        "keep_alive_timeout_s": 1.0,
    }


def test_an_upload_is_stored_under_the_hash_of_its_bytes(api: Api) -> None:
    data = photo_bytes("astronaut")
    job = api.upload(data).json()
    key = hashlib.sha256(data).hexdigest()
    assert job["hashes"]["sha256"] == key
    assert open_blob_store(api.settings).get(key) == data


def test_past_the_bytes_in_flight_an_upload_waits_then_is_503_busy_and_then_accepted(api: Api) -> None:
    app = create_app(api.settings)
    with running_api(api.settings, app) as served:
        _busy_then_accepted(served, app.state.upload_budget)


def _busy_then_accepted(api: Api, budget: UploadBudget) -> None:
    data = photo_bytes("astronaut")
    body = _multipart(data)
    with _connection(api.base_url) as stalled:
        # Part of a body declared larger than the budget: it holds all of it until its deadline.
        stalled.sendall(_head(api, 700_000) + body[:1000])
        wait_for(lambda: budget.held > 0, 10, "the stalled upload holding the budget")
        started = time.monotonic()
        refused = api.upload(data)
        assert time.monotonic() - started >= 0.3, refused.text  # it waited for room first
        assert_error(refused, 503, "busy")
        assert int(refused.headers["retry-after"]) >= 1
        # The stalled body meets its deadline and gives its room back.
        status, answer = _read_answer(stalled)
        assert status == 408 and answer["code"] == "body_timeout"
    assert api.upload(data).status_code in (200, 202)


def test_past_the_connection_limit_a_request_is_503_busy_in_json_until_a_connection_closes(api: Api) -> None:
    """Old code: uvicorn's own limit answered `Service Unavailable` in plain text (no code, no Retry-After), and
    at the limit itself: MODTAG_API_MAX_CONNECTIONS=2 served one connection."""
    settings = api.settings.model_copy(update={"api_max_connections": 2, "keep_alive_timeout_s": 30.0})
    with running_api(settings) as served, _connection(served.base_url):
        assert served.client.get("/healthz").status_code == 200  # two connections: the limit, not past it
        with _connection(served.base_url):
            refused = wait_for(_refused(served), 10, "the third connection refused")
            assert_error(refused, 503, "busy")
            assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
            assert "MODTAG_API_MAX_CONNECTIONS" in refused.json()["detail"]
        wait_for(lambda: served.client.get("/healthz").status_code == 200, 10, "served once a connection closed")


def _refused(api: Api) -> Any:
    def answer() -> Any:
        response = api.client.get("/healthz")
        return response if response.status_code == 503 else None

    return answer


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_deadline(api: Api) -> None:
    head = _head(api, 100)
    with _connection(api.base_url) as sock:
        started = time.monotonic()
        closed = False
        for byte in head:  # a byte every 50 ms: never idle long enough for a per-read timeout
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if _closed(sock, 0.05):
                closed = True
                break
        assert closed, "the server kept a connection whose headers never finished"
        assert time.monotonic() - started < 1.0 + 2.0  # keep_alive_timeout_s and some slack


def test_a_body_sent_a_byte_at_a_time_is_408_at_the_body_deadline(api: Api) -> None:
    body = _multipart(photo_bytes("astronaut"))
    with _connection(api.base_url) as sock:
        sock.sendall(_head(api, len(body)))
        started = time.monotonic()
        # A byte every 50 ms for 1 s (each read is quick: only the deadline for the whole body can stop it), then
        # nothing more: stopping before the deadline keeps our bytes from racing the server's close (a reset).
        for byte in body:
            if time.monotonic() - started > 1.0:
                break
            sock.sendall(bytes([byte]))
            assert not _readable(sock, 0.05), "answered before the body deadline"
        status, answer = _read_answer(sock)
        assert status == 408 and answer["code"] == "body_timeout", answer
        assert 1.5 - 0.2 < time.monotonic() - started < 1.5 + 2.0  # from the first read, not from the last byte
        wait_for(lambda: _closed(sock, 0.1), 5, "the server closed the connection")


def _multipart(data: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def _head(api: Api, length: int) -> bytes:
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {api.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@contextmanager
def _connection(base_url: str) -> Iterator[socket.socket]:
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=20) as sock:
        yield sock


def _readable(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return True
    except TimeoutError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(20)


def _closed(sock: socket.socket, wait_s: float) -> bool:
    """The server closed the connection (end of stream, or a reset) within `wait_s`; unread answers are skipped."""
    sock.settimeout(wait_s)
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except TimeoutError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(20)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed without answering: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), json.loads(body[:length])

"""Memory and connections bounded by design (api/bodies.py, api/limits.py, api.app.server_config), over real HTTP
to uvicorn served with the API's own server configuration, from raw sockets: uploads spooled and streamed to the
store, a cap on upload bytes in flight (503 `busy` with Retry-After), and slow senders of headers or bodies cut
off at their deadline."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest

from api.app import create_app
from api.bodies import UploadBudget
from core.blobs import open_blob_store
from tests.support.api import Api, assert_error, running_api
from tests.support.photos import photo_bytes
from tests.support.sockets import closed, connection, read_answer, readable
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
    with connection(api.base_url) as stalled:
        # Part of a body declared larger than the budget: it holds all of it until its deadline.
        stalled.sendall(_head(api, 700_000) + body[:1000])
        wait_for(lambda: budget.held > 0, 10, "the stalled upload holding the budget")
        started = time.monotonic()
        refused = api.upload(data)
        assert time.monotonic() - started >= 0.3, refused.text  # it waited for room first
        assert_error(refused, 503, "busy")
        assert int(refused.headers["retry-after"]) >= 1
        # The stalled body meets its deadline and gives its room back.
        status, answer = read_answer(stalled)
        assert status == 408 and answer["code"] == "body_timeout"
    assert api.upload(data).status_code in (200, 202)


def test_past_the_connection_limit_a_request_is_503_busy_in_json_until_a_connection_closes(api: Api) -> None:
    """Old code: uvicorn's own limit answered `Service Unavailable` in plain text (no code, no Retry-After), and
    at the limit itself: MODTAG_API_MAX_CONNECTIONS=2 served one connection."""
    settings = api.settings.model_copy(update={"api_max_connections": 2, "keep_alive_timeout_s": 30.0})
    with running_api(settings) as served, connection(served.base_url):
        assert served.client.get("/healthz").status_code == 200  # two connections: the limit, not past it
        with connection(served.base_url):
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
    with connection(api.base_url) as sock:
        started = time.monotonic()
        cut = False
        for byte in head:  # a byte every 50 ms: never idle long enough for a per-read timeout
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            if closed(sock, 0.05):
                cut = True
                break
        assert cut, "the server kept a connection whose headers never finished"
        assert time.monotonic() - started < 1.0 + 2.0  # keep_alive_timeout_s and some slack


def test_a_body_sent_a_byte_at_a_time_is_408_at_the_body_deadline(api: Api) -> None:
    body = _multipart(photo_bytes("astronaut"))
    with connection(api.base_url) as sock:
        sock.sendall(_head(api, len(body)))
        started = time.monotonic()
        # A byte every 50 ms for 1 s (each read is quick: only the deadline for the whole body can stop it), then
        # nothing more: stopping before the deadline keeps our bytes from racing the server's close (a reset).
        for byte in body:
            if time.monotonic() - started > 1.0:
                break
            sock.sendall(bytes([byte]))
            assert not readable(sock, 0.05), "answered before the body deadline"
        status, answer = read_answer(sock)
        assert status == 408 and answer["code"] == "body_timeout", answer
        assert 1.5 - 0.2 < time.monotonic() - started < 1.5 + 2.0  # from the first read, not from the last byte
        wait_for(lambda: closed(sock, 0.1), 5, "the server closed the connection")


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


@pytest.mark.slow
def test_the_apis_peak_memory_under_the_audits_listing_load_stays_under_300_mb() -> None:
    """Old code: 4-6 concurrent 10-photo listings under one key took the API from 133 MB to 1.34 GB (photos read
    whole before any check, no cap). `modtag.bench.upload_memory` sends the load to a real `modtag api` process."""
    from modtag.bench.upload_memory import measure

    report = measure(listings=6, photos=10, photo_mb=2.0, rounds=2)
    answers = report["answers"]
    assert isinstance(answers, dict) and set(answers) <= {"202", "503"} and answers.get("202"), answers
    peak = report["api_peak_rss_mb"]
    assert isinstance(peak, float) and peak < 300, report

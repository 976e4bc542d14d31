"""The HTTP API over real HTTP: uvicorn on a free port, a real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlmodel import select

from api.app import create_app
from api.routes.health import CHECK_TIMEOUT_S
from core.blobs import LocalBlobStore
from core.db import session_scope
from core.jobs import claim_job, get_job, store_decision
from core.tables import Decision, Job
from modtag.servers import free_port
from tests.support.api import Api, api_settings, assert_error, raw_http, running_api
from tests.support.jobs import claimed_url_job
from tests.support.servers import silent_server
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

MAX_UPLOAD = 200_000
MAX_CONTEXT = 4096
ROOT = Path(__file__).resolve().parents[2]


# -- servers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    return {"max_upload_bytes": MAX_UPLOAD, "max_context_bytes": MAX_CONTEXT}


@pytest.fixture(scope="module")
def dead_redis_api(
    db_url: str, tmp_path_factory: pytest.TempPathFactory, api_overrides: dict[str, Any]
) -> Iterator[Api]:
    """The API with Redis pointing at a closed port, plus a route that raises, to see failures from outside."""
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    settings = api_settings(tmp_path_factory.mktemp("api-dead"), db_url, dead_url, **api_overrides)
    app = create_app(settings)
    _add_failing_route(app)
    with running_api(settings, app) as server:
        yield server


def _add_failing_route(app: FastAPI) -> None:
    @app.get("/test-only/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")


# -- helpers ---------------------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares `width` x `height` (correct CRCs), with almost no pixel data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(width: int, height: int, fmt: str) -> bytes:
    """A real, valid image of this size, encoded by Pillow."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A valid PNG of random pixels: it does not compress, so its size is about width * height * 3."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart_body(fields: dict[str, str], image: bytes, boundary: str = "modtag-test-boundary") -> tuple[bytes, str]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def decide(db_url: str, policy: str, action: str, categories: dict[str, Any], decided_at: datetime) -> str:
    """A done job with a stored decision, written through the same repository the worker uses."""
    with session_scope(db_url) as session:
        claimed = claimed_url_job(
            session,
            tenant="default",
            policy=policy,
            policy_version="v1",
            image_url="https://x.test/a.jpg",
            worker="test-worker",
        )
        decision = store_decision(
            session,
            claimed,
            Decision(
                job_id=claimed.id,
                action=action,
                policy=policy,
                policy_version="v1",
                categories=categories,
                decided_at=decided_at,
            ),
        )
        return decision.id


# Category results as the worker stores them (policies.evaluate.CategoryResult): the API shows every key.
WEAPONS_BLOCK = {
    "weapons": {
        "score": 0.9,
        "action": "block",
        "fired": True,
        "decided_by": "probe: is there a gun?",
        "reason": "probe 'is there a gun?' scored 0.9, at or above block 0.8",
    }
}
WEAPONS_QUIET = {"weapons": {"score": 0.1, "action": "allow", "fired": False, "decided_by": None, "reason": None}}


# -- submitting jobs -------------------------------------------------------------------------------------------


def test_upload_is_stored_committed_and_enqueued(api: Api, redis_url: str, photos: dict[str, bytes]) -> None:
    image = photos["chelsea"]
    response = api.upload(image, policy="moderation", context=json.dumps({"title": "a cat on a rug"}))

    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["policy"] == "moderation" and job["source"] == "upload"
    assert job["context"] == {"title": "a cat on a rug"}
    assert job["decision"] is None and job["error"] is None
    assert job["policy_version"]

    with session_scope(api.db_url) as session:
        stored = get_job(session, job["id"])
        assert stored is not None
        assert (stored.image_width, stored.image_height) == (451, 300)
        assert stored.image_bytes == len(image)
        assert stored.image_sha256 == hashlib.sha256(image).hexdigest()
        assert stored.blob_key is not None
    assert LocalBlobStore(api.settings.resolved_blob_dir).get(stored.blob_key) == image

    messages = api.messages()
    assert len(messages) == 1
    assert messages[0]["headers"]["id"] == f"job-{job['id']}"
    assert messages[0]["headers"]["task"] == "modtag.process_job"
    args, _kwargs, _embed = json.loads(base64.b64decode(messages[0]["body"]))
    assert args == [job["id"]]  # the task carries only the id


def test_json_image_url_submission(api: Api, redis_url: str) -> None:
    response = api.client.post(
        "/v1/jobs",
        json={
            "image_url": "https://images.example.com/listing/42.jpg",
            "policy": "moderation",
            "context": {"title": "red bicycle", "color": "red"},
            "callback_url": "https://93.184.215.14/modtag",
        },
    )

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["source"] == "url" and job["image_url"] == "https://images.example.com/listing/42.jpg"
    assert job["context"] == {"title": "red bicycle", "color": "red"}
    with session_scope(api.db_url) as session:
        stored = get_job(session, job["id"])
        assert stored is not None and stored.blob_key is None
        assert stored.callback_url == "https://93.184.215.14/modtag"
    assert [m["headers"]["id"] for m in api.messages()] == [f"job-{job['id']}"]


def test_get_job_shows_status_then_decision(api: Api, photos: dict[str, bytes]) -> None:
    submitted = api.upload(photos["coffee"]).json()

    queued = api.client.get(f"/v1/jobs/{submitted['id']}")
    assert queued.status_code == 200
    assert queued.json() == submitted

    with session_scope(api.db_url) as session:
        claimed = claim_job(session, submitted["id"], "test-worker", 60)
        assert claimed is not None
        store_decision(
            session,
            claimed,
            Decision(
                job_id=claimed.id,
                action="block",
                policy="moderation",
                policy_version="v9",
                categories=WEAPONS_BLOCK,
                caption="a cat",
            ),
        )
    done = api.client.get(f"/v1/jobs/{submitted['id']}").json()
    assert done["status"] == "done" and done["policy_version"] == "v9" and done["finished_at"]
    assert done["decision"]["action"] == "block"
    assert done["decision"]["categories"] == WEAPONS_BLOCK
    assert done["decision"]["job_id"] == submitted["id"]


def test_idempotency_key_returns_the_same_job_once(api: Api, redis_url: str, photos: dict[str, bytes]) -> None:
    key = f"upload-{time.monotonic_ns()}"
    first = api.client.post(
        "/v1/jobs", files={"image": ("a.jpg", photos["rocket"], "image/jpeg")}, headers={"Idempotency-Key": key}
    )
    again = api.client.post(
        "/v1/jobs", files={"image": ("a.jpg", photos["rocket"], "image/jpeg")}, headers={"Idempotency-Key": key}
    )
    other = api.client.post(
        "/v1/jobs", files={"image": ("a.jpg", photos["rocket"], "image/jpeg")}, headers={"Idempotency-Key": key + "b"}
    )

    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert len(api.messages()) == 2  # the replay enqueued nothing
    with session_scope(api.db_url) as session:
        assert len(session.exec(select(Job).where(Job.idempotency_key == key)).all()) == 1


def test_idempotency_key_reused_for_another_request_is_a_conflict(api: Api, photos: dict[str, bytes]) -> None:
    key = f"conflict-{time.monotonic_ns()}"
    headers = {"Idempotency-Key": key}
    first = api.client.post("/v1/jobs", files={"image": ("a.jpg", photos["rocket"], "image/jpeg")}, headers=headers)
    assert first.status_code == 202, first.text
    queued = len(api.messages())
    changes: list[dict[str, Any]] = [
        {"files": {"image": ("a.jpg", photos["chelsea"], "image/jpeg")}},  # another image: the moderation bypass
        {"files": {"image": ("a.jpg", photos["rocket"], "image/jpeg")}, "data": {"context": '{"a": 1}'}},
        {
            "files": {"image": ("a.jpg", photos["rocket"], "image/jpeg")},
            "data": {"callback_url": "https://93.184.215.14/x"},
        },
        {"json": {"image_url": "https://img.example/rocket.jpg"}},
    ]
    for change in changes:
        assert_error(api.client.post("/v1/jobs", headers=headers, **change), 409, "idempotency_conflict")
    same = api.client.post(
        "/v1/jobs", files={"image": ("b.jpg", photos["rocket"], "image/jpeg")}, headers=headers
    )  # another file name, the same bytes: the same request
    assert same.status_code == 200 and same.headers["idempotent-replayed"] == "true"
    assert same.json()["id"] == first.json()["id"]
    assert len(api.messages()) == queued
    url_key = {"Idempotency-Key": key + "-url"}
    body = {"image_url": "https://img.example/a.jpg", "context": {"sku": "1"}}
    assert api.client.post("/v1/jobs", json=body, headers=url_key).status_code == 202
    assert api.client.post("/v1/jobs", json=body, headers=url_key).status_code == 200
    other = {**body, "image_url": "https://img.example/b.jpg"}
    assert_error(api.client.post("/v1/jobs", json=other, headers=url_key), 409, "idempotency_conflict")


def test_unknown_form_and_json_fields_are_422_naming_the_field(api: Api, photos: dict[str, bytes]) -> None:
    queued = len(api.messages())
    typo = api.upload(photos["rocket"], polcy="listing")  # a typo must not run the default policy
    assert "'polcy'" in assert_error(typo, 422, "unknown_field")["detail"]
    extra = api.client.post("/v1/jobs", json={"image_url": "https://img.example/a.jpg", "callback": "x"})
    assert "'callback'" in assert_error(extra, 422, "unknown_field")["detail"]
    assert len(api.messages()) == queued


def test_since_takes_an_age_as_the_cli_does(api: Api) -> None:
    for path in ("/v1/decisions", "/v1/audit"):
        for since in ("7d", "12h", "30m", "2026-01-01", "2026-01-01T00:00:00Z"):
            assert api.client.get(path, params={"since": since}).status_code == 200, (path, since)
        assert "since" in assert_error(api.client.get(path, params={"since": "7x"}), 422, "invalid_field")["detail"]
    schema = api.client.get("/openapi.json").json()
    (since,) = [p for p in schema["paths"]["/v1/decisions"]["get"]["parameters"] if p["name"] == "since"]
    assert "date-time" in json.dumps(since["schema"]) and "smhdw" in json.dumps(since["schema"])


def test_openapi_documents_429_503_and_the_limits(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    for path, method in (("/v1/jobs", "post"), ("/v1/decisions", "get"), ("/v1/review/{job_id}/resolve", "post")):
        responses = schema["paths"][path][method]["responses"]
        assert {"429", "503"} <= set(responses), path
        assert "Retry-After" in responses["429"]["headers"]
    key = next(p for p in schema["paths"]["/v1/jobs"]["post"]["parameters"] if p["name"] == "Idempotency-Key")
    assert key["schema"]["maxLength"] == 255 and key["schema"]["minLength"] == 1
    assert "MODTAG_MAX_HEADER_BYTES" in schema["info"]["description"]


def test_docs_pages_load_only_local_assets(api: Api) -> None:
    import re

    for page in ("/docs", "/redoc"):
        html = api.client.get(page).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert sources, html
        for source in sources:
            assert source.startswith("/"), (page, source)  # nothing from another host: no CDN
            if source.startswith("/docs-assets/"):
                asset = api.client.get(source)
                assert asset.status_code == 200 and len(asset.content) > 1000, source
    assert api.client.get("/docs/oauth2-redirect").status_code == 200


@pytest.mark.parametrize("key", ["x" * 256, "naïve-ключ"])
def test_bad_idempotency_key_is_refused(api: Api, photos: dict[str, bytes], key: str) -> None:
    response = api.client.post(
        "/v1/jobs",
        files={"image": ("a.jpg", photos["rocket"], "image/jpeg")},
        headers=[(b"Idempotency-Key", key.encode())],
    )
    assert_error(response, 422, "invalid_idempotency_key")


def test_unknown_job_is_404(api: Api) -> None:
    body = assert_error(api.client.get("/v1/jobs/0123456789abcdef0123456789abcdef"), 404, "job_not_found")
    assert "0123456789abcdef" in body["detail"]
    assert_error(api.client.get("/v1/jobs/%00"), 404, "job_not_found")  # PostgreSQL refuses NUL: never queried
    body = assert_error(api.client.get("/v1/jobs/" + "a" * 5000), 404, "job_not_found")
    assert len(body["detail"]) < 200


# -- hostile uploads -------------------------------------------------------------------------------------------


HOSTILE_UPLOADS = [
    pytest.param(b"", 422, "image_empty", id="empty-file"),
    pytest.param(b"hello, this is plain text and not an image\n" * 3, 415, "image_unsupported", id="text"),
    pytest.param(
        b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", 415, "image_unsupported", id="html"
    ),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIH", 422, "image_corrupt", id="truncated-png-header"),
    pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 7, 422, "image_truncated", id="truncated-jpeg"),
    pytest.param(png_declaring(100_000, 100_000), 422, "image_too_many_pixels", id="png-100000x100000"),
    pytest.param(png_declaring(0, 10), 422, "image_corrupt", id="png-zero-width"),  # Pillow refuses it
    pytest.param(png_declaring(20_000, 10), 422, "image_dimensions", id="png-side-over-limit"),
    pytest.param(encoded(1, 1, "GIF"), 422, "image_dimensions", id="gif-1x1"),
    pytest.param(encoded(4, 400, "PNG"), 422, "image_dimensions", id="png-4-pixels-wide"),
    pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", 415, "image_unsupported", id="pdf"),
]


@pytest.mark.parametrize(("data", "status", "code"), HOSTILE_UPLOADS)
def test_hostile_upload_is_refused_before_anything_is_stored(
    api: Api, redis_url: str, data: bytes, status: int, code: str
) -> None:
    before = api.job_count()
    assert_error(api.upload(data, filename="x.png", mime="image/png"), status, code)
    assert api.job_count() == before
    assert api.messages() == []


def test_image_over_the_byte_limit_is_413(api: Api, redis_url: str) -> None:
    big = noise_png(320, 320)  # a real, incompressible image of about 300 KB, over the 200 KB limit
    assert len(big) > MAX_UPLOAD
    before = api.job_count()

    assert_error(api.upload(big, filename="big.png", mime="image/png"), 413, "image_too_large")

    # Chunked transfer has no Content-Length to check: the capped read has to stop it.
    body, content_type = multipart_body({"policy": "moderation"}, big)
    chunks = (body[i : i + 16384] for i in range(0, len(body), 16384))
    chunked = api.client.post("/v1/jobs", content=chunks, headers={"Content-Type": content_type})
    assert_error(chunked, 413, "image_too_large")

    # Just over the image limit but under the body's slack: the image's own cap catches it.
    nearly, content_type = multipart_body({}, b"\x89PNG\r\n\x1a\n" + b"\x00" * MAX_UPLOAD)
    assert_error(
        api.client.post("/v1/jobs", content=nearly, headers={"Content-Type": content_type}), 413, "image_too_large"
    )
    assert api.job_count() == before
    assert api.messages() == []


def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(api: Api) -> None:
    _, content_type = multipart_body({}, b"")
    head = f"POST /v1/jobs HTTP/1.1\nHost: test\nContent-Type: {content_type}\nContent-Length: 10000000000\n"
    head += f"Authorization: Bearer {api.key}\nConnection: close\n"
    status, body = raw_http(api.base_url, head)  # not one byte of the promised 10 GB is sent
    assert status == 413 and body["code"] == "image_too_large"


def test_lying_content_length_cannot_smuggle_a_big_image(api: Api, redis_url: str) -> None:
    body, content_type = multipart_body({"policy": "moderation"}, noise_png(320, 320))
    head = f"POST /v1/jobs HTTP/1.1\nHost: test\nContent-Type: {content_type}\nContent-Length: 1000\n"
    head += f"Authorization: Bearer {api.key}\nConnection: close\n"
    status, error = raw_http(api.base_url, head, body)

    # The server reads the declared 1000 bytes only: a truncated form, refused as such by the app, unless h11 (the
    # server's HTTP parser: api.app.server_config) refuses first the bytes past them as a malformed next request.
    assert status == 400 and error["code"] in ("invalid_multipart", None), error
    assert error["code"] == "invalid_multipart" or "Invalid HTTP request" in error["detail"], error
    assert api.messages() == []
    assert api.client.get("/healthz").status_code == 200  # and it keeps serving


def test_context_must_be_a_small_json_object(api: Api, photos: dict[str, bytes]) -> None:
    jpeg = photos["chelsea"]
    assert_error(api.upload(jpeg, context="{not json"), 400, "invalid_context")
    assert_error(api.upload(jpeg, context='["a", "list"]'), 422, "invalid_context")
    assert_error(api.upload(jpeg, context='{"x": NaN}'), 400, "invalid_context")
    assert_error(api.upload(jpeg, context='{"x": "\\ud83d"}'), 400, "invalid_context")
    assert_error(api.upload(jpeg, context="42"), 422, "invalid_context")
    assert_error(api.upload(jpeg, context="[" * 5000 + "]" * 5000), 413, "context_too_large")
    assert_error(api.upload(jpeg, context="[" * 2000 + "]" * 2000), 400, "invalid_context")  # too deep to parse
    assert_error(api.upload(jpeg, context='{"a":' * 100 + "1" + "}" * 100), 422, "invalid_context")  # too deep
    big = json.dumps({"description": "x" * MAX_CONTEXT})
    assert_error(api.upload(jpeg, context=big), 413, "context_too_large")

    url = "https://images.example.com/a.jpg"
    assert_error(api.client.post("/v1/jobs", json={"image_url": url, "context": [1, 2]}), 422, "invalid_context")
    deep: Any = {}
    for _ in range(40):
        deep = {"a": deep}
    assert_error(api.client.post("/v1/jobs", json={"image_url": url, "context": deep}), 422, "invalid_context")
    too_big = {"image_url": url, "context": {"description": "x" * MAX_CONTEXT}}
    assert_error(api.client.post("/v1/jobs", json=too_big), 413, "context_too_large")


def test_odd_but_valid_context_round_trips(api: Api) -> None:
    context = {"title": "Ünïcode 🚲 \u0000 nul", "nested": {"list": [1, 2.5, None, True]}, "": ""}
    response = api.client.post("/v1/jobs", json={"image_url": "https://a.example/x.jpg", "context": context})
    assert response.status_code == 202, response.text
    assert api.client.get(f"/v1/jobs/{response.json()['id']}").json()["context"] == context


def test_unknown_policy_is_404_and_names_the_available_ones(api: Api, photos: dict[str, bytes]) -> None:
    body = assert_error(api.upload(photos["chelsea"], policy="no-such-policy"), 404, "policy_not_found")
    assert "moderation" in body["detail"]
    body = assert_error(
        api.client.post("/v1/jobs", json={"image_url": "https://a.example/x.jpg", "policy": "nope"}),
        404,
        "policy_not_found",
    )
    assert "moderation" in body["detail"]


def test_image_must_be_given_exactly_once(api: Api, photos: dict[str, bytes]) -> None:
    assert_error(api.client.post("/v1/jobs", files={"policy": (None, "moderation")}), 422, "image_missing")
    assert_error(
        api.client.post("/v1/jobs", data={"image": "not a file"}, files={"policy": (None, "moderation")}),
        422,
        "image_missing",
    )
    assert_error(api.client.post("/v1/jobs", json={"policy": "moderation"}), 422, "image_missing")
    both = api.client.post(
        "/v1/jobs",
        files={"image": ("a.jpg", photos["chelsea"], "image/jpeg")},
        data={"image_url": "https://a.example/x.jpg"},
    )
    assert_error(both, 400, "ambiguous_image")
    two_files = api.client.post(
        "/v1/jobs",
        files=[("image", ("a.jpg", photos["chelsea"], "image/jpeg")), ("image", ("b.jpg", b"xx", "image/jpeg"))],
    )
    assert_error(two_files, 400, "invalid_multipart")


def test_body_must_be_multipart_or_json(api: Api) -> None:
    assert_error(
        api.client.post("/v1/jobs", content=b"hello", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(
        api.client.post("/v1/jobs", content=b"<x/>", headers={"Content-Type": "application/xml"}),
        415,
        "unsupported_media_type",
    )
    assert_error(api.client.post("/v1/jobs"), 415, "unsupported_media_type")
    no_boundary = api.client.post("/v1/jobs", content=b"--x--", headers={"Content-Type": "multipart/form-data"})
    assert_error(no_boundary, 400, "invalid_multipart")
    body, content_type = multipart_body({"policy": "moderation"}, encoded(64, 64, "PNG"))
    cut = api.client.post("/v1/jobs", content=body[: len(body) // 2], headers={"Content-Type": content_type})
    assert_error(cut, 400, "invalid_multipart")
    garbage = api.client.post("/v1/jobs", content=os.urandom(4096), headers={"Content-Type": content_type})
    assert_error(garbage, 400, "invalid_multipart")


def test_json_body_is_validated(api: Api, redis_url: str) -> None:
    post = api.client.post
    headers = {"Content-Type": "application/json"}
    assert_error(post("/v1/jobs", content=b'{"image_url": ', headers=headers), 400, "invalid_json")
    assert_error(post("/v1/jobs", content=b"[" * 20000, headers=headers), 400, "invalid_json")
    assert_error(post("/v1/jobs", json=["https://a.example/x.jpg"]), 422, "invalid_field")
    body = assert_error(
        post("/v1/jobs", json={"image_url": "https://a.example/x.jpg", "policy": 7}), 422, "invalid_field"
    )
    assert "policy" in body["detail"]
    body = assert_error(
        post("/v1/jobs", json={"image_url": "https://a.example/x.jpg", "colour": "red"}), 422, "unknown_field"
    )
    assert "colour" in body["detail"]
    url = b'{"image_url": "https://a.example/x.jpg", '
    # Python's json accepts these; PostgreSQL and UTF-8 do not: refused up front, never a 500 after the commit.
    assert_error(post("/v1/jobs", content=url + b'"context": {"x": NaN}}', headers=headers), 400, "invalid_json")
    assert_error(post("/v1/jobs", content=url + b'"context": {"x": -Infinity}}', headers=headers), 400, "invalid_json")
    assert_error(post("/v1/jobs", content=url + b'"context": {"x": "\\ud800"}}', headers=headers), 400, "invalid_json")
    assert_error(
        post("/v1/jobs", content=b'{"image_url": "https://a.example/\\udfff.jpg"}', headers=headers),
        400,
        "invalid_json",
    )
    assert_error(
        post("/v1/jobs", content=url + b'"context": {"x": ' + b"9" * 5000 + b"}}", headers=headers), 400, "invalid_json"
    )
    assert_error(post("/v1/jobs", content=b'{"image_url": "\xff\xfe"}', headers=headers), 400, "invalid_json")
    huge = {"image_url": "https://a.example/x.jpg", "context": {"blob": "x" * 5_000_000}}
    assert_error(post("/v1/jobs", json=huge), 413, "payload_too_large")
    assert api.messages() == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "http://user:secret@images.example.com/a.jpg",
        "ftp://images.example.com/a.jpg",
        "javascript:alert(1)",
        "https://images.example.com/" + "a" * 3000,
        "not a url",
    ],
)
def test_bad_urls_are_refused(api: Api, photos: dict[str, bytes], url: str) -> None:
    assert_error(api.client.post("/v1/jobs", json={"image_url": url}), 422, "url_invalid")
    valid = "https://images.example.com/a.jpg"
    assert_error(api.client.post("/v1/jobs", json={"image_url": valid, "callback_url": url}), 422, "url_invalid")
    assert_error(api.upload(photos["chelsea"], callback_url=url), 422, "url_invalid")


# -- reading decisions and policies ----------------------------------------------------------------------------


def test_decisions_filters_and_cursor_paging(api: Api) -> None:
    policy = f"test-{time.monotonic_ns()}"
    now = datetime.now(UTC).replace(microsecond=0)
    plan = [
        ("block", WEAPONS_BLOCK),
        ("allow", WEAPONS_QUIET),
        ("review", {"weapons": {"score": 0.6, "action": "review", "fired": True}}),
        ("block", {"nudity": {"score": 0.95, "action": "block", "fired": True}}),
        ("allow", {}),
    ]
    ids = [
        decide(api.db_url, policy, action, cats, now - timedelta(minutes=i)) for i, (action, cats) in enumerate(plan)
    ]

    def listing(**params: Any) -> list[str]:
        response = api.client.get("/v1/decisions", params={"policy": policy, **params})
        assert response.status_code == 200, response.text
        return [decision["id"] for decision in response.json()["data"]]

    assert listing() == ids  # newest first
    assert listing(action="block") == [ids[0], ids[3]]
    assert listing(category="weapons") == [ids[0], ids[2]]  # only where the category fired
    assert listing(category="weapons", action="review") == [ids[2]]
    assert listing(since=(now - timedelta(minutes=2)).isoformat()) == ids[:3]
    offset = (now - timedelta(minutes=2)).astimezone(timezone(timedelta(hours=5))).isoformat()
    assert listing(since=offset) == ids[:3]  # the same instant in another zone
    assert listing(policy="nothing-here") == []

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"policy": policy, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/decisions", params=params).json()
        pages.append([decision["id"] for decision in page["data"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[0:2], ids[2:4], ids[4:5]]

    first = api.client.get("/v1/decisions", params={"policy": policy, "limit": 1}).json()["data"][0]
    assert first["categories"] == WEAPONS_BLOCK and first["policy"] == policy and first["action"] == "block"
    assert set(first) >= {"id", "job_id", "caption", "evidence", "tags", "policy_version", "models", "decided_at"}


@pytest.mark.parametrize(
    ("params", "status", "code", "names"),
    [
        ({"cursor": "not-a-cursor!!"}, 400, "invalid_cursor", "cursor"),
        ({"limit": 0}, 422, "invalid_field", "limit"),
        ({"limit": 501}, 422, "invalid_field", "limit"),
        ({"limit": "ten"}, 422, "invalid_field", "limit"),
        ({"action": "maybe"}, 422, "invalid_field", "action"),
        ({"since": "yesterday"}, 422, "invalid_field", "since"),
        ({"category": "c" * 65}, 422, "invalid_field", "category"),
        ({"category": "a\x00"}, 422, "invalid_field", "category"),
        ({"policy": "\x00"}, 422, "invalid_field", "policy"),
        (
            {"cursor": base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00|a\x00b").decode()},
            400,
            "invalid_cursor",
            "cursor",
        ),
    ],
)
def test_decisions_bad_parameters(api: Api, params: dict[str, Any], status: int, code: str, names: str) -> None:
    body = assert_error(api.client.get("/v1/decisions", params=params), status, code)
    assert names in body["detail"]


def test_policies_list_and_detail(api: Api) -> None:
    listing = api.client.get("/v1/policies")
    assert listing.status_code == 200
    policies = {policy["name"]: policy for policy in listing.json()["data"]}
    assert "moderation" in policies
    moderation = policies["moderation"]
    assert moderation["version"] and moderation["description"]
    assert moderation["categories"] and all(isinstance(name, str) for name in moderation["categories"])

    detail = api.client.get("/v1/policies/moderation")
    assert detail.status_code == 200
    full = detail.json()
    assert full["name"] == "moderation" and full["version"] == moderation["version"]
    assert [category["name"] for category in full["categories"]] == moderation["categories"]
    assert all(category["checks"] for category in full["categories"])

    body = assert_error(api.client.get("/v1/policies/does-not-exist"), 404, "policy_not_found")
    assert "moderation" in body["detail"]


# -- errors, health, metrics, startup --------------------------------------------------------------------------


def test_routing_errors_have_the_error_shape(api: Api) -> None:
    assert_error(api.client.get("/v1/nothing-here"), 404, "not_found")
    not_allowed = api.client.delete("/v1/jobs")
    assert_error(not_allowed, 405, "method_not_allowed")
    assert "POST" in not_allowed.headers["allow"]


def test_unexpected_errors_are_500_without_internals(dead_redis_api: Api) -> None:
    # uvicorn drops the connection after an unhandled exception: don't let the pool reuse it for the next test.
    response = dead_redis_api.client.get("/test-only/boom", headers={"Connection": "close"})
    body = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "passwd" not in response.text and "RuntimeError" not in body["detail"]


def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok", "blob_store": "ok"}}


def test_not_ready_when_redis_is_down(dead_redis_api: Api) -> None:
    response = dead_redis_api.client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "not_ready" and "redis" in body["detail"]
    assert body["checks"]["database"] == "ok" and body["checks"]["redis"] != "ok"
    assert dead_redis_api.client.get("/healthz").status_code == 200  # alive, just not ready
    assert dead_redis_api.client.get("/metrics").status_code == 200  # a scrape survives a dead Redis


def test_not_ready_when_redis_accepts_but_never_answers(
    db_url: str, tmp_path_factory: pytest.TempPathFactory, api_overrides: dict[str, Any]
) -> None:
    # A refused port fails at once; a hung Redis is what could hang /readyz. The checks' deadline
    # (CHECK_TIMEOUT_S) cuts it off, and so, later, would the Redis client's socket timeout: either answer is
    # bounded. Without the deadline and with long socket timeouts, the request hangs and the test client's 30 s
    # timeout fails it: a safety net, not a performance bound.
    with silent_server() as silent:
        settings = api_settings(tmp_path_factory.mktemp("api-silent"), db_url, silent.redis_url, **api_overrides)
        with running_api(settings) as server:
            response = server.client.get("/readyz")
            wait_for(lambda: silent.accepted, 10, "the readiness check connecting to the silent Redis")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["redis"] in (f"timed out after {CHECK_TIMEOUT_S:.0f} s", "failed: TimeoutError"), checks


def test_job_is_accepted_while_redis_is_down(dead_redis_api: Api, photos: dict[str, bytes]) -> None:
    response = dead_redis_api.upload(photos["astronaut"])
    assert response.status_code == 202, response.text
    with session_scope(dead_redis_api.db_url) as session:
        stored = get_job(session, response.json()["id"])
        assert stored is not None and stored.status == "queued"  # durable: the reconciler will enqueue it


def test_metrics_use_route_templates(api: Api, photos: dict[str, bytes]) -> None:
    job_id = api.upload(photos["rocket"]).json()["id"]
    api.client.get(f"/v1/jobs/{job_id}")
    api.client.get("/v1/unknown/path")

    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    exposition = response.text
    assert re.search(r'^modtag_jobs_submitted_total\{policy="moderation",source="upload"\} [1-9]', exposition, re.M)
    assert re.search(
        r'^modtag_http_requests_total\{method="POST",route="/v1/jobs",status="202"\} [1-9]', exposition, re.M
    )
    assert 'route="/v1/jobs/{job_id}",status="200"' in exposition
    assert 'route="unmatched",status="404"' in exposition
    assert 'modtag_http_request_duration_seconds_bucket{le="0.01",method="GET",route="/v1/jobs/{job_id}"}' in exposition
    assert job_id not in exposition  # no unbounded labels
    assert 'modtag_queue_depth{queue="modtag.inference"}' in exposition
    assert 'modtag_jobs{status="queued"}' in exposition
    assert re.search(r'^modtag_build_info\{.*component="api"', exposition, re.M)


def test_openapi_document_describes_both_submission_bodies(api: Api) -> None:
    document = api.client.get("/openapi.json").json()
    submit = document["paths"]["/v1/jobs"]["post"]
    assert set(submit["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"202", "200", "413", "415"} <= set(submit["responses"])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("description") or operation.get("summary"), f"{method} {path} is undocumented"
            # Errors are documented with the shape they really have, not FastAPI's default validation body.
            assert "HTTPValidationError" not in json.dumps(operation), f"{method} {path}"
    assert api.client.get("/docs").status_code == 200


def test_api_startup_imports_no_torch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys, time
        started = time.perf_counter()
        import api.app
        from core.settings import Settings
        settings = Settings(_env_file=None, data_dir={str(tmp_path)!r}, redis_url="redis://127.0.0.1:1/0")
        app = api.app.create_app(settings)

        async def lifespan():
            async with app.router.lifespan_context(app):
                pass

        asyncio.run(lifespan())
        heavy = sorted(name for name in ("torch", "transformers", "worker") if name in sys.modules)
        print(json.dumps({{"heavy": heavy, "seconds": time.perf_counter() - started}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], report

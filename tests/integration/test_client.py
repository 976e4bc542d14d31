"""modtag/client.py against a real API over real HTTP (SQLite and PostgreSQL), jobs finished through core code."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.db import session_scope
from core.errors import ModtagError
from core.jobs import fail_job
from modtag.client import ApiClient, ApiUnreachable
from modtag.servers import free_port
from tests.support.api import Api
from tests.support.photos import photo_bytes

pytestmark = pytest.mark.timeout(120)


def finish(api: Api, job_id: str) -> None:
    """What a worker does last, without one: the job becomes final."""
    with session_scope(api.db_url) as session:
        fail_job(session, job_id, "image_truncated", "the image is cut short")


def test_jobs_are_submitted_polled_until_final_and_reported_in_order(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "coffee.jpg"
    path.write_bytes(photo_bytes("coffee", size=(64, 48)))
    with ApiClient(api.base_url, key=api.key, poll_interval_s=0.01) as client:
        first = client.submit_job(path)
        second = client.submit_job(photo_bytes("rocket", size=(64, 48)), filename="rocket.jpg", mime="image/jpeg")
        assert first.accepted and second.accepted and first.status == 202
        ids = [str(first.body["id"]), str(second.body["id"])]
        assert client.job(ids[0])["status"] == "queued"
        # Nothing final: the wait ends at its timeout with none, and wait_job says which job and how it stands.
        assert client.wait_jobs(ids, timeout_s=0.05) == {}
        with pytest.raises(ModtagError) as late:
            client.wait_job(ids[0], timeout_s=0.05)
        assert late.value.code == "api_timeout" and ids[0] in late.value.message and "queued" in late.value.message
        # Only the second final: the first is still pending, so the round stops there and reports nothing late.
        finish(api, ids[1])
        assert client.wait_jobs(ids, timeout_s=0.05) == {}
        finish(api, ids[0])
        seen: list[str] = []
        final = client.wait_jobs(ids, timeout_s=30, on_final=lambda job: seen.append(job["id"]))
        assert list(final) == ids == seen
        assert all(job["status"] == "failed" and job["error"]["code"] == "image_truncated" for job in final.values())
        assert "modtag_jobs_submitted_total" in client.metrics()


def test_refusals_are_replies_with_the_api_error(api: Api) -> None:
    with ApiClient(api.base_url) as keyless, ApiClient(api.base_url, key=api.key) as client:
        refused = keyless.submit_job(photo_bytes("coffee", size=(64, 48)))
        assert refused.auth_refused and not refused.accepted and refused.body["code"] == "auth_required"
        empty = client.submit_job(b"", filename="empty.jpg")
        assert not empty.accepted and not empty.auth_refused and empty.body["code"] == "image_empty"


def test_a_listing_is_submitted_and_left_pending_when_the_time_is_up(api: Api, tmp_path: Path) -> None:
    images = []
    for name in ("coffee", "rocket"):
        images.append(tmp_path / f"{name}.jpg")
        images[-1].write_bytes(photo_bytes(name, size=(64, 48)))
    with ApiClient(api.base_url, key=api.key, poll_interval_s=0.01) as client:
        reply = client.submit_listing(images, title="Red mug", attributes={"color": "red"})
        assert reply.accepted, reply.body
        listing = client.wait_listing(str(reply.body["id"]), timeout_s=0.05)
        assert listing["id"] == reply.body["id"] and listing["verdict"]["status"] == "pending"
        assert len(listing["photos"]) == 2


def test_no_api_at_the_url_is_one_error_with_a_code() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with ApiClient(url) as client, pytest.raises(ApiUnreachable) as error:
        client.job("anything")
    assert error.value.code == "api_unreachable"
    assert url in error.value.message and "--api" in error.value.message

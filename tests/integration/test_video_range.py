"""A video job's stored file over HTTP range requests (GET /v1/jobs/{id}/video), on SQLite and PostgreSQL, from a
directory blob store and from S3 (moto's server): start, middle, suffix, open end, bad ranges, other tenants."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col

from core.blobs import open_blob_store
from core.db import session_scope
from core.jobs import NewJob, claim_job, create_job, store_decision
from core.tables import Decision, Job
from tests.support.api import Api, admin_key, api_settings, assert_error, running_api
from tests.support.dashboard import signed_in
from tests.support.photos import photo_image
from tests.support.s3 import S3Bucket
from tests.support.videos import Shot, write_clip

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("clip")
    shots = [Shot(1, photo_image("coffee", (160, 120))), Shot(1, photo_image("rocket", (160, 120)))]
    return write_clip(folder / "clip.mp4", shots, size=(160, 120)).read_bytes()


def video_job(api: Api, data: bytes, media: str = "video") -> str:
    """A decided-or-not video job of the default tenant whose file is in the API's blob store."""
    key = open_blob_store(api.settings).put(data)
    with session_scope(api.db_url) as session:
        job, _ = create_job(
            session,
            NewJob(tenant="default", policy="moderation", policy_version=None, source="upload", blob_key=key,
                   image_sha256=key, image_format="mp4", image_bytes=len(data)),
        )  # fmt: skip
        session.execute(update(Job).where(col(Job.id) == job.id).values(media=media))
        session.commit()
    return job.id


def ranged(api: Api, job_id: str, value: str | None, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or api.key}"}
    if value is not None:
        headers["Range"] = value
    return httpx.get(f"{api.base_url}/v1/jobs/{job_id}/video", headers=headers, timeout=30)


def check_ranges(api: Api, data: bytes) -> None:
    size = len(data)
    job_id = video_job(api, data)
    whole = ranged(api, job_id, None)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["content-type"] == "video/mp4"
    assert whole.headers["cache-control"].startswith("private")

    start = ranged(api, job_id, "bytes=0-99")
    assert start.status_code == 206 and start.content == data[:100]
    assert start.headers["content-range"] == f"bytes 0-99/{size}" and start.headers["content-length"] == "100"
    middle = ranged(api, job_id, f"bytes={size // 2}-{size // 2 + 999}")
    assert middle.status_code == 206 and middle.content == data[size // 2 : size // 2 + 1000]
    suffix = ranged(api, job_id, "bytes=-500")
    assert suffix.status_code == 206 and suffix.content == data[-500:]
    assert suffix.headers["content-range"] == f"bytes {size - 500}-{size - 1}/{size}"
    open_end = ranged(api, job_id, f"bytes={size - 10}-")
    assert open_end.status_code == 206 and open_end.content == data[-10:]
    past = ranged(api, job_id, f"bytes={size - 10}-{size * 10}")  # an end past the file is cut to it
    assert past.status_code == 206 and past.content == data[-10:]

    for bad in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
        refused = ranged(api, job_id, bad)
        assert_error(refused, 416, "range_not_satisfiable")
        assert refused.headers["content-range"] == f"bytes */{size}"
    # Malformed or multiple ranges are ignored (RFC 9110): the whole file. Hostile sizes change nothing.
    for ignored in ("bytes=a-b", "items=0-5", "bytes=0-1,5-9", "bytes=9-3", "bytes=" + "9" * 5000):
        answer = ranged(api, job_id, ignored)
        assert answer.status_code in (200, 416) and (answer.status_code == 416 or answer.content == data), ignored

    # Another tenant's video is an unknown id; an image job has no video; an unknown id is 404.
    other = admin_key(api.db_url, role="review", tenant="globex", name=f"globex {job_id[:6]}")
    assert_error(ranged(api, job_id, "bytes=0-9", key=other), 404, "job_not_found")
    assert_error(ranged(api, video_job(api, b"\xff\xd8 not a video", media="image"), None), 404, "video_unavailable")
    assert ranged(api, "0" * 32, None).status_code == 404
    assert ranged(api, job_id, None, key="mt_not_a_key").status_code == 401


def test_range_requests_on_a_directory_store(api: Api, clip: bytes) -> None:
    check_ranges(api, clip)


@pytest.fixture
def s3_api(tmp_path: Path, s3_bucket: S3Bucket, redis_server: Any) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'modtag.db'}"
    settings = api_settings(tmp_path, url, redis_server.url, blob_url=s3_bucket.blob_url)
    with running_api(settings) as server:
        yield server


def test_range_requests_on_s3(s3_api: Api, clip: bytes) -> None:
    check_ranges(s3_api, clip)


def test_bank_frames_refuses_what_it_cannot_bank(api: Api, clip: bytes) -> None:
    """The review queue's bank-frames route on broken and hostile input; the banking itself is tested on real
    judged frames in test_video_verdict.py."""
    bank = f"frames-{secrets.token_hex(3)}"
    assert api.client.create_bank(bank, "frames of videos").status == 201
    job_id = video_job(api, clip)

    def bank_frames(target: str, body: Any, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or api.key}"}
        return httpx.post(f"{api.base_url}/v1/review/{target}/bank-frames", json=body, headers=headers, timeout=30)

    assert_error(bank_frames(job_id, {"bank": bank}), 409, "video_not_judged")
    image = video_job(api, b"\xff\xd8 an image's bytes", media="image")
    assert_error(bank_frames(image, {"bank": bank}), 422, "not_a_video")
    assert_error(bank_frames(job_id, {"bank": "no-such-bank"}), 404, "bank_not_found")
    other = admin_key(api.db_url, role="review", tenant="globex", name=f"globex {job_id[:6]}")
    assert bank_frames(job_id, {"bank": bank}, key=other).status_code == 404
    for hostile in (
        {"bank": bank, "times": [1e300]},
        {"bank": bank, "times": [-1]},
        {"bank": bank, "times": [0.0] * 5000},
        {"bank": bank, "times": "all"},
        {"bank": "../../etc", "times": None},
        {"bank": bank, "note": "x" * 10_000},
        {"bank": bank, "unknown": 1},
        [bank],
    ):
        assert bank_frames(job_id, hostile).status_code in (400, 422), hostile
    submitter = admin_key(api.db_url, role="submit", name=f"submitter {job_id[:6]}")
    assert bank_frames(job_id, {"bank": bank}, key=submitter).status_code == 403


def test_the_review_queue_shows_a_videos_segments_and_player(api: Api, clip: bytes) -> None:
    """A video decided `review` (its decision written as the worker writes it) in the queue page and its job page."""
    job_id = video_job(api, clip)
    frames = [
        {"time_s": 0.0, "action": "allow", "scores": {"weapons": 0.1}, "pdq": "a" * 64},
        {"time_s": 4.0, "action": "review", "scores": {"weapons": 0.7}, "pdq": "b" * 64},
    ]
    segments = [{"category": "weapons", "start_s": 4.0, "end_s": 8.5, "max_score": 0.7}]
    with session_scope(api.db_url) as session:
        job = claim_job(session, job_id, "test-worker", 60)
        assert job is not None
        decision = Decision(
            job_id=job_id,
            action="review",
            policy="moderation",
            policy_version="v",
            categories={"weapons": {"score": 0.7, "action": "review", "fired": True, "decided_by": "probe"}},
            frames=frames,
            segments=segments,
        )
        assert store_decision(session, job, decision) is not None
    with signed_in(api.base_url, api.key, "/dashboard/review") as browser:
        queue = browser.get("/dashboard/review")
        assert queue.status_code == 200
        assert "video, 2 frames judged: <b>weapons</b> 4.0-8.5 s" in queue.text
        assert f'src="/v1/jobs/{job_id}/video"' in queue.text
        page = browser.get(f"/dashboard/jobs/{job_id}")
        # (Whether the "bank the frames" form shows depends on the banks other tests of this module made.)
        assert page.status_code == 200
        table = page.text.split('data-testid="segments"', 1)[1].split("</table>", 1)[0]
        assert "weapons" in table and "4.0 s" in table and "8.5 s" in table

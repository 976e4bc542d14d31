"""The whole pipeline through real processes: API -> Redis -> Celery worker (tiny BLIP) -> database."""

from __future__ import annotations

import io
import signal
from typing import Any

import pytest
import redis
from PIL import Image
from sqlmodel import select

from core.db import session_scope
from core.tables import Decision
from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import photo_bytes
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)


def decisions_for(database_url: str, job_id: str) -> list[Decision]:
    with session_scope(database_url) as session:
        return list(session.exec(select(Decision).where(Decision.job_id == job_id)).all())


def test_photos_get_stored_explainable_decisions(deployment: Deployment, photos: dict[str, bytes]) -> None:
    deployment.start_api()
    deployment.start_worker()
    submitted = [submit(deployment, data, f"{name}.jpg") for name, data in photos.items()]
    for job in submitted:
        final = wait_final(deployment, job["id"])
        assert final["status"] == "done", final
        decision = final["decision"]
        assert decision["action"] in ("allow", "review", "block")
        assert decision["policy"] == "moderation" and decision["policy_version"] == final["policy_version"]
        assert {"weapons", "nudity", "violence", "drugs", "hate_symbols", "self_harm"} <= set(decision["categories"])
        kinds = {item["kind"] for item in decision["evidence"]}
        assert {"probe", "match", "caption"} <= kinds
        assert all(0.0 <= item["score"] <= 1.0 for item in decision["evidence"])
        assert isinstance(decision["caption"], str)
        models = decision["models"]
        assert models["random"] is True and set(models["roles"]) == {"caption", "vqa", "itm", "ocr"}
        # The BLIP models are the tiny random build; the OCR models are the real ones from their wheel.
        assert {role: info["random"] for role, info in models["roles"].items()} == {
            "caption": True,
            "vqa": True,
            "itm": True,
            "ocr": False,
        }
        assert len(decisions_for(deployment.env["MODTAG_DATABASE_URL"], job["id"])) == 1
    listed = deployment.client.get("/v1/decisions", params={"limit": 10}).json()
    assert {d["job_id"] for d in listed["data"]} == {job["id"] for job in submitted}


def _bomb_png() -> bytes:
    """A small PNG that declares 30000x30000 pixels: it passes a byte limit but not the pixel limit."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_bytes("coffee"))).convert("CMYK").save(buffer, "JPEG")
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (64, 64), color) for color in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def test_bad_images_fail_cleanly_and_the_worker_keeps_serving(deployment: Deployment) -> None:
    """Inputs the API cannot judge from the header reach the worker; each ends `failed` with a code."""
    deployment.start_api()
    deployment.start_worker()
    good = photo_bytes("chelsea")
    truncated = good[: len(good) // 2]
    odd_modes = {"cmyk.jpg": _cmyk_jpeg(), "anim.gif": _animated_gif()}
    job = submit(deployment, truncated, "half.jpg")
    final = wait_final(deployment, job["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "image_truncated", final["error"]
    assert final["error"]["message"]
    assert final["decision"] is None
    for name, data in odd_modes.items():
        final = wait_final(deployment, submit(deployment, data, name)["id"])
        assert final["status"] == "done", (name, final)
    # The same worker still serves the next good job.
    assert wait_final(deployment, submit(deployment, good)["id"])["status"] == "done"
    bomb = deployment.client.post("/v1/jobs", files={"image": ("bomb.png", _bomb_png())})
    assert bomb.status_code in (413, 422) and bomb.json()["code"] in ("image_too_many_pixels", "image_dimensions")


def test_unreachable_image_url_fails_with_fetch_code(deployment: Deployment) -> None:
    deployment.start_api()
    deployment.start_worker()
    response = deployment.client.post(
        "/v1/jobs",
        json={"image_url": "http://127.0.0.1:9/nothing.jpg"},
    )
    assert response.status_code == 202, response.text
    final = wait_final(deployment, response.json()["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"].startswith("fetch_"), final["error"]


def test_worker_killed_mid_job_finishes_with_one_decision(deployment: Deployment) -> None:
    """SIGKILL while the job is running; a new worker recovers it after the lease; one decision results."""
    deployment.start_api()
    # A long batching window keeps the job `running` inside the first worker long enough to kill it.
    first = deployment.start_worker("worker-1", MODTAG_BATCH_WAIT_MS="30000", MODTAG_BATCH_MAX_IMAGES="64")
    job = submit(deployment, photo_bytes("astronaut"))
    wait_for(lambda: deployment.client.job(job["id"])["status"] == "running", 30, "the job running")
    deployment.stop(first, signal.SIGKILL)
    # The new worker treats a job running for over 7 s as abandoned (its own lease setting).
    deployment.start_worker(
        "worker-2", MODTAG_JOB_TIMEOUT_S="6", MODTAG_RUNNING_LEASE_S="7", MODTAG_RECONCILE_INTERVAL_S="0.5"
    )
    final = wait_final(deployment, job["id"], timeout_s=60)
    assert final["status"] == "done", final
    assert final["attempts"] >= 2
    assert len(decisions_for(deployment.env["MODTAG_DATABASE_URL"], job["id"])) == 1


def test_jobs_survive_redis_restarted_empty(deployment: Deployment, redis_server: Any) -> None:
    """Jobs accepted while no worker ran; Redis loses everything; the reconciler re-enqueues them."""
    deployment.env.update({"MODTAG_QUEUED_GRACE_S": "1", "MODTAG_RECONCILE_INTERVAL_S": "0.5"})
    deployment.start_api()
    submitted = [submit(deployment, photo_bytes(name)) for name in ("coffee", "rocket", "chelsea")]
    client = redis.Redis.from_url(deployment.env["MODTAG_REDIS_URL"])
    assert client.llen("modtag.inference") == 3
    redis_server.stop(wipe=True)
    redis_server.start()
    client.connection_pool.disconnect()
    assert client.llen("modtag.inference") == 0
    deployment.start_worker()
    for job in submitted:
        assert wait_final(deployment, job["id"])["status"] == "done"

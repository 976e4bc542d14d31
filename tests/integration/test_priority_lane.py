"""Moderate now and the bulk lane with a real worker process (real API process, Redis, PostgreSQL, tiny random BLIP
models): `Prefer: wait` answers 200 with the decision from an idle worker (jobs, listings, `modtag scan --wait`), and
a live upload is decided within one batch while 500 bulk jobs wait."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from sqlmodel import col, select

from core.broker import enqueue_job, make_celery
from core.db import session_scope
from core.finality import CHANNEL, job_subject
from core.jobs import mark_enqueued
from core.queues import Priority
from core.settings import Settings
from core.tables import Job, as_utc, new_id
from modtag.cli import main
from modtag.client import ApiClient
from tests.support.deployment import Deployment
from tests.support.waiting import wait_for

# PostgreSQL only: what is tested is the queues and the wait, and a fleet runs on PostgreSQL.
pytestmark = [pytest.mark.timeout(600), pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)]
BULK_JOBS = 500
BATCH = 8  # MODTAG_BATCH_MAX_IMAGES's default
LONG_WAIT_S = 240  # the Prefer: wait of the moderate-now calls: far above what one decision takes here


def test_moderate_now_answers_200_with_the_decision_from_an_idle_worker(
    deployment: Deployment, photos: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A cap far above what a decision takes even on a loaded machine: the answer is 200, whatever the clock says.
    deployment.env["MODTAG_MAX_PREFER_WAIT_S"] = str(LONG_WAIT_S)
    deployment.start_api()
    deployment.start_worker()
    client = ApiClient(deployment.api_url, key=deployment.key, timeout_s=LONG_WAIT_S + 30)
    name, photo = next(iter(photos.items()))
    wait = {"Prefer": f"wait={LONG_WAIT_S}"}
    notices = redis.Redis.from_url(deployment.env["MODTAG_REDIS_URL"]).pubsub(ignore_subscribe_messages=True)
    notices.subscribe(CHANNEL)
    response = client.post("/v1/jobs", files={"image": (f"{name}.jpg", photo)}, headers=wait)
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == f"wait={LONG_WAIT_S}"
    job = response.json()
    assert job["status"] == "done" and job["decision"]["action"] in ("allow", "review", "block")
    assert job == client.get(f"/v1/jobs/{job['id']}").json()
    # The worker said so on Redis (what woke the waiting call, rather than its once-a-second recheck).
    heard = wait_for(lambda: notices.get_message(timeout=1.0), 30, "the worker's final-state notice")
    assert heard["data"] == job_subject(job["id"]).encode()
    notices.close()

    listing = client.post(
        "/v1/listings",
        files=[("images", (f"{index}.jpg", data)) for index, data in enumerate(list(photos.values())[:2])],
        data={"title": "a photo"},
        headers={"Prefer": f"respond-async, wait={LONG_WAIT_S}"},
    )
    assert listing.status_code == 200, listing.text
    assert listing.headers["Preference-Applied"] == f"wait={LONG_WAIT_S}"
    assert listing.json()["verdict"]["status"] == "done"

    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "photo.jpg").write_bytes(photo)
    scan = ["scan", str(tmp_path / "scan"), "--api", deployment.api_url, "--api-key", deployment.key]
    assert main([*scan, "--wait", "--json", "--no-progress"]) == 0
    (scanned,) = json.loads(capsys.readouterr().out)
    assert scanned["job"]["status"] == "done" and scanned["job"]["decision"] is not None
    client.close()


@pytest.mark.slow  # a worker working through a backlog of 500 jobs until the live one is decided
def test_a_live_upload_is_decided_within_one_batch_while_500_bulk_jobs_wait(
    deployment: Deployment, photos: dict[str, bytes]
) -> None:
    deployment.start_api()
    client = deployment.client
    database_url = deployment.env["MODTAG_DATABASE_URL"]
    photo = list(photos.values())[2]
    first = client.post("/v1/jobs", files={"image": ("bulk.jpg", photo)}, data={"priority": "bulk"})
    assert first.status_code == 202, first.text
    # The other 499 rows as the API would insert them for the same upload (its blob), enqueued directly: fast.
    with session_scope(database_url) as session:
        template = session.get(Job, first.json()["id"])
        assert template is not None
        columns = {name: getattr(template, name) for name in _COPIED}
        rows = [Job(**columns, id=new_id()) for _ in range(BULK_JOBS - 1)]
        session.add_all(rows)
        session.commit()
        bulk_ids = [template.id, *(row.id for row in rows)]
    settings = Settings(_env_file=None, redis_url=deployment.env["MODTAG_REDIS_URL"])  # type: ignore[call-arg]
    celery = make_celery(settings)
    try:
        for job_id in bulk_ids[1:]:
            enqueue_job(celery, job_id, Priority.BULK)
    finally:
        celery.close()
    with session_scope(database_url) as session:
        mark_enqueued(session, *bulk_ids[1:])

    # Every job runs the models: the same photo 500 times would otherwise reuse the first decision. The worker's
    # default task threads (three batches) and bulk cap (two batches): a batch of threads is kept for live jobs.
    deployment.start_worker(concurrency=None, MODTAG_REUSE_DECISIONS="false")
    wait_for(lambda: _finished(database_url, bulk_ids), 120, "the worker busy with the backlog")
    live = client.post("/v1/jobs", files={"image": ("live.jpg", photos["astronaut"])})
    assert live.status_code == 202, live.text
    assert live.json()["priority"] == "interactive"
    # Waited for by polling, however slow this machine is today: what is asserted is the order, not the time.
    assert client.wait_job(live.json()["id"], timeout_s=480)["status"] == "done"

    with session_scope(database_url) as session:
        live_job = session.get(Job, live.json()["id"])
        assert live_job is not None and live_job.finished_at is not None
        arrived, decided = as_utc(live_job.created_at), as_utc(live_job.finished_at)
        finished = session.exec(select(Job.finished_at).where(col(Job.id).in_(bulk_ids))).all()
    moments = [as_utc(moment) for moment in finished if moment is not None]
    while_live_waited = sum(1 for moment in moments if arrived <= moment <= decided)
    after = BULK_JOBS - sum(1 for moment in moments if moment <= decided)
    # The bulk jobs the worker already held when the live one arrived may finish first: at most one batch of them.
    assert while_live_waited <= BATCH, f"{while_live_waited} bulk jobs decided while the live one waited"
    assert after >= BULK_JOBS // 4, f"only {after} bulk jobs were still waiting: the test proves nothing"
    print(f"\nlive job: {while_live_waited} bulk jobs decided while it waited, {after} still waiting after it")
    log = (deployment.log_dir / "worker.log").read_text(errors="replace")
    assert "holding 16 bulk jobs: bulk queue paused" in log and "bulk queue resumed" in log


def _finished(database_url: str, job_ids: list[str]) -> int:
    with session_scope(database_url) as session:
        rows = session.exec(
            select(Job.id).where(col(Job.id).in_(job_ids), col(Job.finished_at).is_not(None)).limit(1)
        ).all()
    return len(rows)


# The columns a bulk row copies from the first bulk job (the API's own insert for the same upload).
_COPIED = (
    "tenant", "policy", "policy_version", "source", "blob_key", "image_sha256", "image_bytes", "image_width",
    "image_height", "image_format", "priority",
)  # fmt: skip

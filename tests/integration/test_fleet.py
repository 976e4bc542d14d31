"""modtag as a fleet runs it, with real processes: an API and workers sharing PostgreSQL, Redis and S3 (moto's
server; MinIO is not installable here) and no directory; a worker SIGKILLed or SIGTERMed mid-batch; three
workers sharing sixty jobs; concurrent `modtag migrate` runs.

Recovery is driven by settings, never by sleeps: the lease, its renewal and the reconciler's interval are
set short here, so a dead worker's jobs come back in seconds instead of the default minute or two.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, text
from sqlmodel import select

from core.db import session_scope
from core.tables import Decision, Job, JobStatus
from tests.support.deployment import Deployment, submit
from tests.support.photos import NAMES, photo_bytes
from tests.support.s3 import S3Bucket, object_names
from tests.support.servers import reset_postgres
from tests.support.waiting import wait_for

FAST_RECOVERY = {
    "MODTAG_RUNNING_LEASE_S": "6",
    "MODTAG_LEASE_RENEW_S": "1",
    "MODTAG_RECONCILE_INTERVAL_S": "1",
    "MODTAG_QUEUED_GRACE_S": "5",
}
# A worker that gathers a batch for this long holds its claimed jobs, running, for as long: "mid-batch".
SLOW_BATCH = {"MODTAG_BATCH_WAIT_MS": "600000", "MODTAG_BATCH_MAX_IMAGES": "64"}


def submit_photos(fleet: Deployment, count: int) -> list[str]:
    """`count` distinct uploads (no two alike, so none reuses another's decision)."""
    return [
        submit(fleet, photo_bytes(NAMES[i % len(NAMES)], size=(64 + i, 48)), name=f"{i}.jpg")["id"]
        for i in range(count)
    ]


def rows(fleet: Deployment, job_ids: list[str]) -> dict[str, Job]:
    with session_scope(fleet.env["MODTAG_DATABASE_URL"]) as session:
        found = session.exec(select(Job).where(Job.id.in_(job_ids))).all()  # type: ignore[attr-defined]
        return {job.id: job for job in found}


def decisions_per_job(fleet: Deployment, job_ids: list[str]) -> Counter[str]:
    with session_scope(fleet.env["MODTAG_DATABASE_URL"]) as session:
        query = select(Decision.job_id, func.count()).where(Decision.job_id.in_(job_ids)).group_by(Decision.job_id)  # type: ignore[attr-defined]
        return Counter({job_id: int(count) for job_id, count in session.exec(query).all()})


def running_on(fleet: Deployment, job_ids: list[str], pid: int) -> list[str]:
    return [
        job.id
        for job in rows(fleet, job_ids).values()
        if job.status == JobStatus.RUNNING and job.worker and job.worker.endswith(f":{pid}")
    ]


def assert_each_decided_once(fleet: Deployment, job_ids: list[str], final: dict[str, dict[str, Any]]) -> None:
    assert sorted(final) == sorted(job_ids), "some jobs never became final"
    assert {job["status"] for job in final.values()} == {"done"}, [job.get("error") for job in final.values()]
    assert decisions_per_job(fleet, job_ids) == Counter(dict.fromkeys(job_ids, 1))


@pytest.mark.timeout(600)  # several processes start on a shared 2-core machine
def test_api_and_two_workers_share_no_directory_only_s3(fleet: Deployment, s3_bucket: S3Bucket) -> None:
    fleet.start_api()
    first, second = fleet.start_worker("worker-1"), fleet.start_worker("worker-2")
    job_ids = submit_photos(fleet, 8)
    final = fleet.client.wait_jobs(job_ids, timeout_s=120)
    assert_each_decided_once(fleet, job_ids, final)
    keys = {job.blob_key for job in rows(fleet, job_ids).values()}
    assert {f"images/{key[:2]}/{key}" for key in keys if key} <= set(object_names(s3_bucket))
    thumbnail = fleet.client.get(f"/v1/jobs/{job_ids[0]}/thumbnail")  # read back from S3 by the API
    assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"
    assert fleet.hosts_dir is not None
    for host in ("api", "worker-1", "worker-2"):
        assert not (fleet.hosts_dir / host / "data" / "blobs").exists(), f"{host} wrote blobs to its disk"
    assert first.poll() is None and second.poll() is None


@pytest.mark.timeout(600)  # several processes start on a shared 2-core machine
def test_a_sigkilled_workers_jobs_are_decided_elsewhere_once(fleet: Deployment) -> None:
    fleet.env.update(FAST_RECOVERY)
    fleet.start_api()
    doomed = fleet.start_worker("doomed", **SLOW_BATCH)
    job_ids = submit_photos(fleet, 12)
    held = wait_for(lambda: running_on(fleet, job_ids, doomed.pid), 60, "the doomed worker running jobs")
    fleet.start_worker("survivor")  # takes what is still queued; the doomed worker's batch waits on
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    killed_at = time.monotonic()
    final = fleet.client.wait_jobs(job_ids, timeout_s=180)
    recovery_s = time.monotonic() - killed_at
    assert_each_decided_once(fleet, job_ids, final)
    after = rows(fleet, job_ids)
    for job_id in held:  # claimed twice: once by the dead worker, once by the survivor
        assert after[job_id].attempts == 2 and not after[job_id].worker.endswith(f":{doomed.pid}")  # type: ignore[union-attr]
    lease_s = FAST_RECOVERY["MODTAG_RUNNING_LEASE_S"]
    print(f"\nrecovery after SIGKILL: {len(held)} running job(s) decided {recovery_s:.1f}s later (lease {lease_s}s)")


@pytest.mark.timeout(600)  # several processes start on a shared 2-core machine
def test_sigterm_mid_batch_hands_the_batch_back_and_exits_within_the_drain(fleet: Deployment) -> None:
    fleet.env.update(FAST_RECOVERY)
    fleet.start_api()
    drain_s = 3.0
    draining = fleet.start_worker("draining", MODTAG_WORKER_DRAIN_S=str(drain_s), **SLOW_BATCH)
    job_ids = submit_photos(fleet, 6)
    held = wait_for(lambda: running_on(fleet, job_ids, draining.pid), 60, "the worker running jobs")
    draining.send_signal(signal.SIGTERM)
    asked_at = time.monotonic()
    # A generous deadline, not a performance bound: without the drain the worker would hold its batch for
    # SLOW_BATCH's 600 s; TimeoutExpired here fails the test.
    draining.wait(drain_s + 30)
    exited_s = time.monotonic() - asked_at
    assert "handed" in fleet.log("draining") and "back to the queue" in fleet.log("draining")
    states = rows(fleet, held)
    assert {job.status for job in states.values()} == {JobStatus.QUEUED}  # handed back, not left running
    fleet.start_worker("next")
    final = fleet.client.wait_jobs(job_ids, timeout_s=120)
    assert_each_decided_once(fleet, job_ids, final)
    print(f"\nSIGTERM: exited {exited_s:.1f}s after the signal (drain {drain_s:g}s), {len(held)} job(s) handed back")


def test_sigterm_lets_a_batch_that_finishes_in_time_finish(fleet: Deployment) -> None:
    fleet.start_api()
    worker = fleet.start_worker("finishing", MODTAG_BATCH_WAIT_MS="1500", MODTAG_BATCH_MAX_IMAGES="64")
    job_ids = submit_photos(fleet, 3)
    held = wait_for(lambda: running_on(fleet, job_ids, worker.pid), 60, "the worker running jobs")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    states = rows(fleet, held)
    assert {job.status for job in states.values()} == {JobStatus.DONE}
    assert decisions_per_job(fleet, held) == Counter(dict.fromkeys(held, 1))


@pytest.mark.timeout(900)  # sixty jobs through three processes on a shared 2-core machine took 4-6 minutes
def test_three_workers_share_sixty_jobs_each_decided_once(fleet: Deployment) -> None:
    fleet.start_api()
    workers = [fleet.start_worker(f"worker-{n}") for n in (1, 2, 3)]
    started = time.monotonic()
    job_ids = submit_photos(fleet, 60)
    final = fleet.client.wait_jobs(job_ids, timeout_s=720)
    elapsed = time.monotonic() - started
    assert_each_decided_once(fleet, job_ids, final)
    by_worker = Counter(job.worker.rsplit(":", 1)[-1] for job in rows(fleet, job_ids).values())  # type: ignore[union-attr]
    assert set(by_worker) == {str(worker.pid) for worker in workers}, by_worker
    print(f"\n3 workers: 60 jobs in {elapsed:.1f}s ({60 / elapsed:.2f} jobs/s), per worker {dict(by_worker)}")


def test_concurrent_migrate_runs_migrate_once(postgres_url: str) -> None:
    reset_postgres(postgres_url)
    env = {**os.environ, "MODTAG_DATABASE_URL": postgres_url}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "modtag", "migrate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(4)
    ]
    outputs = [run.communicate(timeout=120)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, outputs
    from core.db import get_engine

    with get_engine(postgres_url).connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert len(versions) == 1 and all(f"database at revision {versions[0]}" in out for out in outputs)

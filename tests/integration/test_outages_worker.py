"""Outages through real processes: a worker (`modtag worker`) whose path to moto's S3 or to PostgreSQL is cut while
jobs are queued, for longer than the old retry window (three attempts, 2 s and 4 s apart: about 6 s). Every job
ends `done` with one decision and one counted attempt, the worker lives on, its `modtag_dependency_up` gauge goes
0 then 1, and its log has one line for the outage's start and one for its end.

The cut is a proxy between the worker and the real server (tests/support/proxy.py): stopping moto would lose its
bucket, and stopping the session's PostgreSQL every other test's database. The API reaches both directly, so
uploads are accepted during the worker's outage. Waits are short (MODTAG_DEPENDENCY_RETRY_MAX_S=4) so the test
takes seconds; how long the outage lasts is set by a condition (each job met it several times), never a sleep.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlmodel import select

from core.db import session_scope
from core.dependencies import Dependency
from core.tables import Job, JobStatus
from modtag.servers import free_port
from tests.support.deployment import Deployment, submit
from tests.support.outages import decisions_per_job, outage_lines, postgres_socket, worker_metric
from tests.support.photos import NAMES, photo_bytes
from tests.support.proxy import cuttable_proxy
from tests.support.s3 import S3Bucket
from tests.support.waiting import wait_for

JOBS = 8
OUTAGE_MIN_S = 10  # longer than the old window (about 6 s)
OUTAGE_WAITS = {"MODTAG_DEPENDENCY_RETRY_MAX_S": "4"}


def start_worker(fleet: Deployment, metrics_port: int, **env: str) -> subprocess.Popen[bytes]:
    """The worker, with its metrics on `metrics_port` and the short outage waits; `env` is its path to the cut."""
    return fleet.start_worker(
        "worker",
        MODTAG_WORKER_METRICS_PORT=str(metrics_port),
        MODTAG_WORKER_METRICS_HOST="127.0.0.1",
        **OUTAGE_WAITS,
        **env,
    )


def submit_photos(deployment: Deployment, count: int) -> list[str]:
    return [
        submit(deployment, photo_bytes(NAMES[i % len(NAMES)], size=(72 + i, 40)), name=f"{i}.jpg")["id"]
        for i in range(count)
    ]


def rows(database_url: str, job_ids: list[str]) -> dict[str, Job]:
    with session_scope(database_url) as session:
        return {job.id: job for job in session.exec(select(Job).where(Job.id.in_(job_ids))).all()}  # type: ignore[attr-defined]


def retries(port: int, reason: str) -> float:
    return worker_metric(port, "modtag_jobs_retried_total", reason=reason) or 0.0


def longest_wait(log: Path) -> float:
    """The longest countdown Celery logged for a retry ('Retry in 3.21s'), 0 when it logged none."""
    return max((float(s) for s in re.findall(r"Retry in ([\d.]+)s", log.read_text(errors="replace"))), default=0.0)


@pytest.mark.timeout(600)  # processes start on a shared small machine
def test_an_s3_outage_longer_than_the_old_retry_window_fails_no_job(fleet: Deployment, s3_bucket: S3Bucket) -> None:
    database_url = fleet.env["MODTAG_DATABASE_URL"]
    endpoint = urlsplit(s3_bucket.endpoint)
    metrics_port = free_port()
    with cuttable_proxy((endpoint.hostname or "127.0.0.1", endpoint.port or 80)) as s3:
        fleet.start_api()
        worker = start_worker(fleet, metrics_port, AWS_ENDPOINT_URL=f"http://{s3.address}")
        s3.cut()
        cut_at = time.monotonic()
        job_ids = submit_photos(fleet, JOBS)
        past_the_old_window(metrics_port, Dependency.BLOB_STORE, cut_at)
        assert {job.status for job in rows(database_url, job_ids).values()} <= {JobStatus.QUEUED, JobStatus.RUNNING}
        s3.restore()
        outage_s = time.monotonic() - cut_at
        final = fleet.client.wait_jobs(job_ids, timeout_s=180)
    statuses = Counter(job["status"] for job in final.values())
    assert statuses == Counter(done=JOBS), [job.get("error") for job in final.values()]
    assert decisions_per_job(database_url, job_ids) == Counter(dict.fromkeys(job_ids, 1))
    assert {job.attempts for job in rows(database_url, job_ids).values()} == {1}  # the outage cost no attempt
    said_once(fleet, worker, metrics_port, Dependency.BLOB_STORE)
    longest = longest_wait(fleet.log_dir / "worker.log")
    print(
        f"\nS3 outage {outage_s:.1f}s: {statuses['done']} done, {statuses['failed']} failed, "
        f"{retries(metrics_port, 'blob_store_unavailable'):.0f} waits, longest {longest:.1f}s, "
        f"worker alive: {worker.poll() is None}"
    )


@pytest.mark.timeout(600)
def test_a_database_outage_mid_batch_costs_no_attempt(fleet: Deployment, postgres_url: str) -> None:
    # pgserver listens on a unix socket: the worker reaches it through a TCP port that the test can cut.
    socket_path, path = postgres_socket(postgres_url)
    metrics_port = free_port()
    with cuttable_proxy(socket_path) as database:
        fleet.start_api()
        worker = start_worker(
            fleet,
            metrics_port,
            MODTAG_DATABASE_URL=f"postgresql://postgres@{database.address}{path}",
            MODTAG_BATCH_WAIT_MS="3000",  # claimed jobs wait in the batcher: the cut lands mid-job
            MODTAG_BATCH_MAX_IMAGES="64",
        )
        job_ids = submit_photos(fleet, JOBS)
        wait_for(
            lambda: any(job.status == JobStatus.RUNNING for job in rows(postgres_url, job_ids).values()),
            60,
            "the worker running jobs",
        )
        database.cut()
        cut_at = time.monotonic()
        running_at_cut = [job.id for job in rows(postgres_url, job_ids).values() if job.status == JobStatus.RUNNING]
        past_the_old_window(metrics_port, Dependency.DATABASE, cut_at)
        database.restore()
        outage_s = time.monotonic() - cut_at
        final = fleet.client.wait_jobs(job_ids, timeout_s=180)
    statuses = Counter(job["status"] for job in final.values())
    assert statuses == Counter(done=JOBS), [job.get("error") for job in final.values()]
    assert decisions_per_job(postgres_url, job_ids) == Counter(dict.fromkeys(job_ids, 1))
    attempts = {job.id: job.attempts for job in rows(postgres_url, job_ids).values()}
    assert set(attempts.values()) == {1}, {job_id: attempts[job_id] for job_id in running_at_cut}
    said_once(fleet, worker, metrics_port, Dependency.DATABASE)
    print(
        f"\ndatabase outage {outage_s:.1f}s ({len(running_at_cut)} job(s) mid-batch): {statuses['done']} done, "
        f"{statuses['failed']} failed, {retries(metrics_port, 'database_unavailable'):.0f} waits, "
        f"longest {longest_wait(fleet.log_dir / 'worker.log'):.1f}s, worker alive: {worker.poll() is None}"
    )


def past_the_old_window(metrics_port: int, dependency: Dependency, cut_at: float) -> None:
    """Until three deliveries per job met the outage (all of the old attempts) and the old window is past; the
    worker's gauge for `dependency` is then 0."""
    reason = f"{dependency.value}_unavailable"
    wait_for(
        lambda: retries(metrics_port, reason) >= 3 * JOBS and time.monotonic() - cut_at > OUTAGE_MIN_S,
        240,
        "every job meeting the outage, for longer than the old window",
    )
    assert worker_metric(metrics_port, "modtag_dependency_up", dependency=dependency.value) == 0


def said_once(fleet: Deployment, worker: subprocess.Popen[bytes], metrics_port: int, dependency: Dependency) -> None:
    """The worker lives on, its gauge for `dependency` is back at 1, and its log has one line for the outage's start
    and one for its end."""
    assert worker.poll() is None
    wait_for(
        lambda: worker_metric(metrics_port, "modtag_dependency_up", dependency=dependency.value) == 1,
        30,
        "the gauge at 1",
    )
    down, up = outage_lines(fleet.log_dir / "worker.log", dependency.value.replace("_", " "))
    assert len(down) == 1 and len(up) == 1, (down, up)

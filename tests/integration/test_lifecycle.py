"""The job lifecycle against a real database: claims count attempts, retries read that count, final states stay."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col

from core.db import session_scope
from core.errors import TransientError
from core.settings import Settings
from core.tables import Job, JobStatus
from tests.support.jobs import new_job, stored
from worker.lifecycle import JobLifecycle, RetryLater, Unclaimed


def test_attempts_are_counted_by_claims_and_a_retry_gives_up_at_max_attempts(database_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, max_attempts=3)
    lifecycle = JobLifecycle(settings, "worker-a")
    job_id = new_job(database_url)
    delays = []
    for attempt in (1, 2):
        job = lifecycle.claim(job_id)
        assert (job.attempts, job.status, job.worker) == (attempt, JobStatus.RUNNING, "worker-a")
        with pytest.raises(RetryLater) as retry:
            lifecycle.retry(job, TransientError("the broker hiccuped", code="broker_unavailable"))
        assert retry.value.code == "broker_unavailable"
        delays.append(retry.value.delay_s)
        assert stored(database_url, job_id).status == JobStatus.QUEUED  # handed back for the next delivery
    assert delays == [2, 4]  # exponential backoff from the job row's count
    job = lifecycle.claim(job_id)
    result = lifecycle.retry(job, TransientError("the broker hiccuped", code="broker_unavailable"))
    assert (result.outcome, result.code) == ("failed", "broker_unavailable")
    final = stored(database_url, job_id)
    assert (final.status, final.attempts, final.error_code) == (JobStatus.FAILED, 3, "broker_unavailable")
    assert final.error_message == "gave up after 3 attempts: the broker hiccuped"
    with pytest.raises(Unclaimed) as again:
        lifecycle.claim(job_id)  # a redelivered message of a final job does nothing
    assert again.value.result.outcome == "duplicate" and stored(database_url, job_id).attempts == 3


def test_a_job_held_by_a_live_lease_or_gone_is_not_claimed(database_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, running_lease_s=600)
    job_id = new_job(database_url)
    JobLifecycle(settings, "worker-a").claim(job_id)
    with pytest.raises(Unclaimed) as busy:
        JobLifecycle(settings, "worker-b").claim(job_id)
    assert busy.value.result.outcome == "busy" and stored(database_url, job_id).attempts == 1
    with pytest.raises(Unclaimed) as missing:
        JobLifecycle(settings, "worker-b").claim("0" * 32)
    assert missing.value.result.outcome == "missing"


def test_giving_up_from_outside_the_run_names_the_attempts_made(database_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, max_attempts=3)
    lifecycle = JobLifecycle(settings, "worker-a")
    job_id = new_job(database_url)
    lifecycle.claim(job_id)
    assert lifecycle.give_up(job_id, "job_timeout", "the job ran over 120s") is not None
    final = stored(database_url, job_id)
    assert (final.status, final.error_code) == (JobStatus.FAILED, "job_timeout")
    assert final.error_message == "gave up after 1 attempt: the job ran over 120s"
    assert lifecycle.give_up("0" * 32, "job_timeout", "gone") is None


def age_lease(database_url: str, job_id: str, seconds: float) -> None:
    """Move the job's last lease renewal `seconds` into the past: what a worker that stopped renewing leaves."""
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.execute(
            update(Job).where(col(Job.id) == job_id).values(updated_at=job.updated_at - timedelta(seconds=seconds))
        )


def test_a_renewed_lease_holds_and_a_lapsed_one_passes_to_another_worker(database_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, running_lease_s=60)
    alive, other = JobLifecycle(settings, "worker-a"), JobLifecycle(settings, "worker-b")
    job_id = new_job(database_url)
    alive.claim(job_id)
    assert alive.held == [job_id]
    age_lease(database_url, job_id, 59)  # the job has run for most of a lease...
    assert alive.renew() == 1  # ...and its worker renews it
    age_lease(database_url, job_id, 30)
    with pytest.raises(Unclaimed) as busy:
        other.claim(job_id)
    assert busy.value.result.outcome == "busy"

    age_lease(database_url, job_id, 61)  # the worker stopped renewing: it died
    taken = other.claim(job_id)
    assert (taken.worker, taken.attempts) == ("worker-b", 2)
    assert alive.renew() == 0  # the old worker, if it comes back, no longer holds it
    alive.release(job_id)
    assert alive.held == [] and other.held == [job_id]


def test_handing_back_requeues_the_running_jobs(database_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url)
    lifecycle = JobLifecycle(settings, "worker-a")
    first, second = new_job(database_url), new_job(database_url)
    lifecycle.claim(first)
    lifecycle.claim(second)
    assert sorted(lifecycle.hand_back()) == sorted([first, second])
    assert lifecycle.held == []
    assert {stored(database_url, job_id).status for job_id in (first, second)} == {JobStatus.QUEUED}
    again = JobLifecycle(settings, "worker-b").claim(first)
    assert again.attempts == 2  # the handed-back attempt still counts

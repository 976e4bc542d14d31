"""The reconciler against a real Redis and database: lost messages come back, dead-lettered jobs fail."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis

from core import jobs
from core.blobs import LocalBlobStore
from core.broker import UNACKED_INDEX_KEY, UNACKED_KEY, enqueue_job, make_celery, queued_task_ids, task_id_for
from core.db import session_scope
from core.errors import NotFound
from core.queues import Queue, TaskName
from core.reconcile import reconcile_once, start_reconciler
from core.settings import Settings
from core.tables import JobStatus, utcnow
from tests.support.jobs import new_job
from tests.support.waiting import wait_for


def settings_for(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url, data_dir=tmp_path, queued_grace_s=1, max_attempts=3)


def test_reconcile_requeues_lost_recovers_abandoned_and_fails_exhausted(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, redis_url, tmp_path)
    celery = make_celery(settings)
    client = redis.Redis.from_url(redis_url)
    long_ago = utcnow() - timedelta(hours=2)
    lost = new_job(database_url, updated_at=long_ago)  # queued, but its message never reached Redis
    waiting = new_job(database_url, updated_at=long_ago)  # queued, with its message still in Redis
    enqueue_job(celery, waiting)
    fresh = new_job(database_url)  # just submitted: not stale yet
    # Running jobs whose worker stopped renewing their lease (updated_at) long ago.
    abandoned = new_job(database_url, status=JobStatus.RUNNING, started_at=long_ago, updated_at=long_ago, attempts=1)
    exhausted = new_job(database_url, status=JobStatus.RUNNING, started_at=long_ago, updated_at=long_ago, attempts=3)
    done = new_job(database_url, status=JobStatus.DONE, updated_at=long_ago)

    report = reconcile_once(settings, celery, client)

    assert (report.requeued, report.recovered, report.failed) == (1, 1, 1)
    in_redis = queued_task_ids(client, Queue.INFERENCE.value, fresh_s=settings.running_lease_s)
    assert in_redis == {task_id_for(job_id) for job_id in (lost, waiting, abandoned)}
    assert client.llen(Queue.INFERENCE.value) == 3  # `waiting` was not enqueued a second time
    with session_scope(database_url) as session:
        status = {job_id: jobs.get_job(session, job_id) for job_id in (lost, fresh, abandoned, exhausted, done)}
        assert status[lost].status == JobStatus.QUEUED  # type: ignore[union-attr]
        assert status[fresh].status == JobStatus.QUEUED  # type: ignore[union-attr]
        assert status[abandoned].status == JobStatus.QUEUED  # type: ignore[union-attr]
        assert status[exhausted].status == JobStatus.FAILED  # type: ignore[union-attr]
        assert status[exhausted].error_code == "worker_lost"  # type: ignore[union-attr]
        assert status[done].status == JobStatus.DONE  # type: ignore[union-attr]

    # A second pass right away changes nothing: the re-enqueued jobs are fresh again.
    again = reconcile_once(settings, celery, client)
    assert (again.requeued, again.recovered, again.failed) == (0, 0, 0)
    celery.close()


def erased_at(database_url: str, job_id: str) -> datetime | None:
    with session_scope(database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        return job.erased_at


def test_the_reconciler_loop_sweeps_retention(database_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=database_url, redis_url=redis_url, data_dir=tmp_path, retention_days=30, reconcile_interval_s=0.05
    )
    blobs = LocalBlobStore(settings.resolved_blob_dir)
    key = blobs.put(b"an old image")
    old = new_job(database_url, blob_key=key, status=JobStatus.DONE, created_at=utcnow() - timedelta(days=31))
    recent = new_job(database_url, status=JobStatus.DONE)
    stop = threading.Event()
    thread = start_reconciler(settings, make_celery(settings), stop)
    try:
        wait_for(lambda: erased_at(database_url, old), 30, "the old job erased by the reconciler's retention sweep")
    finally:
        stop.set()
        thread.join(10)
    assert erased_at(database_url, recent) is None
    with pytest.raises(NotFound):
        blobs.get(key)


def test_a_job_does_not_hide_behind_a_message_a_dead_worker_took(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """kombu keeps a delivered message in its unacked set until the visibility timeout: a live worker's
    fresh delivery counts as waiting, one delivered a lease ago (its worker may be dead) does not."""
    settings = settings_for(database_url, redis_url, tmp_path)
    celery = make_celery(settings)
    client = redis.Redis.from_url(redis_url)
    long_ago = utcnow() - timedelta(hours=2)
    taken_by_dead = new_job(database_url, updated_at=long_ago)
    taken_by_live = new_job(database_url, updated_at=long_ago)
    for job_id, delivered_s_ago in ((taken_by_dead, settings.running_lease_s + 5), (taken_by_live, 1)):
        enqueue_job(celery, job_id)
        deliver_without_ack(client, job_id, time.time() - delivered_s_ago)
    assert client.llen(Queue.INFERENCE.value) == 0

    report = reconcile_once(settings, celery, client)

    assert report.requeued == 1
    assert queued_ids(client) == [task_id_for(taken_by_dead)]
    celery.close()


def deliver_without_ack(client: redis.Redis, job_id: str, at: float) -> None:
    """What kombu's Redis transport does when a worker takes a message: the queue's head moves to `unacked`."""
    raw = client.rpop(Queue.INFERENCE.value)
    assert raw is not None and task_id_for(job_id) in raw.decode()
    tag = f"tag-{job_id}"
    client.hset(UNACKED_KEY, tag, json.dumps([raw.decode(), "", Queue.INFERENCE.value]))
    client.zadd(UNACKED_INDEX_KEY, {tag: at})


def queued_ids(client: redis.Redis) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(Queue.INFERENCE.value, 0, -1)]


def test_a_retry_held_until_its_eta_is_not_delivered_twice(database_url: str, redis_url: str, tmp_path: Path) -> None:
    """A job handed back during a dependency outage waits out its countdown as a message its worker holds
    unacknowledged: delivered long ago, due later. It is waiting, not lost (the chaos run re-delivered such jobs)."""
    settings = settings_for(database_url, redis_url, tmp_path)
    celery = make_celery(settings)
    client = redis.Redis.from_url(redis_url)
    long_ago = utcnow() - timedelta(hours=2)
    held = new_job(database_url, updated_at=long_ago)
    celery.send_task(TaskName.PROCESS_JOB.value, args=[held], task_id=task_id_for(held), countdown=300)
    deliver_without_ack(client, held, time.time() - settings.running_lease_s - 5)

    report = reconcile_once(settings, celery, client)

    assert report.requeued == 0 and queued_ids(client) == []
    celery.close()

"""The reconciler as a fleet runs it, against a real Redis and database: one pass at a time across the fleet, a Redis
restarted empty noticed at the next look, taken-back jobs at the head of the queue, jobs never enqueued picked up
within seconds (the outbox sweep), a submit while Redis is down still accepted."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis

from core import jobs
from core.broker import enqueue_job, make_celery, task_id_for
from core.db import session_scope
from core.queues import Queue
from core.reconcile import LOCK_KEY, LeaseTrust, reconcile_once
from core.settings import Settings
from core.tables import Job, JobStatus, utcnow
from tests.support.api import api_settings, running_api
from tests.support.jobs import new_job
from tests.support.photos import photo_bytes

QUEUE = Queue.INFERENCE.value


def settings_for(database_url: str, redis_url: str, tmp_path: Path, **fields: Any) -> Settings:
    return Settings(
        _env_file=None, database_url=database_url, redis_url=redis_url, data_dir=tmp_path, max_attempts=3, **fields
    )


def messages(client: redis.Redis) -> list[str]:
    """Task ids in the queue, from the head (taken next: kombu's BRPOP takes the right end) to the tail."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(QUEUE, 0, -1))]


def test_racing_reconcilers_enqueue_each_stale_job_once(database_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, redis_url, tmp_path)
    long_ago = utcnow() - timedelta(hours=2)
    stale = [new_job(database_url, updated_at=long_ago, enqueued_at=long_ago) for _ in range(20)]
    apps = [make_celery(settings) for _ in range(8)]
    clients = [redis.Redis.from_url(redis_url) for _ in apps]
    start = threading.Barrier(len(apps))
    reports = []

    def reconcile(index: int) -> None:
        start.wait()
        reports.append(reconcile_once(settings, apps[index], clients[index]))

    threads = [threading.Thread(target=reconcile, args=(index,)) for index in range(len(apps))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert Counter(messages(clients[0])) == Counter(task_id_for(job_id) for job_id in stale)
    assert sum(report.requeued for report in reports) == len(stale)
    assert sum(not report.skipped for report in reports) >= 1
    assert not clients[0].exists(LOCK_KEY)  # released by its holder
    for app in apps:
        app.close()


def test_the_lock_is_released_only_by_its_holder(database_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    client.set(LOCK_KEY, "another process's token", px=60_000)  # a pass of another worker in progress
    new_job(database_url, updated_at=utcnow() - timedelta(hours=2))
    app = make_celery(settings)
    assert reconcile_once(settings, app, client).skipped
    assert client.get(LOCK_KEY) == b"another process's token" and client.llen(QUEUE) == 0
    client.delete(LOCK_KEY)
    assert reconcile_once(settings, app, client).requeued == 1
    app.close()


def test_a_redis_restarted_empty_is_noticed_at_the_next_look(
    database_url: str, redis_url: str, redis_server: Any, tmp_path: Path
) -> None:
    settings = settings_for(database_url, redis_url, tmp_path)  # queued grace: the default minute
    app, client = make_celery(settings), redis.Redis.from_url(redis_url)
    queued = [new_job(database_url) for _ in range(3)]
    for job_id in queued:
        enqueue_job(app, job_id)
    with session_scope(database_url) as session:
        jobs.mark_enqueued(session, *queued)
    first = reconcile_once(settings, app, client, full=False)  # the first look sets the marker
    assert first.requeued == 0 and client.llen(QUEUE) == 3

    redis_server.stop(wipe=True)
    redis_server.start()
    client.connection_pool.disconnect()
    assert client.llen(QUEUE) == 0

    # The very next look (seconds later, not after the queued grace) puts every queued job back, once.
    report = reconcile_once(settings, app, client, full=False)
    assert report.broker_restarted and report.requeued == 3
    assert Counter(messages(client)) == Counter(task_id_for(job_id) for job_id in queued)
    again = reconcile_once(settings, app, client, full=False)
    assert not again.broker_restarted and again.requeued == 0
    app.close()


def test_a_job_taken_back_from_a_dead_worker_is_taken_next(database_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, redis_url, tmp_path)
    app, client = make_celery(settings), redis.Redis.from_url(redis_url)
    reconcile_once(settings, app, client)  # the marker: this Redis has not restarted since the last look
    backlog = [new_job(database_url) for _ in range(5)]
    for job_id in backlog:
        enqueue_job(app, job_id)
    long_ago = utcnow() - timedelta(hours=2)
    abandoned = new_job(database_url, status=JobStatus.RUNNING, updated_at=long_ago, started_at=long_ago, attempts=1)

    report = reconcile_once(settings, app, client)

    assert report.recovered == 1
    # What a worker takes next, through kombu's own Redis transport (BRPOP on the right end).
    with app.connection_for_read() as connection:
        taken = connection.default_channel.basic_get(QUEUE, no_ack=True)
    assert taken is not None and taken.headers["id"] == task_id_for(abandoned)
    assert messages(client) == [task_id_for(job_id) for job_id in backlog]  # the backlog's order is kept
    app.close()


def test_jobs_never_enqueued_are_enqueued_after_the_outbox_grace(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, redis_url, tmp_path, outbox_grace_s=5)
    app, client = make_celery(settings), redis.Redis.from_url(redis_url)
    reconcile_once(settings, app, client)
    lost = new_job(database_url)  # committed; the API died before its enqueue
    enqueued = new_job(database_url)
    enqueue_job(app, enqueued)
    with session_scope(database_url) as session:
        jobs.mark_enqueued(session, enqueued)

    assert reconcile_once(settings, app, client, full=False).requeued == 0  # younger than the outbox grace
    later = utcnow() + timedelta(seconds=6)
    report = reconcile_once(settings, app, client, full=False, now=later)
    assert report.requeued == 1
    assert Counter(messages(client)) == Counter([task_id_for(enqueued), task_id_for(lost)])
    with session_scope(database_url) as session:
        assert jobs.get_job(session, lost).enqueued_at is not None  # type: ignore[union-attr]
    assert reconcile_once(settings, app, client, full=False, now=later).requeued == 0
    app.close()


def test_a_submit_while_redis_is_down_is_accepted_and_swept_in_when_it_is_back(
    database_url: str, redis_url: str, redis_server: Any, tmp_path: Path
) -> None:
    settings = api_settings(tmp_path, database_url, redis_url, outbox_grace_s=5)
    with running_api(settings) as api:
        redis_server.stop()
        response = api.upload(photo_bytes("coffee"))
        redis_server.start()
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    with session_scope(database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None and job.status == JobStatus.QUEUED and job.enqueued_at is None
    app, client = make_celery(settings), redis.Redis.from_url(redis_url)
    assert messages(client) == []
    report = reconcile_once(settings, app, client, full=False, now=utcnow() + timedelta(seconds=6))
    assert report.requeued == 1 and messages(client) == [task_id_for(job_id)]
    app.close()


def test_running_jobs_are_not_taken_back_for_a_lease_after_a_database_outage(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """During a database outage no worker renews its leases: every running job looks abandoned when it is back.

    The chaos run saw a reconciler take back live workers' jobs 0.2 s after the database returned, counting an
    attempt against each; the loop now trusts stale leases again only a whole lease after the outage.
    """
    settings = settings_for(database_url, redis_url, tmp_path, running_lease_s=60)
    app, client = make_celery(settings), redis.Redis.from_url(redis_url)
    long_ago = utcnow() - timedelta(minutes=5)
    running = new_job(database_url, status=JobStatus.RUNNING, updated_at=long_ago, started_at=long_ago, attempts=1)
    now = [1000.0]
    leases = LeaseTrust(settings.running_lease_s, clock=lambda: now[0])
    assert leases.trusted
    leases.database_down()
    assert not leases.trusted
    leases.database_answered()  # the first pass after the outage
    report = reconcile_once(settings, app, client, recover_running=leases.trusted)
    assert report.recovered == 0
    with session_scope(database_url) as session:
        job = session.get(Job, running)
        assert job is not None and job.status == JobStatus.RUNNING and job.attempts == 1
    now[0] += settings.running_lease_s - 1
    assert not leases.trusted  # a live worker has had less than a lease to renew
    now[0] += 1
    assert leases.trusted  # a lease later, a lease still stale is a dead worker's
    assert reconcile_once(settings, app, client, recover_running=leases.trusted).recovered == 1
    app.close()

"""The reconciler: puts back on the queue every job whose message was lost, so no job is ever lost.

Its loop also runs the retention sweep (core/erasure.py) when MODTAG_RETENTION_DAYS is set, and the sweep of
orphan blobs every MODTAG_ORPHAN_SWEEP_INTERVAL_S.

A job's message can vanish between the API's commit and its enqueue (a crash), when Redis restarts
empty, or with a worker killed mid-job. The database is the source of truth: queued jobs with no
message in Redis are enqueued again, and running jobs past their lease go back to queued (or fail
after `max_attempts`, so an image that kills workers cannot loop forever).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery

from core import jobs, metrics
from core.blobs import open_blob_store
from core.broker import enqueue_job, queued_task_ids, task_id_for
from core.db import session_scope
from core.erasure import OrphanSweep, sweep_retention
from core.queues import Queue
from core.settings import Settings
from core.tables import JobStatus, utcnow

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued: int = 0
    recovered: int = 0
    failed: int = 0


def reconcile_once(settings: Settings, celery: Celery, redis_client: Any) -> ReconcileReport:
    """One pass over stale jobs. Safe to run from several processes at once (conditional updates)."""
    report = ReconcileReport()
    now = utcnow()
    queued_before = now - timedelta(seconds=settings.queued_grace_s)
    running_before = now - timedelta(seconds=settings.running_lease_s)
    url = settings.resolved_database_url
    with session_scope(url) as session:
        stale = jobs.stale_jobs(session, queued_before=queued_before, running_before=running_before)
    if not stale:
        return report
    waiting = queued_task_ids(redis_client, Queue.INFERENCE.value, fresh_s=settings.running_lease_s)
    for job in stale:
        with session_scope(url) as session:
            if job.status == JobStatus.RUNNING:
                if job.attempts >= settings.max_attempts:
                    jobs.fail_job(
                        session,
                        job.id,
                        "worker_lost",
                        f"the worker processing this job stopped {job.attempts} times without finishing it; "
                        "the image may exhaust the worker's memory or time limit",
                    )
                    metrics.JOBS_FAILED.labels(job.policy, "worker_lost").inc()
                    metrics.JOBS_COMPLETED.labels(job.policy, "failed").inc()
                    report.failed += 1
                    continue
                if not jobs.reset_stale_running(session, job.id, running_before):
                    continue
                report.recovered += 1
                metrics.JOBS_REENQUEUED.labels("running").inc()
            else:
                if waiting is not None and task_id_for(job.id) in waiting:
                    continue  # its message is still in Redis, just behind a long backlog
                if not jobs.touch_queued(session, job.id):
                    continue
                report.requeued += 1
                metrics.JOBS_REENQUEUED.labels("queued").inc()
        enqueue_job(celery, job.id)
        log.info("re-enqueued job %s (was %s)", job.id, job.status)
    return report


def start_reconciler(settings: Settings, celery: Celery, stop: threading.Event) -> threading.Thread:
    """Run `reconcile_once` every `reconcile_interval_s` in a daemon thread until `stop` is set."""
    import redis

    def loop() -> None:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        blobs = open_blob_store(settings)
        orphans = OrphanSweep(settings, blobs)
        while not stop.wait(settings.reconcile_interval_s):
            try:
                report = reconcile_once(settings, celery, client)
                if report.requeued or report.recovered or report.failed:
                    log.warning("reconciler: %s", report)
                if settings.retention_days is not None:
                    sweep_retention(settings.resolved_database_url, blobs, settings.retention_days)
                orphans.run_if_due()
            except Exception:  # the loop must survive a database or broker outage
                log.exception("reconciler pass failed; will try again")

    thread = threading.Thread(target=loop, name="modtag-reconciler", daemon=True)
    thread.start()
    return thread

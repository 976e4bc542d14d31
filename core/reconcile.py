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
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from core import jobs, metrics
from core.blobs import open_blob_store
from core.broker import enqueue_job, enqueue_job_first, queued_task_ids, task_id_for
from core.db import session_scope
from core.dependencies import RECORD, Dependency, outage_of
from core.erasure import OrphanSweep, sweep_retention
from core.queues import Priority
from core.settings import Settings
from core.tables import JobStatus, utcnow

log = logging.getLogger(__name__)


# One pass at a time across the fleet: the holder's token, set with NX and an expiry, released by compare-and-delete.
LOCK_KEY = "modtag:reconcile:lock"
# Set by every pass. Gone means Redis restarted empty (or was flushed): every queued job's message may be lost.
MARKER_KEY = "modtag:reconcile:marker"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass
class ReconcileReport:
    requeued: int = 0
    recovered: int = 0
    failed: int = 0
    skipped: bool = False  # another process of the fleet was running a pass
    broker_restarted: bool = False  # the marker was gone: every queued job not in Redis was re-enqueued at once


def reconcile_once(
    settings: Settings,
    celery: Celery,
    redis_client: Any,
    *,
    full: bool = True,
    now: datetime | None = None,
    recover_running: bool = True,
) -> ReconcileReport:
    """One pass over stale jobs, by one process of the fleet at a time (a lock in Redis): another process's pass
    in progress makes this one a no-op (`skipped`). Without Redis it raises: nothing could be enqueued anyway.

    Every pass enqueues the queued jobs whose task never reached the broker (`outbox_grace_s`) and, when Redis
    lost its data since the last pass, every queued job whose message is not in Redis. A `full` pass also
    re-enqueues the jobs queued for longer than `queued_grace_s` and takes back the running jobs past their lease,
    unless `recover_running` is off (a database just back: see `LeaseTrust`).
    """
    token = secrets.token_hex(16)
    if not redis_client.set(LOCK_KEY, token, nx=True, px=max(1, round(settings.reconcile_lock_s * 1000))):
        return ReconcileReport(skipped=True)
    try:
        report = _reconcile(
            settings, celery, redis_client, full=full, now=now or utcnow(), recover_running=recover_running
        )
        redis_client.set(MARKER_KEY, token)
        return report
    finally:
        redis_client.eval(_RELEASE, 1, LOCK_KEY, token)


def _reconcile(
    settings: Settings, celery: Celery, redis_client: Any, *, full: bool, now: datetime, recover_running: bool
) -> ReconcileReport:
    report = ReconcileReport(broker_restarted=not redis_client.exists(MARKER_KEY))
    # A job queued since before `never`: looked at by every pass; `queued_before` and `running_before` by full ones.
    never = now - timedelta(seconds=settings.outbox_grace_s)
    queued_before = now - timedelta(seconds=settings.queued_grace_s)
    running_before = now - timedelta(seconds=settings.running_lease_s)
    if not full:
        queued_before = running_before = _NEVER
    if not recover_running:
        running_before = _NEVER
    url = settings.resolved_database_url
    # After a restart every enqueued job's message may be gone; a job never enqueued still waits for the outbox
    # grace, since the API may be enqueueing it right now.
    with session_scope(url) as session:
        stale = jobs.stale_jobs(
            session,
            queued_before=queued_before,
            running_before=running_before,
            unenqueued_before=never,
            enqueued_lost=report.broker_restarted,
        )
    if not stale:
        return report
    waiting = queued_task_ids(redis_client, fresh_s=settings.running_lease_s)  # on every queue
    for job in stale:
        with session_scope(url) as session:
            first = False
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
                first = True  # taken back from a dead worker: it has waited its turn already
                metrics.JOBS_REENQUEUED.labels("running").inc()
            else:
                if waiting is not None and task_id_for(job.id) in waiting:
                    continue  # its message is still in Redis, just behind a long backlog
                # Untouched since this pass read it: another pass (after a lock that expired) has not taken it.
                if job.enqueued_at is None:
                    stale_before = max(queued_before, never)
                else:
                    stale_before = now if report.broker_restarted else queued_before
                if not jobs.touch_queued(session, job.id, stale_before):
                    continue
                report.requeued += 1
                metrics.JOBS_REENQUEUED.labels("queued").inc()
            priority = Priority.of(job.priority)  # back on its own queue: a bulk job never jumps the live ones
            if first:
                enqueue_job_first(celery, redis_client, job.id, priority)
            else:
                enqueue_job(celery, job.id, priority)
            jobs.mark_enqueued(session, job.id)
        log.info("re-enqueued job %s (was %s)", job.id, job.status)
    return report


# A moment before any job: a bound that selects nothing.
_NEVER = datetime(2000, 1, 1, tzinfo=UTC)


class LeaseTrust:
    """Whether a running job's stale lease may be read as a dead worker: not while the database is unreachable
    for this process, and not for a whole lease after it came back.

    During a database outage no worker can renew its leases, so every running job's `updated_at` goes stale
    together; taking those jobs back the moment the database answers would count an attempt against jobs whose
    workers are alive and about to renew (the chaos run saw it 0.2 s after a 10 s outage). A lease after the
    outage, a live worker has renewed and only a dead one's jobs are still stale.
    """

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease_s = lease_s
        self._clock = clock
        self._down = False
        self._back_at: float | None = None

    def database_down(self) -> None:
        self._down = True

    def database_answered(self) -> None:
        if self._down:
            self._down = False
            self._back_at = self._clock()

    @property
    def trusted(self) -> bool:
        if self._down:
            return False
        return self._back_at is None or self._clock() - self._back_at >= self._lease_s


def start_reconciler(settings: Settings, celery: Celery, stop: threading.Event) -> threading.Thread:
    """In a daemon thread until `stop` is set: `reconcile_once` every `outbox_interval_s` (a full pass, and the
    sweeps, every `reconcile_interval_s`). A broker outage logs one line when it starts and one when it ends."""
    import redis

    def loop() -> None:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        blobs = open_blob_store(settings)
        orphans = OrphanSweep(settings, blobs)
        last_full = time.monotonic()
        broker_down_since: float | None = None
        leases = LeaseTrust(settings.running_lease_s)
        while not stop.wait(min(settings.outbox_interval_s, settings.reconcile_interval_s)):
            full = time.monotonic() - last_full >= settings.reconcile_interval_s
            try:
                report = reconcile_once(settings, celery, client, full=full, recover_running=leases.trusted)
                if not report.skipped:  # this pass read the database
                    leases.database_answered()
                    RECORD.succeeded(Dependency.DATABASE)
                if broker_down_since is not None:
                    log.info("reconciler: Redis reachable again after %.1f s", time.monotonic() - broker_down_since)
                    broker_down_since = None
                if report.requeued or report.recovered or report.failed:
                    log.warning("reconciler: %s", report)
                if not full:
                    continue
                last_full = time.monotonic()
                if settings.retention_days is not None:
                    sweep_retention(settings.resolved_database_url, blobs, settings.retention_days)
                orphans.run_if_due()
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # waited out: nothing can be enqueued now
                if broker_down_since is None:
                    broker_down_since = time.monotonic()
                    log.warning("reconciler: Redis unreachable (%s); waiting for it", exc)
            except Exception as exc:  # the loop must survive a database outage
                outage = outage_of(exc)
                if outage is not None and outage.dependency == Dependency.DATABASE:
                    leases.database_down()
                    RECORD.failed(outage)  # one line per outage and process, not a traceback per pass
                else:
                    log.exception("reconciler pass failed; will try again")

    thread = threading.Thread(target=loop, name="modtag-reconciler", daemon=True)
    thread.start()
    return thread

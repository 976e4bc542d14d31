"""A job's life on the worker's side: claim, store the decision, fail, hand back for a retry or give up.

Attempts are counted in one place, the job row: a claim adds one (core/jobs.py), and every retry
decision (here, and the reconciler's for a worker that died) reads that count against
`max_attempts`. A delivery that cannot claim the job (the database is down) is not an attempt: it is
retried with the longest backoff until the database answers. Metrics of final states are counted here too.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from core import jobs, metrics
from core.db import session_scope
from core.errors import ModtagError, TransientError
from core.logs import add_log_fields
from core.settings import Settings
from core.tables import FINAL_STATUSES, Decision, Job, ShadowDecision, as_utc, utcnow

log = logging.getLogger(__name__)
MAX_RETRY_DELAY_S = 60


@dataclass
class JobResult:
    """What happened to one delivery of a job (for logs and tests)."""

    job_id: str
    outcome: str  # done, failed, duplicate, busy, missing
    code: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class RetryLater(TransientError):
    """The job went back to `queued` after a transient failure; deliver it again after `delay_s` seconds."""

    def __init__(self, message: str, *, code: str, delay_s: float) -> None:
        super().__init__(message, code=code)
        self.delay_s = delay_s


class Unclaimed(Exception):
    """This delivery does not run the job (already final, held by another worker, or gone)."""

    def __init__(self, result: JobResult) -> None:
        super().__init__(result.outcome)
        self.result = result


class JobLifecycle:
    """The database side of running jobs for one worker (`worker` names it in the job row)."""

    def __init__(self, settings: Settings, worker: str) -> None:
        self.settings = settings
        self.worker = worker
        self._url = settings.resolved_database_url
        self._held: set[str] = set()  # the jobs this worker runs now, whose leases it renews
        self._held_lock = threading.Lock()

    @property
    def held(self) -> list[str]:
        """The ids of the jobs this worker has claimed and not yet finished or handed back."""
        with self._held_lock:
            return sorted(self._held)

    def release(self, job_id: str) -> None:
        """This worker is done with the job (decided, failed or handed back): its lease is no longer renewed."""
        with self._held_lock:
            self._held.discard(job_id)

    def renew(self) -> int:
        """Renew the leases of the jobs this worker runs; how many it still held (a lapsed one may have moved on)."""
        held = self.held
        if not held:
            return 0
        with session_scope(self._url) as session:
            return jobs.renew_leases(session, held, self.worker)

    def start_renewing(self, stop: threading.Event) -> threading.Thread:
        """Renew every `lease_renew_s` (a quarter lease by default) in a daemon thread until `stop` is set: a job's
        lease lapses only when its worker is gone (killed, frozen, partitioned), however long the job itself runs."""

        def loop() -> None:
            while not stop.wait(self.settings.resolved_lease_renew_s):
                try:
                    self.renew()
                except Exception:  # a database outage must not end the renewals; the next round tries again
                    log.exception("could not renew the leases of %d running job(s)", len(self.held))

        thread = threading.Thread(target=loop, name="modtag-leases", daemon=True)
        thread.start()
        return thread

    def hand_back(self) -> list[str]:
        """Put every job this worker runs back to `queued` (a drain that ran out of time); their ids.

        The attempt stays counted: a job that outlasts every drain still ends after `max_attempts`."""
        returned = self.held
        for job_id in returned:
            with session_scope(self._url) as session:
                jobs.requeue_job(session, job_id)
            self.release(job_id)
        return returned

    def claim(self, job_id: str) -> Job:
        """Mark the job running for this worker (one more attempt); Unclaimed when this delivery must not run it.

        Raises RetryLater when the database cannot be reached: no attempt was counted.
        """
        try:
            with session_scope(self._url) as session:
                job = jobs.claim_job(session, job_id, self.worker, self.settings.running_lease_s)
                if job is not None:
                    add_log_fields(tenant=job.tenant, request_id=job.request_id)
                    with self._held_lock:
                        self._held.add(job.id)
                    return job
                raise Unclaimed(self._unclaimed(session, job_id))
        except (OperationalError, DBAPIError) as exc:
            message = f"database unavailable: {exc.__class__.__name__}"
            raise RetryLater(message, code="database_unavailable", delay_s=MAX_RETRY_DELAY_S) from exc

    def store(self, job: Job, decision: Decision, shadows: list[ShadowDecision]) -> bool:
        """Write the decision and the job's `done` state in one transaction; False when another delivery already had."""
        with session_scope(self._url) as session:
            stored = jobs.store_decision(session, job, decision, shadows)
        if stored.id != decision.id:
            return False
        metrics.JOBS_COMPLETED.labels(job.policy, "done").inc()
        metrics.DECISIONS.labels(stored.policy, stored.action).inc()
        for name, result in stored.categories.items():
            metrics.CATEGORY_DECISIONS.labels(stored.policy, name, result["action"]).inc()
        metrics.JOB_DURATION.labels(job.policy).observe((utcnow() - as_utc(job.created_at)).total_seconds())
        return True

    def fail(self, job: Job, code: str, message: str) -> JobResult:
        """The final `failed` state with a stable code and a sentence (never over a stored decision)."""
        with session_scope(self._url) as session:
            jobs.fail_job(session, job.id, code, message)
        metrics.JOBS_FAILED.labels(job.policy, code).inc()
        metrics.JOBS_COMPLETED.labels(job.policy, "failed").inc()
        log.info("job %s failed: %s (%s)", job.id, message, code)
        return JobResult(job.id, "failed", code=code)

    def retry(self, job: Job, error: ModtagError) -> JobResult:
        """After a transient failure: fail the job when its attempts are spent, else queue it again (RetryLater)."""
        if job.attempts >= self.settings.max_attempts:
            return self.fail(job, error.code, _gave_up(job, error.message))
        try:
            with session_scope(self._url) as session:
                jobs.requeue_job(session, job.id)
        except (OperationalError, DBAPIError):
            log.warning("could not hand job %s back to the queue; the reconciler will", job.id)
        raise RetryLater(error.message, code=error.code, delay_s=min(MAX_RETRY_DELAY_S, 2**job.attempts))

    def give_up(self, job_id: str, code: str, message: str) -> Job | None:
        """Fail a job from outside its run (the task's time limit), naming the attempts it had; the job, if any."""
        with session_scope(self._url) as session:
            job = jobs.get_job(session, job_id)
        if job is not None:
            self.fail(job, code, _gave_up(job, message))
        return job

    def _unclaimed(self, session: Any, job_id: str) -> JobResult:
        job = jobs.get_job(session, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping its message", job_id)
            return JobResult(job_id, "missing")
        if job.status in FINAL_STATUSES:
            return JobResult(job_id, "duplicate")
        # Another worker holds a live lease; if it died, the reconciler hands the job back later.
        return JobResult(job_id, "busy")


def _gave_up(job: Job, message: str) -> str:
    return f"gave up after {job.attempts} attempt{'' if job.attempts == 1 else 's'}: {message}"

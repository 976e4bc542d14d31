"""A job's life on the worker's side: claim, store the decision, fail, hand back for a retry or give up.

Attempts are counted in one place, the job row: a claim adds one (core/jobs.py), and every retry
decision (here, and the reconciler's for a worker that died) reads that count against
`max_attempts`. An unreachable dependency (database, blob store, broker) is never an attempt: the job
goes back to `queued` with the claim's count undone in the same conditional update, and is delivered
again after a capped exponential wait with jitter (`dependency_retry_max_s`), for as long as the outage
lasts. When the database itself cannot take that update, the undo is owed: the lease renewer (polling
every second while the database is down) or this worker's next claim of the job pays it once the
database answers. Metrics of final states are counted here too.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col

from core import jobs, metrics
from core.db import session_scope
from core.dependencies import RECORD, Dependency, DependencyRecord, outage_delay
from core.errors import DependencyUnavailable, ModtagError, TransientError
from core.finality import FinalNotices
from core.logs import add_log_fields
from core.queues import Priority
from core.settings import Settings
from core.tables import FINAL_STATUSES, Decision, Job, JobStatus, ShadowDecision, as_utc, utcnow

log = logging.getLogger(__name__)
MAX_RETRY_DELAY_S = 60  # the longest backoff between two attempts after the job's own transient errors
# While the database is down, the renewer tries this often: leases are renewed (and owed undos paid) within a
# second of its return, before the reconciler, which waits a whole lease, could take a live worker's jobs.
OUTAGE_POLL_S = 1.0
_TRACKED_JOBS = 10_000  # outage waits remembered per job; a job redelivered elsewhere leaves its entry behind


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

    def __init__(
        self,
        settings: Settings,
        worker: str,
        *,
        dependencies: DependencyRecord = RECORD,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.dependencies = dependencies
        self._rand = rand
        self._url = settings.resolved_database_url
        self._held: dict[str, Priority] = {}  # the jobs this worker runs now (leases renewed), with their queue
        self._held_lock = threading.Lock()
        self._waits: dict[str, int] = {}  # job id -> outage waits so far, for the backoff
        self._owed: dict[str, int] = {}  # job id -> the claim's attempt count to undo when the database answers
        self.notices = FinalNotices(settings.redis_url)  # wakes the API's moderate-now calls (`Prefer: wait`)

    @property
    def held(self) -> list[str]:
        """The ids of the jobs this worker has claimed and not yet finished or handed back."""
        with self._held_lock:
            return sorted(self._held)

    def release(self, job_id: str) -> None:
        """This worker is done with the job (decided, failed or handed back): its lease is no longer renewed."""
        with self._held_lock:
            self._held.pop(job_id, None)

    def renew(self) -> int:
        """Renew the leases of the jobs this worker runs; how many it still held (a lapsed one may have moved on)."""
        held = self.held
        if not held:
            return 0
        with self._database() as session:
            return jobs.renew_leases(session, held, self.worker)

    def settle(self) -> int:
        """Hand back the jobs an outage hid from the database, their claims uncounted; how many were still ours."""
        with self._held_lock:
            owed = dict(self._owed)
        settled = 0
        for job_id, attempts in owed.items():
            with self._database() as session:
                settled += _requeue_uncounted(session, job_id, self.worker, attempts)
            with self._held_lock:
                self._owed.pop(job_id, None)  # done, or the job moved on (decided, taken over): nothing owed
        return settled

    def start_renewing(self, stop: threading.Event) -> threading.Thread:
        """Renew every `lease_renew_s` (a quarter lease by default) in a daemon thread until `stop` is set: a job's
        lease lapses only when its worker is gone (killed, frozen, partitioned), however long the job itself runs."""

        def loop() -> None:
            interval = self.settings.resolved_lease_renew_s
            while not stop.wait(interval):
                try:
                    self.renew()
                    self.settle()
                    interval = self.settings.resolved_lease_renew_s
                except DependencyUnavailable:  # logged once by the record; try again soon, to renew in time
                    interval = min(self.settings.resolved_lease_renew_s, OUTAGE_POLL_S)
                except Exception:  # a bug must not end the renewals either; the next round tries again
                    log.exception("could not renew the leases of %d running job(s)", len(self.held))

        thread = threading.Thread(target=loop, name="modtag-leases", daemon=True)
        thread.start()
        return thread

    def hand_back(self) -> dict[str, Priority]:
        """Put every job this worker runs back to `queued` (a drain that ran out of time); their ids, each with the
        priority whose queue it goes back to.

        The attempt stays counted: a job that outlasts every drain still ends after `max_attempts`."""
        with self._held_lock:
            returned = dict(sorted(self._held.items()))
        for job_id in returned:
            with session_scope(self._url) as session:
                jobs.requeue_job(session, job_id)
            self.release(job_id)
        return returned

    def claim(self, job_id: str) -> Job:
        """Mark the job running for this worker (one more attempt); Unclaimed when this delivery must not run it.

        Raises RetryLater when the database cannot be reached: no attempt was counted.
        """
        with self._held_lock:
            owed = self._owed.pop(job_id, None)
        try:
            with self._database() as session:
                if owed is not None:  # an outage hid an earlier delivery's hand-back from the database: undo it first
                    _requeue_uncounted(session, job_id, self.worker, owed)
                job = jobs.claim_job(session, job_id, self.worker, self.settings.running_lease_s)
                if job is not None:
                    add_log_fields(tenant=job.tenant, request_id=job.request_id)
                    with self._held_lock:
                        self._held[job.id] = Priority.of(job.priority)
                    return job
                raise Unclaimed(self._unclaimed(session, job_id))
        except DependencyUnavailable as outage:
            if owed is not None:
                with self._held_lock:
                    self._owed.setdefault(job_id, owed)
            raise self._outage_wait(job_id, outage) from outage

    def store(self, job: Job, decision: Decision, shadows: list[ShadowDecision], *, audit_rate: float = 0.0) -> bool:
        """Write the decision and the job's `done` state in one transaction; False when another delivery already had,
        or when the job was erased meanwhile (it is then `failed` with code `erased`, and nothing of it stored).
        `audit_rate` is the policy's: that share of automatic decisions also goes to the review queue as audits."""
        with self._database() as session:
            stored = jobs.store_decision(session, job, decision, shadows, audit_rate=audit_rate)
        self._waits.pop(job.id, None)
        self.notices.job_final(job.id, job.listing_id)
        if stored is None:  # erased while it ran: stored nothing, failed `erased` in the same transaction
            metrics.JOBS_FAILED.labels(job.policy, jobs.ERASED).inc()
            metrics.JOBS_COMPLETED.labels(job.policy, "failed").inc()
            log.info("job %s was erased while it ran; its decision was not stored", job.id)
            return False
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
        with self._database() as session:
            jobs.fail_job(session, job.id, code, message)
        self._waits.pop(job.id, None)
        self.notices.job_final(job.id, job.listing_id)
        metrics.JOBS_FAILED.labels(job.policy, code).inc()
        metrics.JOBS_COMPLETED.labels(job.policy, "failed").inc()
        log.info("job %s failed: %s (%s)", job.id, message, code)
        return JobResult(job.id, "failed", code=code)

    def retry(self, job: Job, error: ModtagError) -> JobResult:
        """After a transient failure: fail the job when its attempts are spent, else queue it again (RetryLater).

        An unreachable dependency spends no attempt: the job is queued again with its claim uncounted, and
        waits longer each time (capped, jittered) while the outage lasts.
        """
        if isinstance(error, DependencyUnavailable):
            self.dependencies.failed(error)
            self._hand_back_uncounted(job)
            raise self._outage_wait(job.id, error) from error
        if job.attempts >= self.settings.max_attempts:
            return self.fail(job, error.code, _gave_up(job, error.message))
        try:
            with self._database() as session:
                jobs.requeue_job(session, job.id)
        except DependencyUnavailable:
            log.warning("could not hand job %s back to the queue; the reconciler will", job.id)
        raise RetryLater(error.message, code=error.code, delay_s=min(MAX_RETRY_DELAY_S, 2**job.attempts))

    def give_up(self, job_id: str, code: str, message: str) -> Job | None:
        """Fail a job from outside its run (the task's time limit), naming the attempts it had; the job, if any."""
        with self._database() as session:
            job = jobs.get_job(session, job_id)
        if job is not None:
            self.fail(job, code, _gave_up(job, message))
        return job

    @contextmanager
    def _database(self) -> Iterator[Session]:
        """A session whose outcome is reported to the dependency record; an outage raises DependencyUnavailable."""
        with self.dependencies.watch(Dependency.DATABASE), session_scope(self._url) as session:
            yield session

    def _hand_back_uncounted(self, job: Job) -> None:
        try:
            with self._database() as session:
                _requeue_uncounted(session, job.id, self.worker, job.attempts)
        except DependencyUnavailable:
            # Nothing is lost: the job stays `running` under its lease. The undo waits for the database.
            with self._held_lock:
                self._owed[job.id] = job.attempts

    def _outage_wait(self, job_id: str, outage: DependencyUnavailable) -> RetryLater:
        """The job's next delivery, one outage wait later than its last (this process counts the waits)."""
        with self._held_lock:
            waits = self._waits.pop(job_id, 0) + 1
            self._waits[job_id] = waits
            while len(self._waits) > _TRACKED_JOBS:
                self._waits.pop(next(iter(self._waits)))
        delay = outage_delay(waits, self.settings.dependency_retry_max_s, self._rand)
        return RetryLater(outage.message, code=outage.code, delay_s=delay)

    def _unclaimed(self, session: Any, job_id: str) -> JobResult:
        job = jobs.get_job(session, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping its message", job_id)
            return JobResult(job_id, "missing")
        if job.status in FINAL_STATUSES:
            return JobResult(job_id, "duplicate")
        # Another worker holds a live lease; if it died, the reconciler hands the job back later.
        return JobResult(job_id, "busy")


def _requeue_uncounted(session: Session, job_id: str, worker: str, attempts: int) -> int:
    """Back to `queued` with the claim's attempt undone, in one conditional update: only while this worker's claim
    (the `attempts`-th) still holds the job, so a job another worker took over or a final job stays as it is."""
    result = session.execute(
        update(Job)
        .where(
            col(Job.id) == job_id,
            col(Job.status) == JobStatus.RUNNING,
            col(Job.worker) == worker,
            col(Job.attempts) == attempts,
        )
        .values(status=JobStatus.QUEUED, attempts=attempts - 1, updated_at=utcnow())
    )
    session.commit()
    return int(getattr(result, "rowcount", 0))


def _gave_up(job: Job, message: str) -> str:
    return f"gave up after {job.attempts} attempt{'' if job.attempts == 1 else 's'}: {message}"

"""Erasure and retention: a job's (or a listing's) image and content removed on request or after
MODTAG_RETENTION_DAYS; and the sweep of orphan blobs, images no job row ever came to use.

What goes: the image (its blob, unless another job still uses the same bytes: blobs are content addressed and
shared), the image URL, the context, the callback URL, the request id, the caption, the lines read (text), the
evidence, tags, contradictions and reasons (they quote the caption and the context), the shadow decisions' evidence
and reasons, a failed job's message (it may quote the URL with its token), the reviewers' notes (on the queue item
and in the audit entries that quote them), and the bodies of the job's webhook deliveries (pending ones are dropped).
The job's hashes go too, unless a bank of the tenant holds them (an item made from this job, or one with the same
SHA-256 or PDQ hash): then they stay, and the erasure says so (`kept`). The image's embedding goes, and so does the
job's membership of every example set (the sets' revisions move, so workers stop voting with it). What stays, as a
tombstone for statistics:
the job row with `erased_at`, its error code, the decision's action and its category scores and actions. Every
erasure is audit-logged in the same transaction.

Nothing is written back after the erasure: the erasure takes the job row first (a conditional UPDATE, which holds
the row on PostgreSQL and the database on SQLite until the commit), and so does everything that writes a job's
content (the decision's store, its hashes, its failure, its webhook delivery: core/jobs.py, core/webhooks.py). Each
either committed before, and is erased here, or comes after and finds the job erased.

A listing's erasure erases its photos' jobs by the same rules, and its title, description, attributes and callback
URL, in one transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice

from sqlalchemy import func, or_, update
from sqlmodel import Session, col, select

from core import audit, embeddings, metrics, review, webhooks
from core.blobs import BlobStore
from core.db import session_scope
from core.errors import Forbidden
from core.jobs import ERASED_MESSAGE
from core.listings import erase_listing_text, lock_listing
from core.principals import Principal, system_principal
from core.settings import Settings
from core.tables import (
    FINAL_STATUSES,
    Bank,
    BankItem,
    Decision,
    Job,
    Listing,
    Role,
    ShadowDecision,
    utcnow,
)

log = logging.getLogger(__name__)
SWEEP_BATCH = 500  # jobs per transaction of a retention sweep; blob keys per database query of an orphan sweep
_CATEGORY_KEPT = ("score", "action", "fired", "decided_by")


@dataclass(frozen=True)
class Erasure:
    """What one erasure did: whether it erased anything (False: already erased), whether the image's blob went
    (True only when no other job uses the same bytes), and what was kept and why."""

    erased: bool
    blob_deleted: bool
    kept: dict[str, str] = field(default_factory=dict)


def erase_job(session: Session, blobs: BlobStore, job: Job, actor: Principal, *, why: str = "request") -> Erasure:
    """Erase one job's image and content (idempotent; a second erasure says what is still kept).

    A submit key may erase only the jobs it submitted. A job still queued or running is erased too: its worker then
    stores nothing and ends it `failed` with code `erased` (core/jobs.py store_decision).
    """
    if actor.role == Role.SUBMIT and job.submitted_by != actor.key_id:
        raise Forbidden("a submit key may erase only the jobs it submitted", code="forbidden")
    if job.listing_id:
        lock_listing(session, job.listing_id)  # the listing's callback body may quote this photo: take turns with it
    erased = _erase_rows(session, job, actor, why)
    session.commit()
    return _finish(session, blobs, [erased], why)[0]


def erase_listing(session: Session, blobs: BlobStore, listing: Listing, actor: Principal) -> dict[str, Erasure]:
    """Erase a listing (its title, description, attributes and callback URL) and each photo's job, in one
    transaction; what each photo's erasure did, by job id. Permission as for a job: a submit key only its own."""
    if actor.role == Role.SUBMIT and listing.submitted_by != actor.key_id:
        raise Forbidden("a submit key may erase only the listings it submitted", code="forbidden")
    lock_listing(session, listing.id)
    photos = session.exec(select(Job).where(Job.listing_id == listing.id).order_by(col(Job.listing_index))).all()
    had_text = erase_listing_text(session, listing)
    done = [_erase_rows(session, job, actor, "request") for job in photos]
    webhooks.erase_deliveries(session, [listing.id])
    if had_text or any(erased.erasure.erased for erased in done):
        audit.record(
            session,
            actor,
            "listing.erase",
            "listing",
            listing.id,
            before={"photos": len(photos), "text": had_text},
            after={"erased_at": utcnow().isoformat(), "jobs": [job.id for job in photos]},
            tenant=listing.tenant,
        )
    session.commit()
    erasures = _finish(session, blobs, done, "request")
    return {job.id: erasure for job, erasure in zip(photos, erasures, strict=True)}


def sweep_retention(url: str, blobs: BlobStore, retention_days: int, now: datetime | None = None) -> int:
    """Erase every finished job created more than `retention_days` before `now`; how many were erased."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    erased = 0
    while True:
        with session_scope(url) as session:
            batch = session.exec(
                select(Job)
                .where(
                    col(Job.erased_at).is_(None),
                    col(Job.created_at) < cutoff,
                    col(Job.status).in_([str(status) for status in FINAL_STATUSES]),
                )
                .limit(SWEEP_BATCH)
            ).all()
            for job in batch:
                erase_job(session, blobs, job, system_principal(job.tenant), why="retention")
        erased += len(batch)
        if len(batch) < SWEEP_BATCH:
            break
    if erased:
        log.info("retention: erased %d job(s) created before %s", erased, cutoff.isoformat())
    return erased


def sweep_orphan_blobs(url: str, blobs: BlobStore, grace_s: float, now: datetime | None = None) -> int:
    """Delete the blobs older than `grace_s` that no job row references; how many were deleted.

    An orphan is an upload whose job row never committed (the API died between storing the image and its commit).
    Job rows are the only users of blobs: bank items hold hashes, never images. The grace period covers an upload
    in flight: it stores its blob, then commits its row within the request (bounded by the request's time limits,
    seconds), so a blob younger than the grace may still be about to be used. A blob stored again (the same bytes
    uploaded anew) counts from then: the directory store refreshes the file's time and S3 rewrites the object, and
    the age is read again just before the delete. What remains is the instant between that read and the delete:
    an upload of the same bytes landing in it finds its blob gone and fails `blob_missing` (it can be resubmitted),
    as with an erasure (`erase_job`).
    """
    cutoff = (now or utcnow()) - timedelta(seconds=grace_s)
    deleted = 0
    keys = blobs.keys_older_than(cutoff)
    while batch := list(islice(keys, SWEEP_BATCH)):
        with session_scope(url) as session:
            used = set(session.exec(select(Job.blob_key).where(col(Job.blob_key).in_(batch))).all())
        for key in batch:
            if key in used:
                continue
            modified = blobs.modified_at(key)
            if modified is None or modified >= cutoff:
                continue
            blobs.delete(key)
            deleted += 1
    if deleted:
        metrics.ORPHAN_BLOBS_DELETED.inc(deleted)
        log.info("orphan sweep: deleted %d blob(s) stored before %s that no job uses", deleted, cutoff.isoformat())
    return deleted


class OrphanSweep:
    """`sweep_orphan_blobs` at most every `orphan_sweep_interval_s`, for the reconciler's loop (the first pass at
    once); a failed pass is tried again at the next interval."""

    def __init__(self, settings: Settings, blobs: BlobStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.blobs, self.clock = settings, blobs, clock
        self._due = clock()

    def run_if_due(self) -> int:
        """Sweep when the interval has passed since the last pass; how many blobs were deleted."""
        if self.clock() < self._due:
            return 0
        self._due = self.clock() + self.settings.orphan_sweep_interval_s
        return sweep_orphan_blobs(self.settings.resolved_database_url, self.blobs, self.settings.orphan_blob_grace_s)


@dataclass(frozen=True)
class _Erased:
    """A job's rows erased, not yet committed: the blob it used is deleted after the commit (`_finish`)."""

    erasure: Erasure
    blob_key: str | None = None
    filmstrip_key: str | None = None  # a video's filmstrip (a blob of its own), deleted with the video


def _erase_rows(session: Session, job: Job, actor: Principal, why: str) -> _Erased:
    """Erase the job's rows (the caller commits)."""
    now = utcnow()
    # First the job row, on condition: it holds the row against a decision stored meanwhile (core/jobs.py), and of
    # two erasures at once only one goes on.
    taken = session.execute(
        update(Job).where(col(Job.id) == job.id, col(Job.erased_at).is_(None)).values(erased_at=now)
    )
    session.refresh(job)  # as of now: a decision stored just before is erased below
    kept = _kept(session, job)
    if getattr(taken, "rowcount", 0) != 1:
        return _Erased(Erasure(erased=False, blob_deleted=False, kept=kept))
    before = {"status": job.status, "blob": bool(job.blob_key), "context": job.context is not None}
    key = job.blob_key
    job.blob_key, job.image_url, job.context, job.callback_url, job.request_id = None, None, None, None, None
    if job.error_message is not None:
        job.error_message = ERASED_MESSAGE
    if "hashes" not in kept:
        job.image_sha256, job.pdq, job.pdq_quality = None, None, None
    session.add(job)
    decision = session.exec(select(Decision).where(Decision.job_id == job.id)).first()
    filmstrip = None
    if decision is not None:
        decision.caption, decision.text, decision.reason, decision.contradictions = None, None, None, None
        # A video's frames keep their times, actions and scores (statistics, as categories do), not their hashes.
        if decision.frames is not None:
            decision.frames = [{k: v for k, v in frame.items() if k != "pdq"} for frame in decision.frames]
        filmstrip, decision.filmstrip_key = decision.filmstrip_key, None
        decision.evidence, decision.tags = [], []
        decision.categories = _categories_kept(decision.categories)
        session.add(decision)
    for shadow in session.exec(select(ShadowDecision).where(ShadowDecision.job_id == job.id)).all():
        shadow.evidence, shadow.tags, shadow.reason, shadow.error_message = [], [], None, None
        shadow.categories = _categories_kept(shadow.categories)
        session.add(shadow)
    review.erase_notes(session, job.id)
    examples_left = embeddings.erase(session, job.id)
    dropped = webhooks.erase_deliveries(session, [job.id, *([job.listing_id] if job.listing_id else [])])
    audit.record(
        session,
        actor,
        "job.erase",
        "job",
        job.id,
        before=before,
        after={
            "erased_at": now.isoformat(),
            "why": why,
            "kept": kept,
            "webhooks_dropped": dropped,
            "examples_left": examples_left,
        },
        tenant=job.tenant,
    )
    return _Erased(Erasure(erased=True, blob_deleted=False, kept=kept), key, filmstrip)


def _finish(session: Session, blobs: BlobStore, done: list[_Erased], why: str) -> list[Erasure]:
    """After the commit: count the erasures and delete each erased image's blob that no job uses any more.

    A job stored meanwhile with the same bytes counts. One submitted in the instant between this check and the
    delete would find its blob gone and fail with `blob_missing` (it can be resubmitted).
    """
    finished: list[Erasure] = []
    for erased in done:
        erasure, key = erased.erasure, erased.blob_key
        if not erasure.erased:
            finished.append(erasure)
            continue
        metrics.ERASURES.labels(why).inc()
        deleted = key is not None and not _blob_in_use(session, key)
        if deleted and key is not None:
            blobs.delete(key)
        strip = erased.filmstrip_key
        if strip is not None and not session.exec(select(Decision.id).where(Decision.filmstrip_key == strip)).first():
            blobs.delete(strip)
        finished.append(Erasure(erased=True, blob_deleted=deleted, kept=erasure.kept))
    return finished


def _kept(session: Session, job: Job) -> dict[str, str]:
    """What of the job is kept, and why: its hashes, while a bank of its tenant holds them."""
    matches = []
    if job.image_sha256:
        matches.append(col(BankItem.sha256) == job.image_sha256)
    if job.pdq:
        matches.append(col(BankItem.pdq) == job.pdq)
    if not matches:
        return {}
    banks = session.exec(
        select(Bank.name)
        .join(BankItem, col(BankItem.bank_id) == col(Bank.id))
        .where(Bank.tenant == job.tenant, or_(*matches))
        .distinct()
        .order_by(col(Bank.name))
    ).all()
    return {"hashes": f"in bank {', '.join(banks)}"} if banks else {}


def _categories_kept(categories: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    return {name: {key: result.get(key) for key in _CATEGORY_KEPT} for name, result in categories.items()}


def _blob_in_use(session: Session, key: str) -> bool:
    return bool(session.exec(select(func.count()).select_from(Job).where(Job.blob_key == key)).one())

"""Erasure that erases (issue 20): nothing of an erased job is written or sent afterwards, webhook bodies, error
messages, shadow decisions, reviewer notes and unbanked hashes go, a listing can be erased; and the orphan sweep
deletes only the blobs no job uses. Real SQLite and PostgreSQL, real HTTP, real Redis, moto's S3 server.

The race of an erasure with a running job is made deterministic by calling the worker's lifecycle itself
(claim, then the erasure, then the store) against the real database, rather than racing a real worker.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlmodel import select

from core import jobs, review, webhooks
from core.banks import NewBankItem, add_items, create_bank
from core.blobs import BlobStore, LocalBlobStore, S3BlobStore
from core.broker import make_celery
from core.db import session_scope
from core.erasure import erase_job, sweep_orphan_blobs
from core.events import EventType
from core.principals import Principal, system_principal
from core.reconcile import start_reconciler
from core.settings import Settings
from core.tables import (
    AuditEntry,
    Decision,
    Job,
    JobStatus,
    Listing,
    ReviewItem,
    Role,
    ShadowDecision,
    WebhookDelivery,
    utcnow,
)
from modtag.client import ApiClient
from tests.support.api import Api, admin_key, assert_error
from tests.support.receiver import WebhookReceiver
from tests.support.s3 import S3Bucket
from tests.support.waiting import wait_for
from worker.callbacks import send_callbacks
from worker.lifecycle import JobLifecycle

pytestmark = pytest.mark.timeout(120)

SECRET_URL = "https://images.example.com/p/42.jpg?token=s3cr3t-token"
CONTEXT = {"title": "red bicycle, call 555-0100"}
CAPTION = "a red bicycle leaning on a wall"
SHA, PDQ = "ab" * 32, "cd" * 32


def settings_for(database_url: str, tmp_path: Path, **fields: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, fetch_allow_private=True, **fields)


def new_job(database_url: str, *, callback_url: str | None = None, tenant: str = "default") -> str:
    with session_scope(database_url) as session:
        job, _ = jobs.create_job(
            session,
            jobs.NewJob(
                tenant=tenant,
                policy="moderation",
                policy_version="v1",
                source="url",
                image_url=SECRET_URL,
                context=CONTEXT,
                callback_url=callback_url,
                request_id="req-123",
            ),
        )
    return job.id


def decision_for(job_id: str, action: str = "review") -> Decision:
    categories = {"weapons": {"score": 0.7, "action": action, "fired": True, "decided_by": "probe", "reason": "x"}}
    return Decision(
        job_id=job_id,
        action=action,
        policy="moderation",
        policy_version="v1",
        caption=CAPTION,
        categories=categories,
        evidence=[{"category": "weapons", "kind": "probe", "text": CAPTION, "score": 0.7}],
        tags=[{"tag": "bicycle", "score": 0.9}],
        reason=f"weapons: the caption says {CAPTION}",
        models={"blip": "tiny"},
    )


def shadow_for() -> ShadowDecision:
    return ShadowDecision(
        job_id="",
        policy="moderation-next",
        policy_version="s1",
        active_policy="moderation",
        active_version="v1",
        active_action="review",
        action="block",
        categories={"weapons": {"score": 0.7, "action": "block", "fired": True, "decided_by": "probe", "reason": "x"}},
        evidence=[{"category": "weapons", "text": CAPTION}],
        reason=f"the caption says {CAPTION}",
    )


def erase(database_url: str, job_id: str, tmp_path: Path) -> Any:
    with session_scope(database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        return erase_job(session, LocalBlobStore(tmp_path / "blobs"), job, system_principal(job.tenant))


def row(database_url: str, table: Any, **where: Any) -> list[Any]:
    with session_scope(database_url) as session:
        query = select(table)
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        return list(session.exec(query).all())


def no_trace_of_content(job: Job) -> None:
    """The job row carries nothing of the image's content or of the request."""
    assert job.erased_at is not None
    assert (job.image_url, job.context, job.callback_url, job.request_id, job.blob_key) == (None,) * 5
    assert "s3cr3t" not in (job.error_message or "")


# --- the race with a running job -------------------------------------------------------------------------------


def test_a_job_erased_while_running_stores_nothing_and_sends_nothing(
    database_url: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    """Old code: the decision, caption, evidence, shadow, review item and webhook were all written after the erasure."""
    settings = settings_for(database_url, tmp_path)
    lifecycle = JobLifecycle(settings, "worker-a")
    job_id = new_job(database_url, callback_url=webhook_receiver.url + "?token=hook-secret")
    job = lifecycle.claim(job_id)  # the worker holds it; the erasure comes before its store
    assert erase(database_url, job_id, tmp_path).erased

    with session_scope(database_url) as session:
        jobs.record_hashes(session, job, SHA, PDQ, 90)  # the worker's hashes, read after the erasure
    assert lifecycle.store(job, decision_for(job_id), [shadow_for()]) is False
    send_callbacks(settings, job)  # what the worker does after a final state; `job` still holds the callback URL

    (stored,) = row(database_url, Job, id=job_id)
    no_trace_of_content(stored)
    assert (stored.status, stored.error_code) == (JobStatus.FAILED, jobs.ERASED)
    assert (stored.image_sha256, stored.pdq) == (None, None)
    assert row(database_url, Decision, job_id=job_id) == []
    assert row(database_url, ShadowDecision, job_id=job_id) == []
    assert row(database_url, ReviewItem, job_id=job_id) == []
    assert webhook_receiver.attempts == []
    deliveries = row(database_url, WebhookDelivery, subject_id=job_id)
    assert all(d.status == webhooks.DROPPED and d.payload == "" and "token" not in d.url for d in deliveries)
    # A redelivered copy finds a final job: still no decision.
    assert lifecycle.store(job, decision_for(job_id), []) is False
    assert row(database_url, Decision, job_id=job_id) == []


def test_a_decision_stored_before_the_erasure_is_erased_with_its_shadows_and_notes(
    database_url: str, tmp_path: Path
) -> None:
    """Old code: shadow evidence and reasons, the reviewer's notes (item and audit), the callback URL and the
    request id stayed."""
    job_id = new_job(database_url, callback_url="https://hooks.example.com/modtag?token=hook-secret")
    with session_scope(database_url) as session:
        claimed = jobs.claim_job(session, job_id, "worker-a", 60)
        assert claimed is not None
        assert jobs.store_decision(session, claimed, decision_for(job_id), [shadow_for()]) is not None
        reviewer = Principal(name="rev", role=Role.REVIEW, tenant="default", key_id="k-rev")
        review.resolve(session, job_id, reviewer, "block", f"seller's phone 555-0100 in {CAPTION}")
    assert erase(database_url, job_id, tmp_path).erased

    (stored,) = row(database_url, Job, id=job_id)
    no_trace_of_content(stored)
    assert stored.status == JobStatus.DONE
    (decision,) = row(database_url, Decision, job_id=job_id)
    assert (decision.caption, decision.reason, decision.evidence, decision.tags) == (None, None, [], [])
    assert decision.categories["weapons"] == {"score": 0.7, "action": "review", "fired": True, "decided_by": "probe"}
    (shadow,) = row(database_url, ShadowDecision, job_id=job_id)
    assert (shadow.evidence, shadow.tags, shadow.reason, shadow.action) == ([], [], None, "block")
    assert "reason" not in shadow.categories["weapons"]
    (item,) = row(database_url, ReviewItem, job_id=job_id)
    assert (item.reason, item.resolution, item.resolved_by) == (None, "block", "k-rev")
    entries = row(database_url, AuditEntry, target_id=job_id)
    assert {entry.action for entry in entries} >= {"review.enqueued", "review.resolved", "job.erase"}
    assert "555-0100" not in json.dumps([[entry.before, entry.after] for entry in entries])


# --- webhooks ----------------------------------------------------------------------------------------------------


def test_erasure_empties_stored_webhook_bodies_and_drops_pending_ones(database_url: str, tmp_path: Path) -> None:
    """Old code: the pending body kept the context, caption and evidence, and stayed due for retries."""
    pending_job = new_job(database_url, callback_url="https://hooks.example.com/a?token=hook-secret")
    sent_job = new_job(database_url, callback_url="https://hooks.example.com/b?token=hook-secret")
    with session_scope(database_url) as session:
        for job_id in (pending_job, sent_job):
            body = json.dumps({"caption": CAPTION, "context": CONTEXT, "image_url": SECRET_URL}).encode()
            webhooks.record_delivery(
                session, tenant="default", event_type=EventType.JOB_DECIDED, subject_id=job_id,
                url=f"https://hooks.example.com/{job_id}?token=hook-secret", payload=body,
            )  # fmt: skip
        delivered = session.exec(select(WebhookDelivery).where(WebhookDelivery.subject_id == sent_job)).one()
        delivered.status = webhooks.DELIVERED
        session.add(delivered)
        session.commit()
        assert len(webhooks.due_deliveries(session)) == 1  # the pending one
    erase(database_url, pending_job, tmp_path)
    erase(database_url, sent_job, tmp_path)

    with session_scope(database_url) as session:
        assert webhooks.due_deliveries(session) == []
    by_subject = {d.subject_id: d for d in row(database_url, WebhookDelivery)}
    assert by_subject[pending_job].status == webhooks.DROPPED
    assert by_subject[sent_job].status == webhooks.DELIVERED  # the audit trail keeps what happened
    for delivery in by_subject.values():
        assert delivery.payload == "" and delivery.url == "https://hooks.example.com"
    (entry,) = [e for e in row(database_url, AuditEntry, target_id=pending_job) if e.action == "job.erase"]
    assert entry.after is not None and entry.after["webhooks_dropped"] == 1


# --- error messages and hashes --------------------------------------------------------------------------------


def test_a_failed_jobs_message_does_not_keep_the_erased_url(database_url: str, tmp_path: Path) -> None:
    """Old code: `error_message` kept the URL with its token, whether the job failed before or after the erasure."""
    failed_first, erased_first = new_job(database_url), new_job(database_url)
    with session_scope(database_url) as session:
        jobs.fail_job(session, failed_first, "fetch_failed", f"could not fetch {SECRET_URL}: HTTP 404")
    erase(database_url, failed_first, tmp_path)
    erase(database_url, erased_first, tmp_path)
    with session_scope(database_url) as session:
        jobs.fail_job(session, erased_first, "fetch_failed", f"could not fetch {SECRET_URL}: HTTP 404")
    for job_id in (failed_first, erased_first):
        (stored,) = row(database_url, Job, id=job_id)
        no_trace_of_content(stored)
        assert (stored.status, stored.error_code, stored.error_message) == (
            JobStatus.FAILED,
            "fetch_failed",
            jobs.ERASED_MESSAGE,
        )


def test_hashes_stay_only_where_a_bank_holds_them_and_the_answer_says_so(database_url: str, tmp_path: Path) -> None:
    """Old code: every erased job kept its SHA-256 and PDQ hash, and the answer said nothing of what was kept."""
    banked, unbanked, other_tenant = new_job(database_url), new_job(database_url), new_job(database_url, tenant="t2")
    with session_scope(database_url) as session:
        for job_id, sha in ((banked, SHA), (unbanked, "ef" * 32), (other_tenant, SHA)):
            job = jobs.get_job(session, job_id)
            assert job is not None
            jobs.record_hashes(session, job, sha, PDQ if job_id == banked else "01" * 32, 90)
        bank = create_bank(session, system_principal("default"), "known_bad", None)
        add_items(session, system_principal("default"), bank, [NewBankItem(pdq=PDQ, note="from a job")])
    assert erase(database_url, banked, tmp_path).kept == {"hashes": "in bank known_bad"}
    assert erase(database_url, unbanked, tmp_path).kept == {}
    assert erase(database_url, other_tenant, tmp_path).kept == {}  # another tenant's bank holds nothing of it
    hashes = {job.id: (job.image_sha256, job.pdq) for job in row(database_url, Job)}
    assert hashes[banked] == (SHA, PDQ)
    assert hashes[unbanked] == hashes[other_tenant] == (None, None)
    again = erase(database_url, banked, tmp_path)  # idempotent, and still says what it keeps
    assert (again.erased, again.kept) == (False, {"hashes": "in bank known_bad"})


# --- through the API: DELETE /v1/jobs/{id} and DELETE /v1/listings/{id} ----------------------------------------


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def post_listing(client: ApiClient, photos: list[bytes], **fields: str) -> Any:
    files = [("images", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    return client.post("/v1/listings", files=files, data=fields)


def test_delete_job_answers_what_was_kept(api: Api) -> None:
    created = api.upload(jpeg((10, 20, 30)), context=json.dumps(CONTEXT))
    assert created.status_code == 202, created.text
    erased = api.client.delete(f"/v1/jobs/{created.json()['id']}")
    assert erased.status_code == 200, erased.text
    body = erased.json()
    assert body["erased_at"] is not None and body["kept"] == {} and body["context"] is None
    assert "kept" not in api.client.get(f"/v1/jobs/{body['id']}").json()  # only the erasure's answer carries it


def test_delete_listing_erases_its_text_and_photos_for_its_owner_only(api: Api) -> None:
    """Old code: no DELETE /v1/listings/{id} (405), and the listing's text stayed."""
    owner_key = admin_key(api.db_url, role="submit", name="listing owner")
    other_submitter = admin_key(api.db_url, role="submit", name="another submitter")
    other_tenant = admin_key(api.db_url, role="admin", tenant="elsewhere", name="other tenant")
    with (
        ApiClient(api.base_url, key=owner_key) as owner,
        ApiClient(api.base_url, key=other_submitter) as stranger,
        ApiClient(api.base_url, key=other_tenant) as outsider,
    ):
        photos = [jpeg((200, 30, 30)), jpeg((30, 200, 30))]
        created = post_listing(
            owner, photos, title="Red bicycle", description="call 555-0100", attributes=json.dumps({"color": "red"}),
            callback_url="https://93.184.215.14/l?token=hook-secret",  # public: private ones are refused at submit
        )  # fmt: skip
        assert created.status_code == 202, created.text
        listing_id = created.json()["id"]
        job_ids = [photo["id"] for photo in created.json()["photos"]]
        assert_error(outsider.delete(f"/v1/listings/{listing_id}"), 404, "listing_not_found")
        assert_error(stranger.delete(f"/v1/listings/{listing_id}"), 403, "forbidden")
        assert_error(owner.delete("/v1/listings/" + "0" * 32), 404, "listing_not_found")

        erased = owner.delete(f"/v1/listings/{listing_id}")
        assert erased.status_code == 200, erased.text
        body = erased.json()
        assert (body["title"], body["description"], body["attributes"]) == (None, None, {})
        assert [photo["kept"] for photo in body["photos"]] == [{}, {}]
        assert all(photo["erased_at"] and photo["context"] is None for photo in body["photos"])
        again = owner.get(f"/v1/listings/{listing_id}").json()
        assert "555-0100" not in json.dumps(again) and "Red bicycle" not in json.dumps(again)
        assert owner.delete(f"/v1/listings/{listing_id}").status_code == 200  # idempotent
    (listing,) = row(api.db_url, Listing, id=listing_id)
    assert listing.callback_url is None
    for job_id in job_ids:
        (job,) = row(api.db_url, Job, id=job_id)
        no_trace_of_content(job)
    audit = api.client.get("/v1/audit", params={"action": "listing.erase"}).json()["data"]
    assert [entry["target"]["id"] for entry in audit] == [listing_id]  # once: the second DELETE erased nothing


# --- orphan blobs ------------------------------------------------------------------------------------------------


def age(store: LocalBlobStore, key: str, seconds: float) -> None:
    path = store.root / key[:2] / key
    moment = time.time() - seconds
    os.utime(path, (moment, moment))


def used_blob(database_url: str, key: str) -> None:
    with session_scope(database_url) as session:
        jobs.create_job(
            session,
            jobs.NewJob(tenant="default", policy="moderation", policy_version=None, source="upload", blob_key=key),
        )


def test_the_orphan_sweep_deletes_only_old_blobs_no_job_uses_on_a_directory(database_url: str, tmp_path: Path) -> None:
    """Old code: nothing ever deleted a blob whose job row never committed."""
    store = LocalBlobStore(tmp_path / "blobs")
    orphan, used, fresh, stored_again = (store.put(bytes([n]) * 100) for n in range(4))
    used_blob(database_url, used)
    for key in (orphan, used, stored_again):
        age(store, key, 7200)
    store.put(bytes([3]) * 100)  # an upload of the same bytes, in flight (no row yet): its blob counts as new
    assert sweep_orphan_blobs(database_url, store, grace_s=3600) == 1
    assert store.modified_at(orphan) is None
    assert all(store.modified_at(key) is not None for key in (used, fresh, stored_again))


def test_the_orphan_sweep_on_s3(database_url: str, s3_bucket: S3Bucket) -> None:
    store: BlobStore = S3BlobStore(s3_bucket.bucket, "images")
    orphan, used = store.put(b"orphan bytes"), store.put(b"used bytes")
    used_blob(database_url, used)
    assert sweep_orphan_blobs(database_url, store, grace_s=3600) == 0  # both younger than the grace
    later = utcnow() + timedelta(hours=2)  # moto cannot age an object: the sweep's clock moves on instead
    assert sweep_orphan_blobs(database_url, store, grace_s=3600, now=later) == 1
    assert store.modified_at(orphan) is None and store.modified_at(used) is not None


def test_the_reconciler_loop_sweeps_orphan_blobs(database_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None, database_url=database_url, redis_url=redis_url, data_dir=tmp_path,
        reconcile_interval_s=0.05, orphan_sweep_interval_s=0.05,
    )  # fmt: skip
    store = LocalBlobStore(settings.resolved_blob_dir)
    orphan, used = store.put(b"left by a crash"), store.put(b"a job's image")
    used_blob(database_url, used)
    for key in (orphan, used):
        age(store, key, settings.orphan_blob_grace_s + 60)
    stop = threading.Event()
    thread = start_reconciler(settings, make_celery(settings), stop)
    try:
        wait_for(lambda: store.modified_at(orphan) is None, 30, "the orphan deleted by the reconciler's sweep")
    finally:
        stop.set()
        thread.join(10)
    assert store.modified_at(used) is not None

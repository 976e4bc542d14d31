"""Which earlier decision a job may reuse (core.jobs.reusable_decision), on a real database (SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlmodel import Session

from core.blobs import LocalBlobStore
from core.db import get_engine, migrate
from core.erasure import erase_job
from core.jobs import NewJob, claim_job, create_job, reusable_decision, store_decision
from core.principals import system_principal
from core.tables import Decision, Job

SHA = "ab" * 32
CATEGORIES = {"weapons": {"score": 0.1, "action": "allow", "fired": False, "decided_by": "x", "reason": None}}


def decided(session: Session, *, tenant: str = "acme", context: dict[str, Any] | None = None, **fields: Any) -> Job:
    job, _ = create_job(session, NewJob(tenant=tenant, policy="moderation", policy_version=None, source="upload",
                                        image_sha256=SHA, blob_key=SHA, context=context))  # fmt: skip
    claimed = claim_job(session, job.id, "test-worker", 60)
    assert claimed is not None
    values = {"action": "allow", "policy": "moderation", "policy_version": "v1", "categories": CATEGORIES}
    store_decision(session, claimed, Decision(job_id=job.id, **{**values, "models": {"random": True}, **fields}))
    return claimed


def pending(session: Session, *, tenant: str = "acme", context: dict[str, Any] | None = None) -> Job:
    job, _ = create_job(session, NewJob(tenant=tenant, policy="moderation", policy_version=None, source="upload",
                                        image_sha256=SHA, blob_key=SHA, context=context))  # fmt: skip
    return job


def test_only_the_same_tenant_bytes_context_and_version_with_models_is_reused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reuse.db'}"
    migrate(url)
    with Session(get_engine(url), expire_on_commit=False) as session:
        assert reusable_decision(session, pending(session), "v1") is None  # nothing decided yet
        decided(session, models={})  # a bank match: never copied, the bank decides anew
        assert reusable_decision(session, pending(session), "v1") is None
        earlier = decided(session, context={"title": "a mug"})
        assert reusable_decision(session, pending(session), "v1") is None  # another context
        found = reusable_decision(session, pending(session, context={"title": "a mug"}), "v1")
        assert found is not None and found.job_id == earlier.id
        assert reusable_decision(session, pending(session, context={"title": "a mug"}), "v2") is None
        assert reusable_decision(session, pending(session, tenant="globex", context={"title": "a mug"}), "v1") is None
        erase_job(session, LocalBlobStore(tmp_path / "blobs"), earlier, system_principal("acme"))
        assert reusable_decision(session, pending(session, context={"title": "a mug"}), "v1") is None


def test_a_listings_main_photo_and_its_other_photos_never_share_a_decision(tmp_path: Path) -> None:
    """Rules limited to the main photo (`photos: main`) judge it and skip the others: the place counts."""
    url = f"sqlite:///{tmp_path / 'reuse.db'}"
    migrate(url)
    with Session(get_engine(url), expire_on_commit=False) as session:
        second = decided(session, context={"title": "a mug"})
        second.listing_index = 1
        session.add(second)
        session.commit()
        main = pending(session, context={"title": "a mug"})
        assert reusable_decision(session, main, "v1") is None  # the earlier copy was photo 2
        third = pending(session, context={"title": "a mug"})
        third.listing_index = 2
        found = reusable_decision(session, third, "v1")
        assert found is not None and found.job_id == second.id  # photo 2 and photo 3: both skip main-photo rules

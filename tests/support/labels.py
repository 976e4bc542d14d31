"""Decided jobs for the review-label tests: a policy of probe checks, decisions made by the real evaluation from
given probe scores (no model), stored the way the worker stores them (core.jobs.store_decision)."""

from __future__ import annotations

import hashlib
import textwrap

from core.db import session_scope
from core.jobs import NewJob, claim_job, create_job, store_decision
from core.tables import Decision
from policies import ModelOutputs, Policy, decide, load_policy_text

QUESTIONS = {"weapons": "is there a gun in the picture?", "drugs": "are there drugs in the picture?"}


def probe_policy(name: str = "calib", *, review: float = 0.3, block: float = 0.8, audit_rate: float = 0.0) -> str:
    """A policy of one probe per category of QUESTIONS, as YAML."""
    categories = "".join(
        f"""
  - name: {category}
    description: {category.title()}.
    review: {review}
    block: {block}
    checks:
      - kind: probe
        question: {question}"""
        for category, question in QUESTIONS.items()
    )
    head = f"name: {name}\ndescription: Probe scores for calibration tests.\n"
    if audit_rate:
        head += f"audit_rate: {audit_rate}\n"
    return head + "categories:" + textwrap.dedent(categories) + "\n"


def load_probe_policy(text: str) -> Policy:
    return load_policy_text(text, "calib.yaml")


def decided_job(
    database_url: str,
    policy: Policy,
    scores: dict[str, float],
    *,
    tenant: str = "default",
    blob_key: str | None = None,
    image: bytes | None = None,
    audit_rate: float = 0.0,
) -> tuple[str, Decision]:
    """A job of `policy` decided from probe `scores` per category and stored; (job id, its decision)."""
    outputs = ModelOutputs(probes={QUESTIONS[category]: score for category, score in scores.items()})
    verdict = decide(policy, outputs)
    with session_scope(database_url) as session:
        job, _ = create_job(
            session,
            NewJob(
                tenant=tenant,
                policy=policy.name,
                policy_version=policy.version,
                source="upload",
                blob_key=blob_key,
                image_sha256=hashlib.sha256(image).hexdigest() if image else None,
                image_bytes=len(image) if image else None,
                image_format="JPEG" if image else None,
            ),
        )
        claimed = claim_job(session, job.id, "test-worker", 60)
        assert claimed is not None
        decision = Decision(
            job_id=job.id,
            action=verdict.action,
            policy=policy.name,
            policy_version=policy.version,
            categories={name: result.model_dump(mode="json") for name, result in verdict.categories.items()},
            evidence=[entry.model_dump(mode="json") for entry in verdict.evidence],
            reason=verdict.reason,
            models={"test": "decided from given probe scores"},
        )
        stored = store_decision(session, claimed, decision, audit_rate=audit_rate)
        assert stored is not None
        return job.id, stored

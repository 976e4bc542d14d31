"""What a worker process does with a job id: claim it, decode its image, infer, evaluate its policy, store.

One `WorkerRuntime` per process holds the policies (reloaded when their files change), the inference
service (models loaded once) and the job lifecycle. Every permanent problem ends as a `failed` job
with a code and a sentence; a transient one hands the job back for a retry (worker/lifecycle.py
counts the attempts); the process keeps serving either way.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError, OperationalError

from core import jobs, metrics
from core.banks import BankMatcher
from core.blobs import open_blob_store
from core.db import migrate, session_scope
from core.errors import ModelError, ModtagError, PolicyError, TransientError
from core.hashes import image_hashes
from core.images import ImageLimits, decode_image, sniff_image
from core.settings import Settings
from core.tables import Decision, Job, ShadowDecision, as_utc, utcnow
from core.urls import fetch_image_bytes
from policies import ModelOutputs, Policy, PolicyDecision, Requirements, TagSet, decide
from policies.evaluate import decide_early
from policies.registry import PolicyRegistry
from worker.adapter import roles_for
from worker.callbacks import send_callbacks
from worker.inference import InferenceService
from worker.lifecycle import JobLifecycle, JobResult, Unclaimed
from worker.pixels import PixelBudget

if TYPE_CHECKING:
    from worker.engine import Engine

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Policies, inference and job lifecycle of one worker process; `process(job_id)` runs one delivery of a job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Unique across a fleet: a pod's hostname, a process on a shared host by its pid.
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # Re-read when the files change (polled at most every MODTAG_POLICY_RELOAD_S), so edits need no restart.
        self.registry = PolicyRegistry(
            self._policy_dirs(),
            interval_s=settings.policy_reload_s,
            on_reload=self._reloaded,
        )
        self.blobs = open_blob_store(settings)
        self.limits = ImageLimits.from_settings(settings)
        self.inference = InferenceService(settings, tag_sets=self._tag_sets)
        self.lifecycle = JobLifecycle(settings, self.name)
        self.banks = BankMatcher()
        self.pixels = PixelBudget(round(settings.worker_decoded_megapixels * 1_000_000))
        if settings.migrate_on_start:
            migrate(settings.resolved_database_url)

    @property
    def policies(self) -> Mapping[str, Policy]:
        """The loaded policies, as of the last reload."""
        return self.registry

    def roles_needed(self) -> set[str]:
        """Only the models some loaded policy needs."""
        roles: set[str] = set()
        for policy in self.policies.values():
            roles |= roles_for(policy.requirements())
        return roles

    def load(self) -> Engine:
        """Load the models once (thread-safe), tag sets warmed; raises ModelError with how to get the weights."""
        engine = self.inference.engine  # every job asks: only the first pays for reading the policies' needs
        return engine if engine is not None else self.inference.start(self.roles_needed())

    def process(self, job_id: str) -> JobResult:
        """Run one delivery of a job. Raises RetryLater when the job went back to the queue for another attempt."""
        try:
            job = self.lifecycle.claim(job_id)
        except Unclaimed as unclaimed:
            return unclaimed.result
        try:
            return self._decide(job)
        finally:
            self.lifecycle.release(job.id)

    def give_up(self, job_id: str, code: str, message: str) -> None:
        """Fail a job from outside its run (the Celery task's time limit), with its callbacks."""
        job = self.lifecycle.give_up(job_id, code, message)
        if job is not None:
            send_callbacks(self.settings, job)

    def _decide(self, job: Job) -> JobResult:
        try:
            return self._run(job)
        except ModtagError as exc:
            if exc.retryable:
                return self._retry(job, exc)
            return self._fail(job, exc.code, exc.message)
        except (OperationalError, DBAPIError) as exc:
            error = TransientError(f"database error: {exc.__class__.__name__}", code="database_unavailable")
            return self._retry(job, error)
        except TimeoutError:
            return self._fail(job, "job_timeout", f"inference did not finish within {self.settings.job_timeout_s}s")
        except MemoryError:
            return self._retry(job, TransientError("out of memory while processing the image", code="out_of_memory"))
        except Exception as exc:  # a bug must fail the job, not the worker
            log.exception("job %s failed unexpectedly", job.id)
            return self._fail(job, "internal_error", f"unexpected {exc.__class__.__name__}: {exc}")

    def _run(self, job: Job) -> JobResult:
        timings: dict[str, float] = {}
        policy = self.policies.get(job.policy)
        if policy is None:
            raise PolicyError(f"policy {job.policy!r} is not loaded on this worker", code="policy_not_found")
        context = job.context or {}
        needs = policy.requirements(context)  # a missing context field fails the job before any work
        self.load()
        roles = self.inference.roles
        _check_roles(policy, needs, roles)
        shadows = self._shadow_plans(policy, context, roles)
        for _, shadow_needs, _ in shadows:
            if shadow_needs is not None:
                needs = needs.merge(shadow_needs)
        with _stage(timings, "fetch"):
            data = self._image_bytes(job)
        header = sniff_image(data, self.limits)
        # Decoded pixels are held against the worker-wide budget until the models are done with them.
        with self.pixels.hold(header.width * header.height, timeout_s=self.settings.job_timeout_s):
            with _stage(timings, "decode"):
                image = decode_image(data, self.limits)
            with _stage(timings, "hash"):
                hashes = image_hashes(data, image)
                with session_scope(self.settings.resolved_database_url) as session:
                    jobs.record_hashes(session, job, hashes.sha256, hashes.pdq, hashes.pdq_quality)
                    queries = [(query.bank, query.max_distance) for query in needs.banks]
                    known = ModelOutputs(banks=self.banks.lookup(session, job.tenant, queries, hashes))
                    earlier = (
                        jobs.reusable_decision(session, job, policy.version) if self.settings.reuse_decisions else None
                    )
            # Known content first: a bank match that blocks, then an earlier identical upload, and only then the models.
            verdict = decide_early(policy, known, context)
            if verdict is not None:
                decision = self._decision(job, policy, verdict, known, models={})
                shadow_rows: list[ShadowDecision] = []
                how = "hash_match"
            elif earlier is not None:
                decision = _reused(job, earlier)
                shadow_rows = []
                how = "reused"
            else:
                with _stage(timings, "infer"):
                    outputs = (
                        ModelOutputs()
                        if needs.empty
                        else self.inference.infer(image, needs, timeout_s=self.settings.job_timeout_s)
                    )
                outputs = known.merged(outputs)
                with _stage(timings, "evaluate"):
                    verdict = decide(policy, outputs, context)
                    shadow_rows = [
                        _shadow_row(shadow, policy, verdict, outputs, context, error) for shadow, _, error in shadows
                    ]
                decision = self._decision(job, policy, verdict, outputs, models=self.inference.describe())
                how = ""
            del image  # the pixels are given back with the budget
        with _stage(timings, "store"):
            stored = self.lifecycle.store(job, decision, shadow_rows)
        if stored:
            if how:
                metrics.DECISIONS_WITHOUT_MODELS.labels(policy.name, how).inc()
            for row in shadow_rows:
                outcome = "error" if row.action is None else ("agree" if row.action == decision.action else "disagree")
                metrics.SHADOW_DECISIONS.labels(policy.name, row.policy, outcome).inc()
            send_callbacks(self.settings, job)
        return JobResult(job.id, "done", timings=timings)

    def _decision(
        self, job: Job, policy: Policy, verdict: PolicyDecision, outputs: ModelOutputs, models: dict[str, Any]
    ) -> Decision:
        return Decision(
            job_id=job.id,
            action=verdict.action,
            policy=policy.name,
            policy_version=policy.version,
            caption=outputs.caption,
            categories={name: result.model_dump(mode="json") for name, result in verdict.categories.items()},
            evidence=[item.model_dump(mode="json") for item in verdict.evidence],
            tags=[tag.model_dump(mode="json") for tag in verdict.tags],
            contradictions=[item.model_dump(mode="json") for item in verdict.contradictions],
            reason=verdict.reason[:2000],
            models=models,
            duration_ms=_since_start(job),
        )

    def _shadow_plans(
        self, policy: Policy, context: Mapping[str, Any], roles: set[str]
    ) -> list[tuple[Policy, Requirements | None, PolicyError | None]]:
        """Each shadow of `policy` with what it needs, or why it cannot run on this job (never failing the job)."""
        plans: list[tuple[Policy, Requirements | None, PolicyError | None]] = []
        for shadow in self.registry.shadows_of(policy.name):
            try:
                shadow_needs = shadow.requirements(context)
                _check_roles(shadow, shadow_needs, roles)
            except PolicyError as exc:
                plans.append((shadow, None, exc))
                continue
            except ModtagError as exc:
                plans.append((shadow, None, PolicyError(exc.message, code=exc.code)))
                continue
            plans.append((shadow, shadow_needs, None))
        return plans

    def _image_bytes(self, job: Job) -> bytes:
        if job.blob_key:
            return self.blobs.get(job.blob_key)
        if not job.image_url:
            raise ModtagError("job has neither an uploaded image nor an image_url", code="job_invalid")
        return fetch_image_bytes(
            job.image_url,
            max_bytes=self.settings.max_upload_bytes,
            timeout_s=self.settings.fetch_timeout_s,
            allow_private=self.settings.fetch_allow_private,
        )

    def _fail(self, job: Job, code: str, message: str) -> JobResult:
        result = self.lifecycle.fail(job, code, message)
        send_callbacks(self.settings, job)
        return result

    def _retry(self, job: Job, error: ModtagError) -> JobResult:
        result = self.lifecycle.retry(job, error)  # raises RetryLater while attempts remain
        send_callbacks(self.settings, job)
        return result

    def _tag_sets(self) -> list[TagSet]:
        return [tag_set for policy in self.policies.values() for tag_set in policy.requirements().tag_sets]

    def _reloaded(self, outcome: str) -> None:
        metrics.POLICY_RELOADS.labels(outcome).inc()
        if outcome == "loaded":
            self.inference.rewarm()  # a tag set new in this reload is encoded between batches, not by its first job

    def _policy_dirs(self) -> list[Path]:
        return [self.settings.policies_dir] if self.settings.policies_dir else []


def _since_start(job: Job) -> float:
    return round((utcnow() - as_utc(job.started_at or utcnow())).total_seconds() * 1000, 1)


# What a reused decision copies from the earlier one; its id, job, timing and `reused_from` are its own.
_REUSED_FIELDS = frozenset(
    [
        "action",
        "policy",
        "policy_version",
        "caption",
        "categories",
        "evidence",
        "tags",
        "contradictions",
        "reason",
        "models",
    ]
)


def _reused(job: Job, earlier: Decision) -> Decision:
    """A copy of an earlier identical upload's decision for `job`, naming the job it came from."""
    return Decision(
        **earlier.model_dump(include=set(_REUSED_FIELDS)),
        job_id=job.id,
        duration_ms=_since_start(job),
        reused_from=earlier.reused_from or earlier.job_id,
    )


def _check_roles(policy: Policy, needs: Requirements, loaded: set[str]) -> None:
    missing = roles_for(needs) - loaded
    if missing:
        raise ModelError(
            f"policy '{policy.name}' needs the {', '.join(sorted(missing))} model(s), which this worker did not load "
            "(the policy arrived in a reload); restart the worker to load them",
            code="model_not_loaded",
        )


def _shadow_row(
    shadow: Policy,
    active: Policy,
    verdict: PolicyDecision,
    outputs: ModelOutputs,
    context: Mapping[str, Any],
    error: PolicyError | None,
) -> ShadowDecision:
    row = ShadowDecision(
        job_id="",
        policy=shadow.name,
        policy_version=shadow.version,
        active_policy=active.name,
        active_version=active.version,
        active_action=verdict.action,
    )
    if error is None:
        try:
            shadowed = decide(shadow, outputs, context)
        except PolicyError as exc:
            error = exc
        else:
            row.action = shadowed.action
            row.categories = {name: result.model_dump(mode="json") for name, result in shadowed.categories.items()}
            row.evidence = [item.model_dump(mode="json") for item in shadowed.evidence]
            row.tags = [tag.model_dump(mode="json") for tag in shadowed.tags]
            row.reason = shadowed.reason[:2000]
    if error is not None:
        row.error_code, row.error_message = error.code, error.message[:2000]
    return row


@contextmanager
def _stage(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        timings[stage] = elapsed
        metrics.STAGE_DURATION.labels(stage).observe(elapsed)

"""What a worker process does with a job id: claim, fetch, decode, infer, evaluate, store.

One `WorkerRuntime` per process holds the policies, the models (loaded once) and the batcher.
Every permanent problem ends as a `failed` job with a code and a sentence; transient ones raise
`TransientError` so the Celery task retries; the process keeps serving either way.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError, OperationalError

from core import jobs, metrics
from core.blobs import LocalBlobStore
from core.db import migrate, session_scope
from core.errors import ModelError, ModtagError, PolicyError, TransientError
from core.images import ImageLimits, decode_image
from core.listings import listing_callback_due
from core.settings import Settings
from core.tables import Decision, Job, JobStatus, ShadowDecision, utcnow
from core.urls import fetch_image_bytes, post_json
from policies import ModelOutputs, Policy, PolicyDecision, Requirements, decide
from policies.registry import PolicyRegistry

if TYPE_CHECKING:
    from PIL import Image

    from policies.schema import TagSet
    from worker.engine import Engine, ImageOutput, ImageRequest, TagQuery

log = logging.getLogger(__name__)
POLICY_RELOAD_S = 2.0  # how often a worker looks for edited policy files (a hash of a few small files)


@dataclass
class JobResult:
    """What happened to one delivery of a job (for logs and tests)."""

    job_id: str
    outcome: str  # done, failed, duplicate, busy, missing
    code: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class WorkerRuntime:
    """Policies, models and batcher of one worker process; `process(job_id)` runs one job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{id(self):x}"
        # Re-read when the files change (polled at most every POLICY_RELOAD_S), so edits need no restart.
        self.registry = PolicyRegistry(
            self._policy_dirs(),
            interval_s=settings.policy_reload_s,
            on_reload=self._reloaded,
        )
        self.blobs = LocalBlobStore(settings.resolved_blob_dir)
        self.limits = ImageLimits.from_settings(settings)
        self._engine: Engine | None = None
        self._batcher: Any = None
        self._lock = threading.Lock()
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
        """Load the models once (thread-safe); raises ModelError with how to get the weights.

        The models are loaded and warmed on the batcher's model thread, the one thread that runs them
        (see worker/batcher.py for why one thread).
        """
        with self._lock:
            if self._engine is None:
                from worker.batcher import Batcher

                batcher: Batcher[ImageRequest, ImageOutput] = Batcher(
                    self._infer,
                    max_images=self.settings.batch_max_images,
                    wait_ms=self.settings.batch_wait_ms,
                )
                self._engine = batcher.call(self._build_engine)
                self._batcher = batcher
            return self._engine

    def _build_engine(self) -> Engine:
        from worker.engine import Engine
        from worker.models import load_models

        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        loaded = load_models(
            self.settings.models,
            self.roles_needed(),
            cache_dir=self.settings.resolved_models_cache_dir,
            device=self.settings.device,
            dtype=self.settings.dtype,
        )
        for role, seconds in loaded.load_seconds.items():
            metrics.MODEL_LOAD.labels(role).set(seconds)
        engine = Engine(loaded)
        self._warm_tags(engine)
        return engine

    def _warm_tags(self, engine: Engine) -> None:
        # The first job of a tag set would otherwise pay the text pass over its whole taxonomy (561 texts
        # of the product taxonomy: ~3 s on 2 CPU cores at base size, far more on busy cores), which could
        # approach a job timeout.
        tag_sets = {t.key: t for policy in self.policies.values() for t in policy.requirements().tag_sets}
        if not tag_sets:
            return
        started = time.perf_counter()
        encoded = engine.warm_tags([tag_query(t) for t in tag_sets.values()])
        log.info(
            "tag text features: %d texts of %d tag sets encoded in %.1fs",
            encoded,
            len(tag_sets),
            time.perf_counter() - started,
        )

    def _reloaded(self, outcome: str) -> None:
        metrics.POLICY_RELOADS.labels(outcome).inc()
        batcher, engine = self._batcher, self._engine
        if outcome == "loaded" and batcher is not None and engine is not None:
            # A tag set new in this reload is encoded now, on the model thread between batches, rather
            # than by its first job; the sets already cached cost nothing.
            batcher.call_soon(lambda: self._warm_tags(engine))

    def _infer(self, requests: Sequence[ImageRequest]) -> list[ImageOutput]:
        """One engine batch (the batcher's thread), with its compute time per model and stage."""
        if self._engine is None:  # only load() starts the batcher, and it sets the engine before any request
            raise ModelError("the models are not loaded", code="model_not_loaded")
        outputs = self._engine.run(requests)
        for stage in {stage for output in outputs for stage in output.timings}:
            seconds = sum(output.timings.get(stage, 0.0) for output in outputs)
            if seconds > 0:
                metrics.MODEL_INFERENCE.labels(STAGE_MODELS.get(stage, "all"), stage).observe(seconds)
        return outputs

    def process(self, job_id: str) -> JobResult:
        """Run one delivery of a job. Raises TransientError when a retry may succeed."""
        url = self.settings.resolved_database_url
        try:
            with session_scope(url) as session:
                job = jobs.claim_job(session, job_id, self.name, self.settings.running_lease_s)
                if job is None:
                    return self._unclaimed(session, job_id)
        except (OperationalError, DBAPIError) as exc:
            raise TransientError(
                f"database unavailable: {exc.__class__.__name__}", code="database_unavailable"
            ) from exc
        try:
            return self._run(job)
        except ModtagError as exc:
            if exc.retryable:
                self._requeue(job.id)
                if isinstance(exc, TransientError):
                    raise
                raise TransientError(exc.message, code=exc.code) from exc
            return self._fail(job, exc.code, exc.message)
        except (OperationalError, DBAPIError) as exc:
            self._requeue(job.id)
            raise TransientError(f"database error: {exc.__class__.__name__}", code="database_unavailable") from exc
        except TimeoutError:
            return self._fail(job, "job_timeout", f"inference did not finish within {self.settings.job_timeout_s}s")
        except MemoryError as exc:
            self._requeue(job.id)
            raise TransientError("out of memory while processing the image", code="out_of_memory") from exc
        except Exception as exc:  # a bug must fail the job, not the worker
            log.exception("job %s failed unexpectedly", job.id)
            return self._fail(job, "internal_error", f"unexpected {exc.__class__.__name__}: {exc}")

    def fail_exhausted(self, job_id: str, exc: BaseException) -> None:
        """After the last retry of a transient error: the job fails with that error's code."""
        code = getattr(exc, "code", "transient")
        message = f"gave up after {self.settings.max_attempts} attempts: {getattr(exc, 'message', exc)}"
        with session_scope(self.settings.resolved_database_url) as session:
            job = jobs.get_job(session, job_id)
            if job is not None:
                jobs.fail_job(session, job_id, code, message)
                metrics.JOBS_FAILED.labels(job.policy, code).inc()
                metrics.JOBS_COMPLETED.labels(job.policy, "failed").inc()

    def _run(self, job: Job) -> JobResult:
        timings: dict[str, float] = {}
        policy = self.policies.get(job.policy)
        if policy is None:
            raise PolicyError(f"policy {job.policy!r} is not loaded on this worker", code="policy_not_found")
        context = job.context or {}
        needs = policy.requirements(context)  # a missing context field fails the job before any work
        loaded = self.load()
        _check_roles(policy, needs, set(loaded.models.models))
        shadows = self._shadow_plans(policy, context, set(loaded.models.models))
        for _, shadow_needs, _ in shadows:
            if shadow_needs is not None:
                needs = needs.merge(shadow_needs)
        with _stage(timings, "fetch"):
            data = self._image_bytes(job)
        with _stage(timings, "decode"):
            image = decode_image(data, self.limits)
        with _stage(timings, "infer"):
            output: ImageOutput = self._batcher.run(image_request(image, needs), timeout_s=self.settings.job_timeout_s)
        for stage, seconds in output.timings.items():
            timings[f"infer.{stage}"] = seconds
        with _stage(timings, "evaluate"):
            outputs = model_outputs(output)
            verdict = decide(policy, outputs, context)
            shadow_rows = [
                _shadow_row(shadow, policy, verdict, outputs, context, error) for shadow, _, error in shadows
            ]
        started = job.started_at or utcnow()
        if started.tzinfo is None:
            started = started.replace(tzinfo=UTC)
        decision = Decision(
            job_id=job.id,
            action=verdict.action,
            policy=policy.name,
            policy_version=policy.version,
            caption=output.caption,
            categories={name: result.model_dump(mode="json") for name, result in verdict.categories.items()},
            evidence=[item.model_dump(mode="json") for item in verdict.evidence],
            tags=[tag.model_dump(mode="json") for tag in verdict.tags],
            contradictions=[item.model_dump(mode="json") for item in verdict.contradictions],
            reason=verdict.reason[:2000],
            models=self._engine.describe() if self._engine else {},
            duration_ms=round((utcnow() - started).total_seconds() * 1000, 1),
        )
        with _stage(timings, "store"), session_scope(self.settings.resolved_database_url) as session:
            stored = jobs.store_decision(session, job, decision, shadow_rows)
        if stored.id == decision.id:
            self._count_done(job, stored)
            for row in shadow_rows:
                outcome = "error" if row.action is None else ("agree" if row.action == stored.action else "disagree")
                metrics.SHADOW_DECISIONS.labels(policy.name, row.policy, outcome).inc()
            self._send_callback(job)
        return JobResult(job.id, "done", timings=timings)

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

    def _unclaimed(self, session: Any, job_id: str) -> JobResult:
        job = jobs.get_job(session, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping its message", job_id)
            return JobResult(job_id, "missing")
        if job.status in (JobStatus.DONE, JobStatus.FAILED):
            return JobResult(job_id, "duplicate")
        # Another worker holds a live lease; if it died, the reconciler hands the job back later.
        return JobResult(job_id, "busy")

    def _fail(self, job: Job, code: str, message: str) -> JobResult:
        with session_scope(self.settings.resolved_database_url) as session:
            jobs.fail_job(session, job.id, code, message)
        metrics.JOBS_FAILED.labels(job.policy, code).inc()
        metrics.JOBS_COMPLETED.labels(job.policy, "failed").inc()
        log.info("job %s failed: %s (%s)", job.id, message, code)
        self._send_callback(job)
        return JobResult(job.id, "failed", code=code)

    def _send_callback(self, job: Job) -> None:
        """POST the final job to its callback_url, and its listing to the listing's once every photo is final.

        Once each, best effort: the API stays the source of truth, and a failed delivery never fails the job.
        """
        if job.callback_url:
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    current = jobs.get_job(session, job.id)
                    body = jobs.job_public(current, jobs.get_decision(session, job.id)) if current else None
            except (OperationalError, DBAPIError) as exc:
                log.warning("callback for job %s not delivered: %s", job.id, exc)
                metrics.CALLBACKS.labels("failed").inc()
            else:
                if body is not None:
                    self._post_callback(f"job {job.id}", job.callback_url, body)
        if job.listing_id:
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    due = listing_callback_due(session, job.listing_id)
            except (OperationalError, DBAPIError) as exc:
                log.warning("callback for listing %s not claimed: %s", job.listing_id, exc)
                metrics.CALLBACKS.labels("failed").inc()
            else:
                if due is not None:
                    self._post_callback(f"listing {job.listing_id}", *due)

    def _post_callback(self, subject: str, url: str, body: dict[str, Any]) -> None:
        try:
            status = post_json(
                url,
                json.dumps(body).encode(),
                timeout_s=self.settings.fetch_timeout_s,
                allow_private=self.settings.fetch_allow_private,
            )
            outcome = "delivered" if 200 <= status < 300 else "rejected"
        except ModtagError as exc:
            log.warning("callback for %s not delivered: %s", subject, exc)
            outcome = "failed"
        metrics.CALLBACKS.labels(outcome).inc()

    def _requeue(self, job_id: str) -> None:
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                jobs.requeue_job(session, job_id)
        except (OperationalError, DBAPIError):
            log.warning("could not hand job %s back to the queue; the reconciler will", job_id)

    def _count_done(self, job: Job, decision: Decision) -> None:
        metrics.JOBS_COMPLETED.labels(job.policy, "done").inc()
        metrics.DECISIONS.labels(decision.policy, decision.action).inc()
        for name, result in decision.categories.items():
            metrics.CATEGORY_DECISIONS.labels(decision.policy, name, result["action"]).inc()
        created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=UTC)
        metrics.JOB_DURATION.labels(job.policy).observe((utcnow() - created).total_seconds())

    def _policy_dirs(self) -> list[Any]:
        return [self.settings.policies_dir] if self.settings.policies_dir else []


# The model each engine stage runs (the `model` label of modtag_model_inference_seconds); preprocessing and
# the vision pass cover every model of the batch.
STAGE_MODELS = {"caption": "caption", "probes": "vqa", "answers": "vqa", "matches": "itm", "tags": "itm"}


def roles_for(needs: Requirements) -> set[str]:
    """The models a set of requirements runs on."""
    roles: set[str] = set()
    if needs.caption:
        roles.add("caption")
    if needs.probes or needs.answers:
        roles.add("vqa")
    if needs.texts or needs.describe or needs.tag_sets:
        roles.add("itm")
    return roles


def image_request(image: Image.Image, needs: Requirements) -> ImageRequest:
    """The engine request that computes `needs` for one decoded image."""
    from worker.engine import AnswerRequest, ImageRequest

    return ImageRequest(
        image=image,
        caption=needs.caption,
        probes=needs.probes,
        texts=needs.texts,
        answers=tuple(AnswerRequest(q.key, q.question, q.candidates, q.required) for q in needs.answers),
        tags=tuple(tag_query(t) for t in needs.tag_sets),
    )


def tag_query(tag_set: TagSet) -> TagQuery:
    """The engine query that scores one policy tag set."""
    from worker.engine import TagQuery

    return TagQuery(tag_set.key, tag_set.texts, tag_set.groups, tag_set.top_k)


def model_outputs(output: ImageOutput) -> ModelOutputs:
    """The engine's results as the policy domain reads them."""
    return ModelOutputs(
        caption=output.caption,
        probes=output.probes,
        matches=output.matches,
        answers=output.answers,
        tags=output.tags,
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

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
from typing import Any

import redis
from PIL import Image
from sqlalchemy.exc import DBAPIError, OperationalError

from core import jobs, metrics
from core.bankflood import FloodWatch
from core.banks import BankMatcher
from core.blobs import BlobStore, open_blob_store
from core.db import migrate, session_scope
from core.dependencies import Dependency, outage_of
from core.errors import ModelError, ModtagError, PolicyError, TransientError
from core.hashes import image_hashes
from core.images import ImageLimits, decode_image, sniff_image
from core.queues import Priority
from core.settings import Settings
from core.tables import Decision, Job, ShadowDecision, as_utc, utcnow
from policies import ModelOutputs, Policy, PolicyDecision, Requirements, decide
from policies.capabilities import Capability
from policies.evaluate import decide_early
from policies.registry import PolicyRegistry
from policies.requirements import RequirementsBuilder
from worker.callbacks import send_callbacks
from worker.embedding import ITM_CAPABILITIES, EmbeddingStep
from worker.inference import InferenceService
from worker.lifecycle import JobLifecycle, JobResult, Unclaimed
from worker.pixels import PixelBudget, decode_peak_bytes, pixel_bytes, release_freed_memory
from worker.url_media import fetch_url_media
from worker.video import VideoJudge

log = logging.getLogger(__name__)

# A shadow policy, what it needs of this job, or why it cannot run on it.
ShadowPlan = tuple[Policy, Requirements | None, PolicyError | None]


class WorkerRuntime:
    """Policies, inference and job lifecycle of one worker process; `process(job_id)` runs one delivery of a job."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: PolicyRegistry,
        blobs: BlobStore,
        inference: InferenceService,
        lifecycle: JobLifecycle,
        banks: BankMatcher,
        embedding: EmbeddingStep | None = None,
        pixels: PixelBudget,
        flood: FloodWatch | None = None,
    ) -> None:
        self.settings = settings
        self.name = lifecycle.worker
        self.registry = registry
        self.blobs = blobs
        self.limits = ImageLimits.from_settings(settings)
        self.inference = inference
        self.lifecycle = lifecycle
        self.banks = banks
        self.embedding = embedding or EmbeddingStep(settings)
        self.pixels = pixels
        self.flood = flood

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerRuntime:
        """The runtime of a worker process as the settings say, its database migrated when they ask for it."""
        # Unique across a fleet: a pod's hostname, a process on a shared host by its pid.
        name = f"{socket.gethostname()}:{os.getpid()}"
        inference_ref: list[InferenceService] = []

        def reloaded(outcome: str) -> None:
            metrics.POLICY_RELOADS.labels(outcome).inc()
            if outcome == "loaded" and inference_ref:
                inference_ref[0].rewarm()  # what a reload added is prepared between batches, not by its first job

        # Re-read when the files change (polled at most every MODTAG_POLICY_RELOAD_S), so edits need no restart.
        dirs = [settings.policies_dir] if settings.policies_dir else []
        registry = PolicyRegistry(dirs, interval_s=settings.policy_reload_s, on_reload=reloaded)
        inference = InferenceService(settings, warm_needs=lambda: _all_needs(registry))
        inference_ref.append(inference)
        if settings.migrate_on_start:
            migrate(settings.resolved_database_url)
        return cls(
            settings,
            registry=registry,
            blobs=open_blob_store(settings),
            inference=inference,
            lifecycle=JobLifecycle(settings, name),
            banks=BankMatcher(),
            pixels=PixelBudget(settings.resolved_worker_decoded_bytes),
            flood=FloodWatch(
                redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2),
                share=settings.bank_flood_share,
                min_matches=settings.bank_flood_min_matches,
            ),
        )

    @property
    def policies(self) -> Mapping[str, Policy]:
        """The loaded policies, as of the last reload."""
        return self.registry

    def capabilities_needed(self) -> frozenset[Capability]:
        """Only what some loaded policy needs: the families that compute it are the ones loaded."""
        needed = _all_needs(self.policies).model_capabilities
        # With the ITM model loaded anyway, the image embedding costs a projection: jobs store it (worker/embedding.py).
        return needed | {Capability.IMAGE_EMBEDDING} if needed & ITM_CAPABILITIES else needed

    def load(self) -> None:
        """Load the model families once (thread-safe), warmed; raises ModelError with how to get the weights."""
        if not self.inference.started:  # every job asks: only the first pays for reading the policies' needs
            self.inference.start(self.capabilities_needed())

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
            if not self.lifecycle.held:
                # The last job out gives back what the burst left in malloc's arenas; the pixel budget's own trim
                # runs when the images go, before the OCR, thumbnail and store steps have freed theirs.
                release_freed_memory()

    def give_up(self, job_id: str, code: str, message: str) -> None:
        """Fail a job from outside its run (the Celery task's time limit), with its callbacks."""
        job = self.lifecycle.give_up(job_id, code, message)
        if job is not None:
            send_callbacks(self.settings, job)

    def _decide(self, job: Job) -> JobResult:
        try:
            return self._outcome(job)
        except Exception as exc:
            # The job's outcome could not be written (the database went away meanwhile): wait for the database.
            outage = outage_of(exc)
            if outage is None:
                raise
            return self._retry(job, outage)

    def _outcome(self, job: Job) -> JobResult:
        """Run the job; its own errors fail it or count an attempt, a dependency's outage only makes it wait."""
        try:
            return self._run(job)
        except ModtagError as exc:
            if exc.retryable:  # DependencyUnavailable among them: the lifecycle spends no attempt on it
                return self._retry(job, exc)
            return self._fail(job, exc.code, exc.message)
        except (OperationalError, DBAPIError) as exc:
            error = outage_of(exc) or TransientError(f"database error: {exc.__class__.__name__}", code="database_error")
            return self._retry(job, error)
        except TimeoutError:
            return self._fail(job, "job_timeout", f"inference did not finish within {self.settings.job_timeout_s}s")
        except MemoryError:
            return self._retry(job, TransientError("out of memory while processing the image", code="out_of_memory"))
        except Exception as exc:  # a bug must fail the job, not the worker
            outage = outage_of(exc)  # a pool timeout, a broker error: not a bug of the job's
            if outage is not None:
                return self._retry(job, outage)
            log.exception("job %s failed unexpectedly", job.id)
            return self._fail(job, "internal_error", f"unexpected {exc.__class__.__name__}: {exc}")

    def _run(self, job: Job) -> JobResult:
        """Plan what the policy and its shadows need, read the image, judge it, store the decision."""
        timings: dict[str, float] = {}
        policy, context, needs, shadows = self._plan(job)
        if job.media == "video":
            return self._run_video(job, policy, context, needs, timings)
        with _stage(timings, "fetch"):
            data = self._image_bytes(job)
        if data is None:  # an image_url that holds a video or an animation: now stored, decided on its frames
            return self._run_video(job, policy, context, needs, timings)
        header = sniff_image(data, self.limits)
        # Decoded pixels are held against the worker-wide budget until the models are done with them: the decode's
        # peak first, then the bytes of the RGB image kept.
        peak = decode_peak_bytes(header.width, header.height)
        with self.pixels.hold(peak, timeout_s=self.settings.job_timeout_s) as held:
            with _stage(timings, "decode"):
                image = decode_image(data, self.limits)
            held.settle(pixel_bytes(image.width, image.height, image.mode))
            decision, shadow_rows, how = self._judge(job, policy, context, needs, shadows, data, image, timings)
            del image  # the pixels are given back with the budget
        with _stage(timings, "store"):
            stored = self.lifecycle.store(job, decision, shadow_rows, audit_rate=policy.audit_rate)
        if stored:
            if how:
                metrics.DECISIONS_WITHOUT_MODELS.labels(policy.name, how).inc()
            for row in shadow_rows:
                outcome = "error" if row.action is None else ("agree" if row.action == decision.action else "disagree")
                metrics.SHADOW_DECISIONS.labels(policy.name, row.policy, outcome).inc()
            send_callbacks(self.settings, job)
        return JobResult(job.id, "done", timings=timings)

    def _run_video(
        self, job: Job, policy: Policy, context: Mapping[str, Any], needs: Requirements, timings: dict[str, float]
    ) -> JobResult:
        """A video or an animated image, decided on its kept frames as one subject (worker/video.py). Its shadow
        policies are not run: a shadow's agreement is measured on images."""
        judge = VideoJudge(
            self.settings,
            blobs=self.blobs,
            banks=self.banks,
            inference=self.inference,
            dependencies=self.lifecycle.dependencies,
            pixels=self.pixels,
        )
        with _stage(timings, "video"):
            judged = judge.judge(job, policy, context, needs)
        with _stage(timings, "store"):
            stored = self.lifecycle.store(job, judged.decision, [], audit_rate=policy.audit_rate)
        if stored:
            if judged.how:
                metrics.DECISIONS_WITHOUT_MODELS.labels(policy.name, judged.how).inc()
            send_callbacks(self.settings, job)
        return JobResult(job.id, "done", timings=timings)

    def _plan(self, job: Job) -> tuple[Policy, Mapping[str, Any], Requirements, list[ShadowPlan]]:
        """The job's policy, context, what it and its shadows need computed, and each shadow's plan."""
        policy = self.policies.get(job.policy)
        if policy is None:
            raise PolicyError(f"policy {job.policy!r} is not loaded on this worker", code="policy_not_found")
        context = job.context or {}
        needs = policy.requirements(context)  # a missing context field fails the job before any work
        self.load()
        loaded = self.inference.capabilities
        _check_capabilities(policy, needs, loaded)
        shadows = self._shadow_plans(policy, context, loaded)
        for _, shadow_needs, _ in shadows:
            if shadow_needs is not None:
                needs = needs.merge(shadow_needs)
        return policy, context, needs, shadows

    def _judge(
        self,
        job: Job,
        policy: Policy,
        context: Mapping[str, Any],
        needs: Requirements,
        shadows: list[ShadowPlan],
        data: bytes,
        image: Image.Image,
        timings: dict[str, float],
    ) -> tuple[Decision, list[ShadowDecision], str]:
        """The decision (and shadow rows): known content first, then an earlier identical upload, then the models.

        The third value says how it was decided without the models (`hash_match`, `reused`), or is empty.
        """
        with _stage(timings, "hash"):
            known, earlier = self._known(job, policy, needs, data, image)
        verdict = decide_early(policy, known, context)
        if verdict is not None:
            return self._decision(job, policy, verdict, known, models={}), [], "hash_match"
        if earlier is not None:
            self.embedding.copy_reused(job, earlier.reused_from or earlier.job_id)
            return _reused(job, earlier), [], "reused"
        needs = self.embedding.needs_for(job, needs, self.inference.capabilities)
        with _stage(timings, "infer"):
            outputs = (
                ModelOutputs()
                if needs.empty
                else self.inference.infer(
                    image, needs, timeout_s=self.settings.job_timeout_s, bulk=Priority.of(job.priority) is Priority.BULK
                )
            )
        outputs = self.embedding.after_inference(job, needs, known.merged(outputs), self.inference.describe())
        with _stage(timings, "evaluate"):
            verdict = decide(policy, outputs, context)
            shadow_rows = [
                _shadow_row(shadow, policy, verdict, outputs, context, error) for shadow, _, error in shadows
            ]
        return self._decision(job, policy, verdict, outputs, models=self.inference.describe()), shadow_rows, ""

    def _known(
        self, job: Job, policy: Policy, needs: Requirements, data: bytes, image: Image.Image
    ) -> tuple[ModelOutputs, Decision | None]:
        """The image's hashes recorded; what the banks know of it; an earlier identical upload's reusable decision."""
        hashes = image_hashes(data, image)
        with session_scope(self.settings.resolved_database_url) as session:
            jobs.record_hashes(session, job, hashes.sha256, hashes.pdq, hashes.pdq_quality)
            queries = [(query.bank, query.max_distance) for query in needs.banks]
            matches = self.banks.lookup(session, job.tenant, queries, hashes)
            known = ModelOutputs(banks=matches, position=job.listing_index)
            earlier = jobs.reusable_decision(session, job, policy.version) if self.settings.reuse_decisions else None
        if queries and self.flood is not None:
            self.flood.observe(job.tenant, matches.values())
        return known, earlier

    def _decision(
        self, job: Job, policy: Policy, verdict: PolicyDecision, outputs: ModelOutputs, models: dict[str, Any]
    ) -> Decision:
        return Decision(
            job_id=job.id,
            action=verdict.action,
            policy=policy.name,
            policy_version=policy.version,
            caption=outputs.caption,
            text=None if outputs.text is None else [line.public() for line in outputs.text],
            categories={name: result.model_dump(mode="json") for name, result in verdict.categories.items()},
            evidence=[item.model_dump(mode="json") for item in verdict.evidence],
            tags=[tag.model_dump(mode="json") for tag in verdict.tags],
            contradictions=[item.model_dump(mode="json") for item in verdict.contradictions],
            reason=verdict.reason[:2000],
            models=models,
            duration_ms=_since_start(job),
        )

    def _shadow_plans(
        self, policy: Policy, context: Mapping[str, Any], loaded: frozenset[Capability]
    ) -> list[ShadowPlan]:
        """Each shadow of `policy` with what it needs, or why it cannot run on this job (never failing the job)."""
        plans: list[ShadowPlan] = []
        for shadow in self.registry.shadows_of(policy.name):
            try:
                shadow_needs = shadow.requirements(context)
                _check_capabilities(shadow, shadow_needs, loaded)
            except PolicyError as exc:
                plans.append((shadow, None, exc))
                continue
            except ModtagError as exc:
                plans.append((shadow, None, PolicyError(exc.message, code=exc.code)))
                continue
            plans.append((shadow, shadow_needs, None))
        return plans

    def _image_bytes(self, job: Job) -> bytes | None:
        """The image's bytes; None for a URL whose file is a video (worker/url_media.py stored it on the job)."""
        if job.blob_key:
            with self.lifecycle.dependencies.watch(Dependency.BLOB_STORE):
                return self.blobs.get(job.blob_key)
        if not job.image_url:
            raise ModtagError("job has neither an uploaded image nor an image_url", code="job_invalid")
        return fetch_url_media(job, self.settings, self.blobs, self.lifecycle.dependencies)

    def _fail(self, job: Job, code: str, message: str) -> JobResult:
        result = self.lifecycle.fail(job, code, message)
        send_callbacks(self.settings, job)
        return result

    def _retry(self, job: Job, error: ModtagError) -> JobResult:
        result = self.lifecycle.retry(job, error)  # raises RetryLater while attempts remain
        send_callbacks(self.settings, job)
        return result


def _since_start(job: Job) -> float:
    return round((utcnow() - as_utc(job.started_at or utcnow())).total_seconds() * 1000, 1)


# What a reused decision copies from the earlier one; its id, job, timing and `reused_from` are its own.
_REUSED_FIELDS = frozenset(
    [
        "action",
        "policy",
        "policy_version",
        "caption",
        "text",
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


def _all_needs(policies: Mapping[str, Policy]) -> Requirements:
    """What every loaded policy needs without a job's context, merged: the families to load and what to warm."""
    needs = RequirementsBuilder()
    for policy in policies.values():
        needs.add(policy.requirements())
    return needs.build()


def _check_capabilities(policy: Policy, needs: Requirements, loaded: frozenset[Capability]) -> None:
    missing = needs.model_capabilities - loaded
    if missing:
        names = ", ".join(sorted(capability.value for capability in missing))
        raise ModelError(
            f"policy '{policy.name}' needs {names}, which no model this worker loaded computes "
            "(the policy arrived in a reload); restart the worker to load the models for it",
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

"""Offline policy tools on the worker's code path: replay a policy over stored jobs; test one against example images.

Both run in-process through the worker's inference service: the same decoding, model outputs and
evaluation as a worker, loading only the models the work at hand needs (a replay whose checks are all
unchanged loads none).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlmodel import Session, col, select

from core import embeddings
from core.banks import BankMatcher
from core.blobs import open_blob_store
from core.db import session_scope
from core.errors import InvalidField, ModtagError, PolicyError
from core.hashes import BankMatch, ImageHashes
from core.images import ImageLimits, decode_image
from core.settings import Settings
from core.tables import Decision, Job, JobStatus
from core.urls import fetch_image_bytes
from policies import ModelOutputs, Policy, PolicyDecision, Requirements, decide
from policies.capabilities import Capability
from policies.replay import missing_requirements, outputs_from_evidence
from worker.families import FAMILIES, Family
from worker.inference import InferenceService

ACTIONS = ("allow", "review", "block")
_T = TypeVar("_T")
CASE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class ReplayedJob:
    """One stored job re-decided by the new policy."""

    job_id: str
    decided_at: datetime
    old_action: str
    new_action: str | None  # None: skipped (see `skipped`)
    changed: list[str] = field(default_factory=list)  # "weapons: review -> block"
    inferred: bool = False  # the new policy asked the models something the stored evidence lacks
    skipped: str | None = None


@dataclass
class ReplayReport:
    policy: str
    version: str
    target: str  # the policy whose stored jobs were re-decided
    jobs: list[ReplayedJob]
    roles_loaded: list[str]  # the models loaded for what the stored evidence lacked

    @property
    def changed(self) -> list[ReplayedJob]:
        """Jobs whose action or any category's action would change."""
        decided = [job for job in self.jobs if job.new_action is not None]
        return [job for job in decided if job.changed or job.new_action != job.old_action]

    def confusion(self) -> dict[str, dict[str, int]]:
        """Counts of (stored action -> replayed action)."""
        table = {old: dict.fromkeys(ACTIONS, 0) for old in ACTIONS}
        for job in self.jobs:
            if job.new_action is not None:
                table.setdefault(job.old_action, dict.fromkeys(ACTIONS, 0))[job.new_action] += 1
        return table


@dataclass
class CaseResult:
    """One example image of `modtag policy test`: what was expected and what the policy decided."""

    path: Path
    expected: str
    actual: str | None = None
    reason: str = ""
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.actual == self.expected


def replay_policy(
    policy: Policy,
    settings: Settings,
    *,
    since: datetime,
    until: datetime | None = None,
    target: str | None = None,
    tenant: str | None = None,
    limit: int = 1000,
    families: Sequence[Family] = FAMILIES,
) -> ReplayReport:
    """Re-decide the stored decisions of `target` (default: the policy `policy` shadows, else its own name).

    Stored evidence supplies every model output the new policy shares with the old; inference runs only
    for what is new, on the stored image (or the URL, fetched again).
    """
    target = target or policy.shadows or policy.name
    with session_scope(settings.resolved_database_url) as session:
        query = (
            select(Job, Decision)
            .join(Decision, col(Decision.job_id) == col(Job.id))
            .where(Job.policy == target, Job.status == JobStatus.DONE, col(Decision.decided_at) >= since)
        )
        if until is not None:
            query = query.where(col(Decision.decided_at) < until)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        rows = list(session.exec(query.order_by(col(Decision.decided_at), col(Decision.id)).limit(limit)).all())

    replayed: list[ReplayedJob] = []
    pending: list[tuple[ReplayedJob, Job, Decision, ModelOutputs, Requirements]] = []
    matcher = BankMatcher()
    index = embeddings.ExampleIndex()
    with session_scope(settings.resolved_database_url) as session:
        for job, decision in rows:
            entry = ReplayedJob(job.id, decision.decided_at, decision.action, None)
            replayed.append(entry)
            if job.media == "video":
                # Its evidence is the deciding frame's only: a replay would judge the video by one frame.
                entry.skipped = "a video is decided on all its frames, which replay does not decode (video_skipped)"
                continue
            try:
                needs = policy.requirements(job.context or {})
            except PolicyError as exc:
                entry.skipped = f"{exc.message} ({exc.code})"
                continue
            stored = outputs_from_evidence(decision.evidence, decision.caption, decision.text)
            stored = stored.merged(ModelOutputs(position=job.listing_index))
            stored = stored.merged(_bank_lookups(session, matcher, job, needs, stored))
            stored = stored.merged(_example_lookups(session, index, job, needs, stored))
            if unanswered := [query.set for query in needs.examples if query.set not in stored.examples]:
                entry.skipped = (
                    f"no image embedding is stored for this job, so example set(s) {', '.join(unanswered)} cannot "
                    "be looked up (embedding_missing)"
                )
                continue
            pending.append((entry, job, decision, stored, missing_requirements(needs, stored)))

    capabilities: set[Capability] = set()
    for _, _, _, _, missing in pending:
        capabilities |= missing.model_capabilities
    with InferenceService(settings, families=families) as inference:
        if capabilities:
            inference.start(capabilities)
        roles = sorted(inference.describe().get("roles", {}))
        fresh = _infer(inference, settings, [(job, missing) for _, job, _, _, missing in pending if not missing.empty])
    for entry, job, decision, stored, missing in pending:
        try:
            outputs = stored.merged(fresh[job.id]) if not missing.empty else stored
            verdict = decide(policy, outputs, job.context or {})
        except KeyError:
            continue  # `fresh` has no entry: the image could not be read; `_infer` set the reason below
        except ModtagError as exc:
            entry.skipped = f"{exc.message} ({exc.code})"
            continue
        entry.inferred = not missing.empty
        entry.new_action = verdict.action
        entry.changed = _category_changes(decision.categories, verdict)
    for entry in replayed:
        if entry.new_action is None and entry.skipped is None:
            entry.skipped = fresh.errors.get(entry.job_id, "not re-decided")
    return ReplayReport(policy.name, policy.version, target, replayed, roles)


def run_cases(
    policy: Policy,
    cases_dir: Path,
    settings: Settings,
    *,
    families: Sequence[Family] = FAMILIES,
) -> list[CaseResult]:
    """Decide every example image under `cases_dir/{allow,review,block}/` and compare with its folder.

    A `<image>.json` beside an image is that job's context (a listing's title, description, attributes);
    `cases_dir/context.json`, if present, is the context of images without their own.
    """
    cases = find_cases(cases_dir)
    default_context = _read_context(cases_dir / "context.json") if (cases_dir / "context.json").is_file() else {}
    results = [CaseResult(path, expected) for path, expected in cases]
    plans: list[tuple[CaseResult, dict[str, Any], Requirements]] = []
    for result in results:
        sidecar = result.path.with_suffix(".json")
        try:
            context = _read_context(sidecar) if sidecar.is_file() else default_context
            plans.append((result, context, policy.requirements(context)))
        except ModtagError as exc:
            result.error = f"{exc.message} ({exc.code})"
    capabilities: set[Capability] = set()
    for _, _, needs in plans:
        capabilities |= needs.model_capabilities
    limits = ImageLimits.from_settings(settings)
    with InferenceService(settings, families=families) as inference:
        if capabilities:
            inference.start(capabilities)
        for chunk in _chunks(plans, settings.batch_max_images):
            ready = []
            for result, context, needs in chunk:
                try:
                    ready.append((result, context, decode_image(result.path.read_bytes(), limits), needs))
                except (ModtagError, OSError) as exc:
                    result.error = getattr(exc, "message", str(exc))
            work = [(image, needs) for _, _, image, needs in ready]
            outputs = inference.infer_all(work) if capabilities and ready else [ModelOutputs() for _ in ready]
            for (result, context, _, needs), output in zip(ready, outputs, strict=True):
                try:
                    # Example images belong to no tenant: no bank holds them, so hash checks score 0.
                    unbanked = ModelOutputs(banks={query.bank: BankMatch(query.bank) for query in needs.banks})
                    verdict = decide(policy, unbanked.merged(output), context)
                except ModtagError as exc:
                    result.error = f"{exc.message} ({exc.code})"
                    continue
                result.actual, result.reason = verdict.action, verdict.reason
    return results


def _bank_lookups(
    session: Session, matcher: BankMatcher, job: Job, needs: Requirements, stored: ModelOutputs
) -> ModelOutputs:
    """The banks a new policy's hash checks name that the stored evidence lacks, matched as they are now."""
    queries = [(query.bank, query.max_distance) for query in needs.banks if query.bank not in stored.banks]
    if not queries:
        return ModelOutputs()
    # A job decided before its hashes were recorded (or erased) matches by neither hash.
    hashes = ImageHashes(job.image_sha256 or "", job.pdq or "0" * 64, job.pdq_quality or 0)
    return ModelOutputs(banks=matcher.lookup(session, job.tenant, queries, hashes))


def _example_lookups(
    session: Session, index: embeddings.ExampleIndex, job: Job, needs: Requirements, stored: ModelOutputs
) -> ModelOutputs:
    """The example sets a new policy's examples checks name that the stored evidence lacks (or holds fewer
    neighbours of than a check now asks for), looked up as they are now with the job's stored image embedding."""
    queries = [
        (query.set, query.k)
        for query in needs.examples
        if query.set not in stored.examples or len(stored.examples[query.set]) < query.k
    ]
    if not queries:
        return ModelOutputs()
    embedding = embeddings.get(session, job.id)
    if embedding is None:  # no embedding: sets with stored neighbours keep them, the others stay unanswered
        return ModelOutputs()
    return ModelOutputs(
        examples=index.lookup(session, job.tenant, queries, embedding.model, embedding.vector, exclude=job.id)
    )


def find_cases(cases_dir: Path) -> list[tuple[Path, str]]:
    """(image, expected action) for every image in `allow/`, `review/` and `block/` (subfolders included)."""
    if not cases_dir.is_dir():
        raise InvalidField(f"{cases_dir}: not a directory of cases", code="cases_invalid")
    unexpected = sorted(
        p.name for p in cases_dir.iterdir() if p.is_dir() and p.name not in ACTIONS and not p.name.startswith(".")
    )
    if unexpected:
        raise InvalidField(
            f"{cases_dir}: unexpected folder(s) {', '.join(unexpected)}; cases go in allow/, review/ and block/",
            code="cases_invalid",
        )
    cases = [
        (path, action)
        for action in ACTIONS
        if (cases_dir / action).is_dir()
        for path in sorted((cases_dir / action).rglob("*"))
        if path.is_file() and path.suffix.lower() in CASE_SUFFIXES and not path.name.startswith(".")
    ]
    if not cases:
        raise InvalidField(
            f"{cases_dir}: no images found; put examples in allow/, review/ and block/ subfolders",
            code="cases_invalid",
        )
    return cases


class _Fresh(dict[str, ModelOutputs]):
    """Freshly computed outputs by job id, and why a job's image could not be read."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, str] = {}


def _infer(inference: InferenceService, settings: Settings, work: Sequence[tuple[Job, Requirements]]) -> _Fresh:
    fresh = _Fresh()
    if not inference.capabilities or not work:
        return fresh
    blobs = open_blob_store(settings)
    limits = ImageLimits.from_settings(settings)
    for chunk in _chunks(list(work), settings.batch_max_images):
        ready = []
        for job, missing in chunk:
            try:
                data = blobs.get(job.blob_key) if job.blob_key else _fetch(job, settings)
                ready.append((job, decode_image(data, limits), missing))
            except (ModtagError, OSError) as exc:
                fresh.errors[job.id] = f"the image cannot be read again: {getattr(exc, 'message', exc)}"
        outputs = inference.infer_all([(image, missing) for _, image, missing in ready])
        for (job, _, _), output in zip(ready, outputs, strict=True):
            fresh[job.id] = output
    return fresh


def _fetch(job: Job, settings: Settings) -> bytes:
    if not job.image_url:
        raise ModtagError("the job has neither a stored image nor an image_url", code="job_invalid")
    return fetch_image_bytes(
        job.image_url,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.fetch_timeout_s,
        allow_private=settings.fetch_allow_private,
    )


def _category_changes(stored: Mapping[str, Any], verdict: PolicyDecision) -> list[str]:
    changes = []
    for name in dict.fromkeys([*stored, *verdict.categories]):
        before = (stored.get(name) or {}).get("action", "-")
        after = verdict.categories[name].action if name in verdict.categories else "-"
        if before != after:
            changes.append(f"{name}: {before} -> {after}")
    return changes


def _read_context(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidField(f"{path}: not a readable JSON context: {exc}", code="cases_invalid") from None
    if not isinstance(value, dict):
        raise InvalidField(f"{path}: a context is a JSON object (title, description, attributes)", code="cases_invalid")
    return value


def _chunks(items: list[_T], size: int) -> Iterator[list[_T]]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + size]

"""A video (or an animated image) decided as one subject: known frames first, then the models, one verdict.

The worker copies the stored video to a temporary file (ranged reads, never whole in memory) and decodes it once
with the sampler (core/video.py), which yields the kept frames with their PDQ hashes. Every kept frame is matched
against the policy's hash banks as it arrives, before any model runs: when a model-free category blocks on some
frame, the video is decided by that frame (its match and its time in the evidence) and no model runs at all. The
other frames wait on disk (lossless PNG, so pixel measures see the decoded frame) and then go through the
micro-batcher like images, a window at a time, so a video's frames share batches with other jobs' images and may
spread over several batches. Each frame is decided alone; the subject rule (policies/subject.py, shared with
listings) reads the frames' typed decisions together: per category the worst frame, overall the worst action with
the evidence of the frame that caused it. The decision adds `frames` (each judged frame's time, action and top
scores) and `segments` (where a category fired over consecutive frames), and the worker draws a filmstrip of the
judged frames (fired ones framed in red) into the blob store for the dashboard.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from core import jobs
from core.banks import BankMatcher
from core.blobs import BlobStore
from core.db import session_scope
from core.dependencies import Dependency, DependencyRecord
from core.errors import ModtagError, TransientError
from core.hashes import ImageHashes
from core.queues import Priority
from core.settings import Settings
from core.tables import Decision, Job
from core.video import Sampling, VideoLimits, probe, sample_frames
from policies import ModelOutputs, Policy, PolicyDecision, Requirements, decide
from policies.evaluate import decide_model_free
from policies.subject import SubjectPart, frame_summary, segments, subject_verdict
from worker.inference import InferenceService
from worker.pixels import PixelBudget, pixel_bytes

log = logging.getLogger(__name__)

FILMSTRIP_HEIGHT = 90  # pixels of each frame in the filmstrip
FILMSTRIP_FRAMES = 16  # at most this many frames drawn (evenly chosen, the deciding frame always among them)
_FIRED = (220, 38, 38)  # the frame drawn around a frame on which some category fired
_BORDER = 4


@dataclass(frozen=True)
class JudgedFrame:
    """One kept frame as the verdict reads it: when, what its decision was, and what the models said of it."""

    time_s: float
    pdq: str
    decision: PolicyDecision
    caption: str | None = None
    text: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class VideoDecision:
    """The decision row to store, and how it was reached without models (`hash_match`) or with them ("")."""

    decision: Decision
    how: str


class VideoJudge:
    """Decides a video job on its kept frames for one worker process (shares its banks, blobs and inference)."""

    def __init__(
        self,
        settings: Settings,
        *,
        blobs: BlobStore,
        banks: BankMatcher,
        inference: InferenceService,
        dependencies: DependencyRecord,
        pixels: PixelBudget,
    ) -> None:
        self.settings = settings
        self.blobs = blobs
        self.banks = banks
        self.inference = inference
        self.dependencies = dependencies
        self.pixels = pixels

    def judge(self, job: Job, policy: Policy, context: Mapping[str, Any], needs: Requirements) -> VideoDecision:
        """The video's decision (not stored); VideoError for a video that cannot be read to its end."""
        if not job.blob_key:
            raise ModtagError("a video job needs its video in the blob store", code="job_invalid")
        try:
            spool = tempfile.TemporaryDirectory(prefix="modtag-video-")
        except OSError as exc:
            raise _spool_failed(exc) from exc
        with spool as work:
            folder = Path(work)
            video = folder / "video"
            self._copy(job.blob_key, video)
            return self._judge_file(job, policy, context, needs, video, folder)

    def _judge_file(
        self, job: Job, policy: Policy, context: Mapping[str, Any], needs: Requirements, video: Path, folder: Path
    ) -> VideoDecision:
        limits = VideoLimits.from_settings(self.settings)
        duration_s = probe(video, limits).duration_s
        sha256 = job.image_sha256 or job.blob_key or ""
        queries = [(query.bank, query.max_distance) for query in needs.banks]
        known: list[ModelOutputs] = []
        times: list[float] = []
        pdqs: list[str] = []
        model_free: list[PolicyDecision | None] = []
        thumbs: list[Image.Image] = []
        banked: int | None = None
        for number, frame in enumerate(sample_frames(video, Sampling.from_settings(self.settings), limits)):
            hashes = ImageHashes(sha256=sha256, pdq=frame.pdq, pdq_quality=frame.pdq_quality)
            with self.dependencies.watch(Dependency.DATABASE), session_scope(self._url) as session:
                if number == 0:  # the job is known by its first frame's PDQ hash
                    jobs.record_hashes(session, job, sha256, frame.pdq, frame.pdq_quality)
                matches = self.banks.lookup(session, job.tenant, queries, hashes) if queries else {}
            outputs = ModelOutputs(banks=matches)
            free = decide_model_free(policy, outputs, context) if queries else None
            if banked is None and free is not None and free.action == "block":
                banked = number  # decided: the rest is still hashed for its frames and segments, never modelled
            known.append(outputs)
            times.append(frame.time_s)
            pdqs.append(frame.pdq)
            model_free.append(free)
            thumbs.append(_thumbnail(frame.image))
            if banked is None and not needs.empty:
                _spool(frame.image, folder / f"{number}.png")
            frame.image.close()
        if not times:
            raise ModtagError("the video has no frame that could be judged", code="video_corrupt")
        if banked is not None:
            judged = [
                JudgedFrame(t, pdq, free or _nothing(policy))
                for t, pdq, free in zip(times, pdqs, model_free, strict=True)
            ]
            return VideoDecision(self._decision(job, policy, judged, duration_s, thumbs, models={}), "hash_match")
        judged = self._infer(job, policy, context, needs, known, times, pdqs, folder)
        return VideoDecision(self._decision(job, policy, judged, duration_s, thumbs, self.inference.describe()), "")

    def _infer(
        self,
        job: Job,
        policy: Policy,
        context: Mapping[str, Any],
        needs: Requirements,
        known: Sequence[ModelOutputs],
        times: Sequence[float],
        pdqs: Sequence[str],
        folder: Path,
    ) -> list[JudgedFrame]:
        """Each frame's decision: through the models a window of frames at a time (none when the policy needs none)."""
        judged: list[JudgedFrame] = []
        window = max(1, 2 * self.settings.batch_max_images)
        for start in range(0, len(times), window):
            numbers = range(start, min(start + window, len(times)))
            if needs.empty:
                fresh = [ModelOutputs() for _ in numbers]
            else:
                # A window's frames are held against the worker's decoded-bytes budget like images (worker/pixels.py).
                held = sum(_rgb_bytes(folder / f"{number}.png") for number in numbers)
                with self.pixels.hold(held, timeout_s=self.settings.job_timeout_s):
                    images = [_load(folder / f"{number}.png") for number in numbers]
                    fresh = self.inference.infer_all(
                        [(image, needs) for image in images],
                        timeout_s=self.settings.job_timeout_s,
                        bulk=Priority.of(job.priority) is Priority.BULK,
                    )
                    for image in images:
                        image.close()
            for number, outputs in zip(numbers, fresh, strict=True):
                merged = known[number].merged(outputs)
                text = None if merged.text is None else [line.public() for line in merged.text]
                decision = decide(policy, merged, context)
                judged.append(JudgedFrame(times[number], pdqs[number], decision, merged.caption, text))
        return judged

    def _decision(
        self,
        job: Job,
        policy: Policy,
        judged: Sequence[JudgedFrame],
        duration_s: float,
        thumbs: Sequence[Image.Image],
        models: dict[str, Any],
    ) -> Decision:
        """The stored decision: the subject rule's verdict over the frames, with the deciding frame's evidence."""
        verdict = subject_verdict([SubjectPart(number, frame.decision) for number, frame in enumerate(judged)])
        deciding = judged[verdict.decided_by or 0]
        at = deciding.time_s
        fired = [any(result.fired for result in frame.decision.categories.values()) for frame in judged]
        return Decision(
            job_id=job.id,
            action=verdict.action,
            policy=policy.name,
            policy_version=policy.version,
            caption=deciding.caption,
            text=deciding.text,
            categories={name: category.result.model_dump(mode="json") for name, category in verdict.categories.items()},
            evidence=[{**entry.model_dump(mode="json"), "time_s": at} for entry in deciding.decision.evidence],
            tags=_merged_tags(judged),
            contradictions=[item.model_dump(mode="json") for item in deciding.decision.contradictions],
            reason=f"{deciding.decision.reason} (the frame at {at:g} s; {len(judged)} frames judged)"[:2000],
            models=models,
            frames=[{**frame_summary(frame.time_s, frame.decision), "pdq": frame.pdq} for frame in judged],
            segments=[segment.public() for segment in segments([(f.time_s, f.decision) for f in judged], duration_s)],
            filmstrip_key=self._filmstrip(thumbs, fired, verdict.decided_by or 0),
        )

    def _filmstrip(self, thumbs: Sequence[Image.Image], fired: Sequence[bool], deciding: int) -> str | None:
        """A JPEG of the judged frames side by side, fired ones framed in red, stored as a blob; None when the
        store cannot take it now (the decision matters more than its picture)."""
        chosen = _spread(len(thumbs), FILMSTRIP_FRAMES, deciding)
        width = sum(thumbs[number].width for number in chosen)
        strip = Image.new("RGB", (width, FILMSTRIP_HEIGHT), (0, 0, 0))
        x = 0
        for number in chosen:
            thumb = thumbs[number]
            strip.paste(thumb, (x, 0))
            if fired[number]:
                ImageDraw.Draw(strip).rectangle(
                    (x, 0, x + thumb.width - 1, FILMSTRIP_HEIGHT - 1), outline=_FIRED, width=_BORDER
                )
            x += thumb.width
        buffer = io.BytesIO()
        strip.save(buffer, format="JPEG", quality=80)
        try:
            with self.dependencies.watch(Dependency.BLOB_STORE):
                return self.blobs.put(buffer.getvalue())
        except ModtagError as exc:
            log.warning("the filmstrip was not stored: %s", exc.code)
            return None

    def _copy(self, key: str, target: Path) -> None:
        """The stored video into `target`, chunk by chunk."""
        with self.dependencies.watch(Dependency.BLOB_STORE), target.open("wb") as handle:
            for chunk in self.blobs.read_range(key, 0, self.blobs.size(key)):
                handle.write(chunk)

    @property
    def _url(self) -> str:
        return self.settings.resolved_database_url


def _spread(count: int, most: int, keep: int) -> list[int]:
    """At most `most` of `count` positions, evenly spread, `keep` among them, in order."""
    if count <= most:
        return list(range(count))
    chosen = {round(step * (count - 1) / (most - 1)) for step in range(most)}
    if keep not in chosen:
        chosen.discard(min(chosen, key=lambda number: abs(number - keep)))
        chosen.add(keep)
    return sorted(chosen)


def _thumbnail(image: Image.Image) -> Image.Image:
    width = max(1, round(image.width * FILMSTRIP_HEIGHT / max(1, image.height)))
    return image.convert("RGB").resize((min(width, 4 * FILMSTRIP_HEIGHT), FILMSTRIP_HEIGHT), Image.Resampling.BILINEAR)


def _spool(image: Image.Image, path: Path) -> None:
    """A frame kept on the worker's disk until its window goes to the models (lossless, quick to write)."""
    try:
        image.save(path, format="PNG", compress_level=1)
    except OSError as exc:
        raise _spool_failed(exc) from exc


def _spool_failed(exc: OSError) -> TransientError:
    """The worker's temporary disk failed, not the video: another attempt (maybe on another worker) may do."""
    return TransientError(f"the worker could not keep a video's frames on its disk: {exc}", code="video_spool_failed")


def _rgb_bytes(path: Path) -> int:
    """The bytes a spooled frame takes once loaded as RGB, read from its header (nothing decoded)."""
    with Image.open(path, formats=["PNG"]) as image:
        return pixel_bytes(image.width, image.height, "RGB")


def _load(path: Path) -> Image.Image:
    with Image.open(path, formats=["PNG"]) as image:
        image.load()
        return image.convert("RGB")


def _nothing(policy: Policy) -> PolicyDecision:
    return PolicyDecision(action="allow", categories={}, evidence=[], policy=policy.name, policy_version=policy.version)


def _merged_tags(judged: Sequence[JudgedFrame]) -> list[dict[str, Any]]:
    """Each tag once, at the best score any frame gave it."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for frame in judged:
        for tag in frame.decision.tags:
            key = (tag.group, tag.tag)
            if key not in best or best[key]["score"] < tag.score:
                best[key] = tag.model_dump(mode="json")
    return sorted(best.values(), key=lambda tag: -float(tag["score"]))

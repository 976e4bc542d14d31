"""A video decided as one subject by the worker runtime (real models, real database, real PyAV decoding): banked
frames first and without models, then the frames through the models, one verdict with frames and segments.

Tiny random models give arbitrary probe scores, so what must fire is deterministic: a hash bank and a `photo`
pixel measure (a white-bordered shot in the middle of a clip). The probe category is there to make the models run
on the frames the banks let through; its thresholds sit above what it can score.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update
from sqlmodel import col

from core.banks import NewBankItem, add_items, create_bank, get_bank, import_items
from core.blobs import LocalBlobStore
from core.db import session_scope
from core.hashes import pdq_hash
from core.jobs import NewJob, create_job, get_decision
from core.principals import cli_principal
from core.public import DecisionPublic
from core.settings import Settings
from core.tables import Job, utcnow
from core.videobanks import frame_items
from tests.support.jobs import stored
from tests.support.photos import photo_image
from tests.support.videos import Shot, animated_image, write_clip
from worker.lifecycle import RetryLater
from worker.replay import replay_policy
from worker.runtime import WorkerRuntime

pytestmark = pytest.mark.timeout(300)

SIZE = (160, 120)
POLICY = """\
name: clips
description: known content, white-bordered shots, and a probe the tiny models cannot reach
categories:
  - name: known
    description: copies of images removed before
    block: 0.5
    checks:
      - kind: hash
        bank: known
  - name: white_card
    description: a shot on a white background (a title card)
    review: 0.5
    checks:
      - kind: photo
        measure: white_background
        max: 0.5
  - name: weapons
    description: a probe the random models answer at random
    review: 0.999999
    block: 1.0
    checks:
      - kind: probe
        question: is there a weapon in the picture?
"""


def white_card(name: str) -> Image.Image:
    """The photo small in the middle of a white frame: its border is all white."""
    card = Image.new("RGB", SIZE, (255, 255, 255))
    card.paste(photo_image(name, (80, 60)), (40, 30))
    return card


@pytest.fixture
def runtime(tmp_path: Path, database_url: str, tiny_models_dir: Path) -> WorkerRuntime:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "clips.yaml").write_text(POLICY)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        models="tiny-random",
        models_cache_dir=tiny_models_dir.parent,
        policies_dir=policies,
        batch_wait_ms=1,
        batch_max_images=2,  # a clip's frames spread over several batches
        reuse_decisions=False,
    )
    with session_scope(database_url) as session:
        actor = cli_principal("default")
        bank = create_bank(session, actor, "known", "removed before")
        pdq, quality = pdq_hash(photo_image("astronaut", SIZE))
        add_items(session, actor, bank, [NewBankItem(sha256=None, pdq=pdq, pdq_quality=quality, note="astronaut")])
        session.commit()
    return WorkerRuntime.from_settings(settings)


def judge(runtime: WorkerRuntime, path: Path) -> tuple[Job, dict[str, Any]]:
    """The video stored and queued as a video job, processed by the runtime; the job and its decision (API shape)."""
    key = LocalBlobStore(runtime.settings.resolved_blob_dir).put(path.read_bytes())
    url = runtime.settings.resolved_database_url
    with session_scope(url) as session:
        job, _ = create_job(session, NewJob(tenant="default", policy="clips", policy_version=None, source="upload",
                                            blob_key=key, image_sha256=key))  # fmt: skip
        session.execute(update(Job).where(col(Job.id) == job.id).values(media="video"))
        session.commit()
    result = runtime.process(job.id)
    assert result.outcome == "done", stored(url, job.id).error_message
    with session_scope(url) as session:
        decision = get_decision(session, job.id)
        assert decision is not None
        return stored(url, job.id), DecisionPublic.from_row(decision).model_dump(mode="json")


def test_a_video_is_decided_on_its_frames_banks_first(runtime: WorkerRuntime, tmp_path: Path) -> None:
    photos = {name: photo_image(name, SIZE) for name in ("coffee", "astronaut", "chelsea", "rocket")}

    # A banked image shown from second 20 to 25: blocked by the bank, no model ran, the evidence says 20 s.
    banked = write_clip(
        tmp_path / "banked.mp4",
        [Shot(20, photos["coffee"]), Shot(5, photos["astronaut"]), Shot(5, photos["chelsea"])],
        size=SIZE,
        fps=5,
    )
    job, decision = judge(runtime, banked)
    assert decision["action"] == "block" and set(decision["categories"]) == {"known"}, decision
    [evidence] = decision["evidence"]
    assert evidence["kind"] == "hash" and evidence["score"] == 1.0 and evidence["time_s"] == pytest.approx(20, abs=0.3)
    assert decision["models"] == {} and "20 s" in decision["reason"]
    assert [s["category"] for s in decision["segments"]] == ["known"]
    [segment] = decision["segments"]
    assert segment["start_s"] == pytest.approx(20, abs=0.3) and segment["end_s"] == pytest.approx(25, abs=0.3)
    assert [frame["action"] for frame in decision["frames"]].count("block") == 1
    assert job.media == "video" and job.pdq is not None

    # A clean clip is allowed, judged by the models frame by frame (several batches of 2).
    clean = write_clip(tmp_path / "clean.mp4", [Shot(3, photos["coffee"]), Shot(3, photos["chelsea"])], size=SIZE)
    _, decision = judge(runtime, clean)
    assert decision["action"] == "allow" and decision["segments"] == [], decision
    assert set(decision["categories"]) == {"known", "white_card", "weapons"} and decision["models"]["random"]
    assert [frame["time_s"] for frame in decision["frames"]][:1] == [0.0] and len(decision["frames"]) >= 2
    assert all(set(frame["scores"]) <= set(decision["categories"]) for frame in decision["frames"])

    # A white card in the middle fires there, and only there: that is the segment.
    middle = write_clip(
        tmp_path / "middle.mp4",
        [Shot(4, photos["rocket"]), Shot(4, white_card("coffee")), Shot(4, photos["chelsea"])],
        size=SIZE,
        fps=5,
    )
    job, decision = judge(runtime, middle)
    assert decision["action"] == "review" and decision["categories"]["white_card"]["fired"], decision
    [segment] = decision["segments"]
    assert segment["category"] == "white_card" and segment["max_score"] == 1.0
    assert segment["start_s"] == pytest.approx(4, abs=0.3) and segment["end_s"] == pytest.approx(8, abs=0.3)
    assert decision["evidence"][0]["time_s"] == segment["start_s"]
    fired = [frame["time_s"] for frame in decision["frames"] if frame["action"] == "review"]
    assert fired and all(4 - 0.3 <= time_s < 8 for time_s in fired)
    assert all(len(frame["pdq"]) == 64 for frame in decision["frames"])

    # A reviewer banks the fired frames (what the review queue's bank-frames does): a clip showing the card again,
    # shorter and later, is blocked by the bank, no model run.
    url = runtime.settings.resolved_database_url
    with session_scope(url) as session:
        bank = get_bank(session, "default", "known")
        items = frame_items(job, get_decision(session, job.id), "a title card")
        added, skipped = import_items(session, cli_principal("default"), bank, items)
    assert len(added) == len({frame["pdq"] for frame in decision["frames"] if frame["action"] == "review"})
    assert skipped == 0 and all("a title card (frame at" in (row.note or "") for row in added)
    again = write_clip(
        tmp_path / "again.mp4", [Shot(3, photos["chelsea"]), Shot(2, white_card("coffee"))], size=SIZE, fps=5
    )
    _, decision = judge(runtime, again)
    assert decision["action"] == "block" and decision["models"] == {}, decision
    assert decision["evidence"][0]["time_s"] == pytest.approx(3, abs=0.3)


def test_a_replay_skips_videos_saying_why(runtime: WorkerRuntime, tmp_path: Path) -> None:
    """A video's evidence is its deciding frame's only: replaying it would judge it by one frame."""
    clip = write_clip(tmp_path / "clip.mp4", [Shot(2, photo_image("coffee", SIZE))], size=SIZE)
    job, _ = judge(runtime, clip)
    report = replay_policy(runtime.policies["clips"], runtime.settings, since=utcnow() - timedelta(hours=1))
    [entry] = report.jobs
    assert entry.job_id == job.id and entry.new_action is None and "video" in (entry.skipped or "")


def test_an_animated_gif_is_judged_on_its_frames_not_its_first(runtime: WorkerRuntime, tmp_path: Path) -> None:
    gif = animated_image(tmp_path, "GIF", names=("coffee", "astronaut", "chelsea"), frame_ms=1000, size=SIZE)
    _, decision = judge(runtime, gif)
    assert decision["action"] == "block" and decision["evidence"][0]["time_s"] == pytest.approx(1.0), decision
    assert len(decision["frames"]) == 3 and decision["frames"][0]["action"] == "allow"


def test_a_worker_disk_that_cannot_take_the_frames_is_a_retry_not_a_failure(
    runtime: WorkerRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real filesystem fault: the temporary directory is a file, so nothing can be created under it."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))
    clip = write_clip(tmp_path / "clip.mp4", [Shot(1, photo_image("coffee", SIZE))], size=SIZE)
    key = LocalBlobStore(runtime.settings.resolved_blob_dir).put(clip.read_bytes())
    url = runtime.settings.resolved_database_url
    with session_scope(url) as session:
        job, _ = create_job(session, NewJob(tenant="default", policy="clips", policy_version=None, source="upload",
                                            blob_key=key, image_sha256=key, media="video"))  # fmt: skip
    with pytest.raises(RetryLater) as retried:
        runtime.process(job.id)
    assert retried.value.code == "video_spool_failed"
    assert stored(url, job.id).status == "queued"  # back in the queue, to be judged when the disk takes it

"""core/videobanks.frame_items: which of a video decision's frames a reviewer's bank-frames adds, and its refusals."""

from __future__ import annotations

import pytest

from core.errors import Conflict, InvalidField
from core.tables import Decision, Job
from core.videobanks import frame_items

PDQ = ["a" * 64, "b" * 64, "c" * 64]


def video(frames: list[dict[str, object]] | None) -> tuple[Job, Decision]:
    job = Job(policy="p", source="upload", media="video")
    return job, Decision(job_id=job.id, action="review", policy="p", policy_version="v", frames=frames)


def test_the_fired_frames_by_default_all_when_none_fired_or_those_named() -> None:
    frames = [
        {"time_s": 0.0, "action": "allow", "scores": {}, "pdq": PDQ[0]},
        {"time_s": 20.0, "action": "block", "scores": {}, "pdq": PDQ[1]},
        {"time_s": 25.0, "action": "review", "scores": {}, "pdq": PDQ[1]},  # the same hash: banked once
        {"time_s": 30.0, "action": "allow", "scores": {}, "pdq": PDQ[2]},
    ]
    job, decision = video(frames)
    fired = frame_items(job, decision, "seen")
    assert [item.pdq for item in fired] == [PDQ[1]] and fired[0].note == "seen (frame at 20 s)"
    assert fired[0].sha256 is None
    calm = [{**frame, "action": "allow"} for frame in frames]
    assert [item.pdq for item in frame_items(*video(calm), "n")] == PDQ
    assert [item.pdq for item in frame_items(job, decision, "n", [30.0, 0.0])] == [PDQ[2], PDQ[0]]


def test_refusals_say_what_to_do() -> None:
    job, decision = video([{"time_s": 1.5, "action": "allow", "scores": {}, "pdq": PDQ[0]}])
    with pytest.raises(InvalidField) as missing:
        frame_items(job, decision, "n", [2.0])
    assert missing.value.code == "frame_not_found" and "1.5" in missing.value.message
    with pytest.raises(Conflict) as unjudged:
        frame_items(*video(None), "n")
    assert unjudged.value.code == "video_not_judged"
    with pytest.raises(Conflict):
        frame_items(job, None, "n")
    image = Job(policy="p", source="upload")
    with pytest.raises(InvalidField) as not_video:
        frame_items(image, decision, "n")
    assert not_video.value.code == "not_a_video"
    # Erased frames keep no hash: nothing to bank.
    with pytest.raises(Conflict):
        frame_items(*video([{"time_s": 0.0, "action": "block", "scores": {}}]), "n")

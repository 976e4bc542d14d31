"""The subject rule (policies/subject.py): many images' typed decisions, one verdict; a timed subject's segments."""

from __future__ import annotations

from policies.evaluate import CategoryResult, PolicyDecision
from policies.subject import Segment, SubjectPart, frame_summary, segments, subject_verdict


def decision(**scores: tuple[str, float]) -> PolicyDecision:
    """A decision whose categories have these (action, score)."""
    categories = {
        name: CategoryResult(score=score, action=action, fired=action != "allow", decided_by="c" if score else None)
        for name, (action, score) in scores.items()
    }
    worst = max((action for action, _ in scores.values()), key=["allow", "review", "block"].index, default="allow")
    return PolicyDecision(action=worst, categories=categories, evidence=[], policy="p", policy_version="v")


def test_the_worst_part_decides_each_category_and_the_subject() -> None:
    parts = [
        SubjectPart(0, decision(weapons=("allow", 0.2), nudity=("review", 0.7))),
        SubjectPart(1, decision(weapons=("block", 0.95), nudity=("allow", 0.1))),
        SubjectPart(2, decision(weapons=("block", 0.97), nudity=("review", 0.6))),
    ]
    verdict = subject_verdict(parts)
    assert verdict.action == "block" and verdict.decided_by == 2
    assert verdict.categories["weapons"].decided_by == 2 and verdict.categories["weapons"].fired_in == (1, 2)
    assert verdict.categories["nudity"].action == "review" and verdict.categories["nudity"].result.score == 0.7
    assert verdict.categories["nudity"].decided_by == 0


def test_ties_go_to_the_earliest_part_and_best_of_categories_to_the_best() -> None:
    same = [SubjectPart(i, decision(known=("block", 1.0), match=("review", 0.9 - i / 10))) for i in range(3)]
    verdict = subject_verdict(same, best_of={"match"})
    assert verdict.categories["known"].decided_by == 0 and verdict.decided_by == 0
    assert verdict.categories["match"].decided_by == 2 and verdict.categories["match"].fired_in == (0, 1, 2)
    assert subject_verdict([]).action == "allow" and subject_verdict([]).decided_by is None


def test_segments_are_runs_of_consecutive_fired_frames() -> None:
    frames = [
        (0.0, decision(bank=("allow", 0.0), text=("allow", 0.1))),
        (20.0, decision(bank=("block", 1.0), text=("review", 0.8))),
        (25.0, decision(bank=("allow", 0.0), text=("review", 0.9))),
        (26.0, decision(bank=("allow", 0.0), text=("allow", 0.2))),
        (40.0, decision(bank=("allow", 0.0), text=("review", 0.7))),
    ]
    assert segments(frames, end_s=45.5) == [
        Segment("bank", 20.0, 25.0, 1.0),
        Segment("text", 20.0, 26.0, 0.9),
        Segment("text", 40.0, 45.5, 0.7),
    ]
    # Without the clip's length, a run to the end stops at its last frame; a clean clip has none.
    assert segments(frames[-1:]) == [Segment("text", 40.0, 40.0, 0.7)]
    assert segments([(t, decision(bank=("allow", 0.0))) for t in (0.0, 1.0)], end_s=2.0) == []


def test_a_frame_summary_keeps_its_time_action_and_top_scores() -> None:
    summary = frame_summary(3.14159, decision(a=("allow", 0.1), b=("review", 0.8), c=("allow", 0.3), d=("block", 0.95)))
    assert summary == {"time_s": 3.142, "action": "block", "scores": {"d": 0.95, "b": 0.8, "c": 0.3}}

"""Many images, one verdict: the rule that reads the decisions of a subject's images together.

A subject is anything judged on several images: a listing's photos, a video's sampled frames, an animation's frames.
Each image is decided alone (`policies.evaluate.decide`); this rule turns those typed decisions into the subject's
action, category by category: the worst image decides (the most severe action, then the highest score, then the
earliest image), and its result is the evidence of the subject's verdict. A caller may name categories that the
best image decides instead (a listing asks "does some photo match the description?"). Pure: no I/O, no models.

For a timed subject (a video), `segments` finds where a category fired over consecutive frames, and `frame_summary`
writes what a decision keeps of each judged frame.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from policies.evaluate import SEVERITY, Action, CategoryResult, PolicyDecision

# How many of a frame's categories its summary keeps (the highest scores): enough to see why, small per frame.
TOP_SCORES = 3


@dataclass(frozen=True)
class SubjectPart:
    """One image of a subject: its 0-based position (a photo's place, a frame's order) and its decision."""

    position: int
    decision: PolicyDecision


@dataclass(frozen=True)
class CategoryVerdict:
    """A category read across the subject: its action, the part that decided it, and the parts where it fired."""

    action: Action
    result: CategoryResult  # the deciding part's own result for the category (score, reason, decided_by)
    decided_by: int  # the deciding part's position
    fired_in: tuple[int, ...]


@dataclass(frozen=True)
class SubjectVerdict:
    """The subject's action, each category's verdict, and the part whose decision explains the action."""

    action: Action
    categories: dict[str, CategoryVerdict]
    decided_by: int | None  # None for a subject without decided parts


@dataclass(frozen=True)
class Segment:
    """Where a category fired over consecutive judged frames of a timed subject, and its highest score there."""

    category: str
    start_s: float
    end_s: float
    max_score: float

    def public(self) -> dict[str, object]:
        return {"category": self.category, "start_s": self.start_s, "end_s": self.end_s, "max_score": self.max_score}


def subject_verdict(parts: Sequence[SubjectPart], *, best_of: Collection[str] = ()) -> SubjectVerdict:
    """The subject's verdict: per category the worst part's result (for a category in `best_of`, the best part's),
    and overall the most severe category action, explained by the part that decided the highest-scoring category
    with that action."""
    names: dict[str, None] = {}
    for part in parts:
        names.update(dict.fromkeys(part.decision.categories))
    categories: dict[str, CategoryVerdict] = {}
    for name in names:
        results = [(p.position, p.decision.categories[name]) for p in parts if name in p.decision.categories]
        if name in best_of:
            position, result = min(results, key=lambda pair: (SEVERITY[pair[1].action], pair[1].score, pair[0]))
        else:
            position, result = max(results, key=lambda pair: (SEVERITY[pair[1].action], pair[1].score, -pair[0]))
        fired = tuple(where for where, each in results if each.fired)
        categories[name] = CategoryVerdict(result.action, result, position, fired)
    if not categories:
        return SubjectVerdict("allow", {}, parts[0].position if parts else None)
    action: Action = max((verdict.action for verdict in categories.values()), key=SEVERITY.__getitem__)
    deciding = max(
        (verdict for verdict in categories.values() if verdict.action == action),
        key=lambda verdict: (verdict.result.score, -verdict.decided_by),
    )
    return SubjectVerdict(action, categories, deciding.decided_by)


def segments(frames: Sequence[tuple[float, PolicyDecision]], end_s: float | None = None) -> list[Segment]:
    """The runs of consecutive judged frames (time in seconds, decision; in time order) where a category fired.

    A run starts at its first frame's time and ends where the next judged frame begins, since the frames skipped
    between two judged ones look like the earlier one; a run that lasts to the last frame ends at `end_s` (the
    clip's duration) when known, else at that frame's time. Ordered by start, then category.
    """
    found: list[Segment] = []
    open_runs: dict[str, tuple[float, float]] = {}  # category -> (start_s, highest score so far)
    for index, (time_s, decision) in enumerate(frames):
        following = frames[index + 1] if index + 1 < len(frames) else None
        ends_at = following[0] if following is not None else max(time_s, end_s if end_s is not None else time_s)
        for name, result in decision.categories.items():
            if result.fired:
                start, best = open_runs.get(name, (time_s, 0.0))
                open_runs[name] = (start, max(best, result.score))
        for name in list(open_runs):
            going_on = following is not None and following[1].categories.get(name)
            if not (going_on and going_on.fired):
                start, best = open_runs.pop(name)
                found.append(Segment(name, _seconds(start), _seconds(ends_at), round(best, 6)))
    return sorted(found, key=lambda segment: (segment.start_s, segment.category))


def frame_summary(time_s: float, decision: PolicyDecision) -> dict[str, object]:
    """What a decision keeps of one judged frame: its time, its action and its top category scores."""
    top = sorted(decision.categories.items(), key=lambda item: (-item[1].score, item[0]))[:TOP_SCORES]
    return {"time_s": _seconds(time_s), "action": decision.action, "scores": {name: r.score for name, r in top}}


def _seconds(value: float) -> float:
    return round(float(value), 3)

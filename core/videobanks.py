"""A video job's judged frames as bank items: what a reviewer saw, banked, so that copies are blocked before the models.

The frames' PDQ hashes are the decision's own (`decision.frames[].pdq`, from the worker's sampler), so nothing is
decoded again. By default the frames on which some category fired are banked (all frames when none fired: the
reviewer saw what the machine missed); a caller may name the frames by their time instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session

from core import banks
from core.banks import NewBankItem
from core.errors import Conflict, InvalidField
from core.jobs import get_decision, tenant_job
from core.principals import Principal
from core.tables import BankItem, Decision, Job

MAX_FRAMES = 1000  # frames banked per request at most (a decision holds MODTAG_VIDEO_MAX_FRAMES, 300 by default)


def bank_frames(
    session: Session, actor: Principal, job_id: str, bank_name: str, times: Sequence[float] | None, note: str | None
) -> tuple[list[BankItem], int]:
    """Bank the actor's tenant's video job's frames (`frame_items`) into its bank `bank_name`; the rows added and how
    many hashes the bank held already (one `bank.import` audit entry). 404 for another tenant's job or bank."""
    bank = banks.get_bank(session, actor.tenant, bank_name)
    job = tenant_job(session, job_id, actor.tenant)
    label = f"frame of video job {job.id}" + (f": {note}" if note else "")
    items = frame_items(job, get_decision(session, job.id), label, times)
    return banks.import_items(session, actor, bank, items, source={"video_job": job.id})


def frame_items(
    job: Job, decision: Decision | None, note: str, times: Sequence[float] | None = None
) -> list[NewBankItem]:
    """The bank items of the job's judged frames (`times`, or the fired ones), one per distinct PDQ hash.

    422 `not_a_video` for an image job; 409 `video_not_judged` before the worker judged its frames; 422
    `frame_not_found` for a time that is no judged frame's (the message lists the frames' times).
    """
    if job.media != "video":
        raise InvalidField(
            "this job is an image, not a video: bank it with `add_to_bank` or /v1/banks", code="not_a_video"
        )
    frames = [frame for frame in (decision.frames if decision is not None else None) or [] if frame.get("pdq")]
    if not frames:
        raise Conflict(
            "this video's frames have not been judged yet; try again once the job is done", code="video_not_judged"
        )
    if times is not None:
        by_time = {round(float(frame["time_s"]), 3): frame for frame in frames}
        missing = [time_s for time_s in times if round(time_s, 3) not in by_time]
        if missing:
            known = ", ".join(f"{time_s:g}" for time_s in sorted(by_time))
            raise InvalidField(
                f"no judged frame at {missing[0]:g} s; the judged frames are at {known} s", code="frame_not_found"
            )
        chosen = [by_time[round(time_s, 3)] for time_s in times]
    else:
        chosen = [frame for frame in frames if frame.get("action") != "allow"] or frames
    items: dict[str, NewBankItem] = {}
    for frame in chosen[:MAX_FRAMES]:
        pdq = str(frame["pdq"])
        if pdq not in items:
            label = f"{note} (frame at {float(frame['time_s']):g} s)"
            items[pdq] = NewBankItem(sha256=None, pdq=pdq, pdq_quality=None, note=label[:2000])
    return list(items.values())

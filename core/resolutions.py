"""A review resolution that also banks what was seen: "block and add to bank", for the API and the dashboard alike.

Everything that can refuse (the action, the bank, the job's hashes or a video's judged frames) is checked before
the resolution is written, so a refused request changes nothing. The resolution and the bank items are then written
with their own audit entries (`review.resolved`, `bank.item_add`).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlmodel import Session

from core import banks, review
from core.errors import InvalidField
from core.jobs import get_decision, tenant_job
from core.principals import Principal
from core.tables import ReviewItem
from core.videobanks import frame_items


def resolve(
    session: Session,
    job_id: str,
    actor: Principal,
    action: str,
    reason: str,
    *,
    labels: Mapping[str, bool] | None = None,
    add_to_bank: str | None = None,
) -> ReviewItem:
    """Resolve the review item `action` with `reason`; with `add_to_bank` (a block only), bank the job's image hashes
    (a video: its judged frames' PDQ hashes) in that bank of the actor's tenant too."""
    if add_to_bank is None:
        return review.resolve(session, job_id, actor, action, reason, labels=labels)  # type: ignore[arg-type]
    if action != "block":
        raise InvalidField("`add_to_bank` goes with a `block` resolution", code="add_to_bank_needs_block")
    bank = banks.get_bank(session, actor.tenant, add_to_bank)  # 404 before anything changes
    if bank.kind == "allow":
        raise InvalidField(
            f"bank {bank.name!r} is an allow-list: a blocked image goes into a block bank", code="bank_is_allow_list"
        )
    job = tenant_job(session, job_id, actor.tenant)
    note = f"review of job {job.id}: {reason}"[:2000]
    # A video is banked by its frames (the fired ones), not by the first frame's hash alone.
    items = (
        frame_items(job, get_decision(session, job.id), note) if job.media == "video" else [banks.job_item(job, note)]
    )
    item = review.resolve(session, job_id, actor, action, reason, labels=labels)  # type: ignore[arg-type]
    banks.add_items(session, actor, bank, items)
    return item

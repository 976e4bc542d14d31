"""Example sets: a tenant's named sets of labelled images (positive / negative) that `examples` checks vote with.

An item is one of the tenant's jobs with a label; its vector is the job's image embedding (core/embeddings.py),
stored by the worker. An item whose job has no embedding yet (an upload still queued) is `pending` and does not
vote until the worker has embedded it. Every change writes an audit entry in the same transaction and bumps the
set's `revision`, which workers compare to reload their copy of the set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import delete, func, update
from sqlmodel import Session, col, select

from core import audit
from core.errors import Conflict, InvalidField, NotFound
from core.principals import Principal
from core.tables import ID_PATTERN, ExampleItem, ExampleSet, Job, JobEmbedding

SET_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_ITEMS_PAGE = 1000


class Label(StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"


@dataclass(frozen=True)
class SetCounts:
    """How many items a set holds, by label, and how many of them still wait for their embedding."""

    positive: int = 0
    negative: int = 0
    pending: int = 0


def check_set_name(name: str) -> str:
    if not SET_NAME.match(name):
        raise InvalidField(
            "an example set name is 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            code="example_set_name_invalid",
        )
    return name


def parse_label(value: object) -> Label:
    """`positive` or `negative`; 422 `example_label_invalid` otherwise."""
    try:
        return Label(str(value))
    except ValueError:
        raise InvalidField(
            f"`label` must be 'positive' or 'negative', not {str(value)[:40]!r}", code="example_label_invalid"
        ) from None


def create_set(session: Session, actor: Principal, name: str, description: str | None) -> ExampleSet:
    """A new empty set of the actor's tenant; 409 `example_set_exists` when the name is taken."""
    check_set_name(name)
    if _find_set(session, actor.tenant, name) is not None:
        raise Conflict(f"the example set {name!r} already exists", code="example_set_exists")
    example_set = ExampleSet(tenant=actor.tenant, name=name, description=description)
    session.add(example_set)
    audit.record(
        session, actor, "example_set.create", "example_set", example_set.id, before=None, after=_set_record(example_set)
    )
    session.commit()
    return example_set


def list_sets(session: Session, tenant: str) -> list[tuple[ExampleSet, SetCounts]]:
    """The tenant's sets by name, each with its counts."""
    sets = session.exec(select(ExampleSet).where(ExampleSet.tenant == tenant).order_by(col(ExampleSet.name))).all()
    return [(example_set, counts(session, example_set)) for example_set in sets]


def counts(session: Session, example_set: ExampleSet) -> SetCounts:
    rows = session.exec(
        select(ExampleItem.label, col(JobEmbedding.job_id).is_(None), func.count())
        .select_from(ExampleItem)
        .join(JobEmbedding, col(JobEmbedding.job_id) == col(ExampleItem.job_id), isouter=True)
        .where(ExampleItem.set_id == example_set.id)
        .group_by(col(ExampleItem.label), col(JobEmbedding.job_id).is_(None))
    ).all()
    by_label = {Label.POSITIVE.value: 0, Label.NEGATIVE.value: 0}
    pending = 0
    for label, missing, count in rows:
        by_label[label] = by_label.get(label, 0) + int(count)
        pending += int(count) if missing else 0
    return SetCounts(by_label[Label.POSITIVE], by_label[Label.NEGATIVE], pending)


def get_set(session: Session, tenant: str, name: str) -> ExampleSet:
    """The tenant's set called `name`; 404 `example_set_not_found` otherwise (another tenant's set included)."""
    example_set = _find_set(session, tenant, name) if SET_NAME.match(name) else None
    if example_set is None:
        raise NotFound(
            f"no example set named {name[:64]!r}; create it with POST /v1/example-sets", code="example_set_not_found"
        )
    return example_set


def delete_set(session: Session, actor: Principal, example_set: ExampleSet) -> int:
    """Delete a set and its items (the jobs stay); how many items went."""
    removed = session.execute(delete(ExampleItem).where(col(ExampleItem.set_id) == example_set.id))
    items = int(getattr(removed, "rowcount", 0) or 0)
    audit.record(
        session,
        actor,
        "example_set.delete",
        "example_set",
        example_set.id,
        before={**_set_record(example_set), "items": items},
        after=None,
    )
    session.delete(example_set)
    session.commit()
    return items


def add_item(session: Session, actor: Principal, example_set: ExampleSet, job: Job, label: Label) -> ExampleItem:
    """Add one of the tenant's jobs to the set with `label`; 409 `example_exists` when the job is already in it."""
    if job.tenant != example_set.tenant:  # the caller looked the job up by tenant; this is the last guard
        raise NotFound(f"no job {job.id!r}", code="job_not_found")
    if job.erased_at is not None:
        raise Conflict("this job's image was erased: it cannot be an example", code="job_erased")
    known = session.exec(
        select(ExampleItem).where(ExampleItem.set_id == example_set.id, ExampleItem.job_id == job.id)
    ).first()
    if known is not None:
        raise Conflict(
            f"job {job.id} is already a {known.label} example of {example_set.name!r}; delete it to relabel it",
            code="example_exists",
        )
    item = ExampleItem(set_id=example_set.id, job_id=job.id, tenant=example_set.tenant, label=label.value)
    item.added_by = actor.key_id
    session.add(item)
    audit.record(
        session,
        actor,
        "example_set.item_add",
        "example_item",
        item.id,
        before=None,
        after=_item_record(item, example_set),
    )
    _bump(session, example_set)
    session.commit()
    return item


def list_items(
    session: Session, example_set: ExampleSet, *, after: str | None = None, limit: int = 100
) -> list[tuple[ExampleItem, bool]]:
    """The set's items by job id, after the job id `after`, each with whether its embedding is stored."""
    query = (
        select(ExampleItem, col(JobEmbedding.job_id).is_not(None))
        .join(JobEmbedding, col(JobEmbedding.job_id) == col(ExampleItem.job_id), isouter=True)
        .where(ExampleItem.set_id == example_set.id)
        .order_by(col(ExampleItem.job_id))
        .limit(min(max(limit, 1), MAX_ITEMS_PAGE))
    )
    if after:
        query = query.where(col(ExampleItem.job_id) > after)
    return [(item, bool(embedded)) for item, embedded in session.exec(query).all()]


def get_item(session: Session, example_set: ExampleSet, job_id: str) -> tuple[ExampleItem, bool]:
    """The set's item for job `job_id`, and whether it is embedded; 404 `example_not_found` otherwise."""
    item = (
        session.exec(
            select(ExampleItem).where(ExampleItem.set_id == example_set.id, ExampleItem.job_id == job_id)
        ).first()
        if ID_PATTERN.match(job_id)
        else None
    )
    if item is None:
        raise NotFound(f"example set {example_set.name!r} has no job {job_id[:64]!r}", code="example_not_found")
    return item, session.get(JobEmbedding, job_id) is not None


def delete_item(session: Session, actor: Principal, example_set: ExampleSet, job_id: str) -> None:
    item, _ = get_item(session, example_set, job_id)
    audit.record(
        session,
        actor,
        "example_set.item_delete",
        "example_item",
        item.id,
        before=_item_record(item, example_set),
        after=None,
    )
    session.delete(item)
    _bump(session, example_set)
    session.commit()


def _find_set(session: Session, tenant: str, name: str) -> ExampleSet | None:
    return session.exec(select(ExampleSet).where(ExampleSet.tenant == tenant, ExampleSet.name == name)).first()


def _bump(session: Session, example_set: ExampleSet) -> None:
    # In SQL, so two writers at once both count: workers reload the set after either.
    session.execute(
        update(ExampleSet).where(col(ExampleSet.id) == example_set.id).values(revision=col(ExampleSet.revision) + 1)
    )


def _set_record(example_set: ExampleSet) -> dict[str, object]:
    return {"name": example_set.name, "description": example_set.description}


def _item_record(item: ExampleItem, example_set: ExampleSet) -> dict[str, object]:
    return {"set": example_set.name, "job_id": item.job_id, "label": item.label}

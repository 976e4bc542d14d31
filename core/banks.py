"""Hash banks: a tenant's named lists of known images, their audited changes, and matching a job's image against them.

Every change (a bank created, an item added or deleted, a list imported) writes an audit entry in the same
transaction and bumps the bank's `revision`: a worker keeps one PDQ index per bank and rebuilds it only when that
number moved, so a lookup costs one small query plus the index search (core/pdqindex.py).

A bank's `kind` is `block` (a match is evidence against the image) or `allow` (an allow-list: known-good images,
such as a platform's own logo or a famous artwork that copies of are fine). When the image matches an allow bank,
every block bank's match for it is suppressed: it stays visible (`BankMatch.allowed_by`) but no longer counts.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from sqlalchemy import func, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from core import audit
from core.db import session_scope
from core.errors import Conflict, InvalidField, NotFound
from core.hashes import DEFAULT_MAX_DISTANCE, PDQ_MIN_QUALITY, BankMatch, ImageHashes
from core.pdqindex import PdqIndex
from core.principals import Principal
from core.tables import ID_PATTERN, Bank, BankItem, Job

BANK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_IMPORT_ITEMS = 100_000  # one request's worth; larger lists go in several imports
BankKind = Literal["block", "allow"]
BANK_KINDS: tuple[BankKind, ...] = ("block", "allow")
_EXPORT_PAGE = 1000
_INSERT_BATCH = 5000


@dataclass(frozen=True)
class NewBankItem:
    """An item to add: at least one of the hashes (validated by core.hashes.parse_*)."""

    sha256: str | None = None
    pdq: str | None = None
    pdq_quality: int | None = None
    note: str | None = None


def check_bank_name(name: str) -> str:
    if not BANK_NAME.match(name):
        raise InvalidField(
            "a bank name is 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            code="bank_name_invalid",
        )
    return name


def create_bank(
    session: Session, actor: Principal, name: str, description: str | None, kind: BankKind = "block"
) -> Bank:
    """A new empty bank of the actor's tenant; 409 `bank_exists` when the name is taken."""
    check_bank_name(name)
    if kind not in BANK_KINDS:
        raise InvalidField("a bank's kind is `block` or `allow`", code="bank_kind_invalid")
    if _find_bank(session, actor.tenant, name) is not None:
        raise Conflict(f"the bank {name!r} already exists", code="bank_exists")
    bank = Bank(tenant=actor.tenant, name=name, description=description, kind=kind)
    session.add(bank)
    audit.record(session, actor, "bank.create", "bank", bank.id, before=None, after=_bank_record(bank))
    session.commit()
    return bank


def list_banks(session: Session, tenant: str) -> list[tuple[Bank, int]]:
    """The tenant's banks by name, each with its item count."""
    counts = dict(
        session.exec(
            select(BankItem.bank_id, func.count()).where(BankItem.tenant == tenant).group_by(col(BankItem.bank_id))
        ).all()
    )
    banks = session.exec(select(Bank).where(Bank.tenant == tenant).order_by(col(Bank.name))).all()
    return [(bank, int(counts.get(bank.id, 0))) for bank in banks]


def get_bank(session: Session, tenant: str, name: str) -> Bank:
    """The tenant's bank called `name`; 404 `bank_not_found` otherwise (another tenant's bank included)."""
    bank = _find_bank(session, tenant, name) if BANK_NAME.match(name) else None
    if bank is None:
        raise NotFound(f"no bank named {name[:64]!r}; create it with POST /v1/banks", code="bank_not_found")
    return bank


def import_items(
    session: Session,
    actor: Principal,
    bank: Bank,
    items: Sequence[NewBankItem],
    *,
    source: Mapping[str, object] | None = None,
) -> tuple[list[BankItem], int]:
    """Add the items whose hash the bank does not hold yet (an item is its SHA-256, else its PDQ hash), so importing
    a list twice adds it once; returns the rows added and how many items were skipped.

    One `bank.import` audit entry records the import (`source`: its format and counts), not one per hash."""
    if len(items) > MAX_IMPORT_ITEMS:
        raise InvalidField(f"at most {MAX_IMPORT_ITEMS} items per request", code="bank_import_too_large")
    held: set[tuple[str, str]] = set()
    for column, kind in ((BankItem.sha256, "sha256"), (BankItem.pdq, "pdq")):
        wanted = sorted({value for new in items if (value := getattr(new, kind)) is not None})
        for start in range(0, len(wanted), 1000):  # bounded IN lists
            chunk = wanted[start : start + 1000]
            found = session.exec(select(column).where(BankItem.bank_id == bank.id, col(column).in_(chunk))).all()
            held.update((kind, str(value)) for value in found)
    fresh = []
    for new in items:
        identity = ("sha256", new.sha256) if new.sha256 is not None else ("pdq", new.pdq or "")
        if identity not in held:
            held.add(identity)  # a hash twice in one request is added once
            fresh.append(new)
    skipped = len(items) - len(fresh)
    rows = _insert(session, actor, bank, fresh, audit_each=False) if fresh else []
    after = {"bank": bank.name, "added": len(rows), "skipped": skipped, **(source or {})}
    audit.record(session, actor, "bank.import", "bank", bank.id, before=None, after=after)
    session.commit()
    return rows, skipped


def add_items(session: Session, actor: Principal, bank: Bank, items: Sequence[NewBankItem]) -> list[BankItem]:
    """Add items to a bank in one transaction, each audited; the bank's revision moves once."""
    rows = _insert(session, actor, bank, items, audit_each=True)
    session.commit()
    return rows


def export_items(url: str, bank: Bank) -> Iterator[tuple[str, str | None, str | None, int | None, str | None, Any]]:
    """The bank's items as (id, sha256, pdq, pdq_quality, note, created_at), read in pages from the database at
    `url`, each page in its own short session, so a large export holds no transaction open while it is sent."""
    after = ""
    while True:
        with session_scope(url) as session:
            page = session.execute(
                sa_select(
                    col(BankItem.id),
                    col(BankItem.sha256),
                    col(BankItem.pdq),
                    col(BankItem.pdq_quality),
                    col(BankItem.note),
                    col(BankItem.created_at),
                )
                .where(col(BankItem.bank_id) == bank.id, col(BankItem.id) > after)
                .order_by(col(BankItem.id))
                .limit(_EXPORT_PAGE)
            ).all()
        yield from (tuple(row) for row in page)
        if len(page) < _EXPORT_PAGE:
            return
        after = page[-1][0]


def _insert(
    session: Session, actor: Principal, bank: Bank, items: Sequence[NewBankItem], *, audit_each: bool
) -> list[BankItem]:
    if not items:
        raise InvalidField("nothing to add: give an image, a pdq or a sha256", code="bank_item_empty")
    if len(items) > MAX_IMPORT_ITEMS:
        raise InvalidField(f"at most {MAX_IMPORT_ITEMS} items per request", code="bank_import_too_large")
    rows = []
    for new in items:
        if new.sha256 is None and new.pdq is None:
            raise InvalidField("an item needs a pdq or a sha256", code="bank_item_empty")
        row = BankItem(
            bank_id=bank.id,
            tenant=bank.tenant,
            sha256=new.sha256,
            pdq=new.pdq,
            pdq_quality=new.pdq_quality,
            note=new.note,
            added_by=actor.key_id,
        )
        if audit_each:
            session.add(row)
            audit.record(
                session, actor, "bank.item_add", "bank_item", row.id, before=None, after=_item_record(row, bank)
            )
        rows.append(row)
    if not audit_each:  # an import: plain multi-row INSERTs, several times faster than the ORM's unit of work
        columns = [column.name for column in BankItem.__table__.columns]  # type: ignore[attr-defined]
        for start in range(0, len(rows), _INSERT_BATCH):
            batch = rows[start : start + _INSERT_BATCH]
            session.execute(insert(BankItem), [{name: getattr(row, name) for name in columns} for row in batch])
    _bump(session, bank)
    return rows


def job_item(job: Job, note: str) -> NewBankItem:
    """A job's image as a bank item (its hashes as the worker recorded them); 409 when it has none yet."""
    if not job.image_sha256:
        raise Conflict("this job's image has no hashes yet (no worker has read it)", code="job_not_hashed")
    return NewBankItem(sha256=job.image_sha256, pdq=job.pdq, pdq_quality=job.pdq_quality, note=note[:2000])


def get_item(session: Session, bank: Bank, item_id: str) -> BankItem:
    item = session.get(BankItem, item_id) if ID_PATTERN.match(item_id) else None
    if item is None or item.bank_id != bank.id:
        raise NotFound(f"bank {bank.name!r} has no item {item_id[:64]!r}", code="bank_item_not_found")
    return item


def list_items(
    session: Session, bank: Bank, *, limit: int = 100, before: str | None = None
) -> tuple[list[BankItem], str | None]:
    """The bank's items newest first, `limit` at a time; `before` is the previous page's cursor (the id of its last
    item; an unknown one starts from the top). Returns the items and the next page's cursor."""
    query = select(BankItem).where(BankItem.bank_id == bank.id)
    last = session.get(BankItem, before) if before and ID_PATTERN.match(before) else None
    if last is not None and last.bank_id == bank.id:
        query = query.where(
            (col(BankItem.created_at) < last.created_at)
            | ((col(BankItem.created_at) == last.created_at) & (col(BankItem.id) < last.id))
        )
    rows = list(session.exec(query.order_by(col(BankItem.created_at).desc(), col(BankItem.id).desc()).limit(limit + 1)))
    return rows[:limit], rows[limit - 1].id if len(rows) > limit else None


def delete_item(session: Session, actor: Principal, bank: Bank, item_id: str) -> None:
    item = get_item(session, bank, item_id)
    audit.record(session, actor, "bank.item_delete", "bank_item", item.id, before=_item_record(item, bank), after=None)
    session.delete(item)
    _bump(session, bank)
    session.commit()


class BankMatcher:
    """Matches an image's hashes against a tenant's banks; one cached PDQ index per bank, rebuilt on change.

    Thread-safe: a worker's threads share it. Banks are read per lookup (a revision check), never
    across tenants: the query is keyed by the job's tenant.
    """

    def __init__(self) -> None:
        self._indexes: dict[str, tuple[int, PdqIndex, list[str]]] = {}  # bank id -> (revision, index, item ids)
        self._lock = threading.Lock()

    def lookup(
        self, session: Session, tenant: str, banks: Iterable[tuple[str, int]], hashes: ImageHashes
    ) -> dict[str, BankMatch]:
        """For each (bank name, max PDQ distance): the closest item, or a BankMatch without item.

        A bank the tenant does not have matches nothing (a policy may name a bank before it is created). When a
        block bank matched, the tenant's allow banks are searched too (at DEFAULT_MAX_DISTANCE): an allow-listed
        image's block matches come back with `allowed_by` set.
        """
        matches: dict[str, BankMatch] = {}
        for name, max_distance in banks:
            bank = _find_bank(session, tenant, name)
            matches[name] = BankMatch(name) if bank is None else self._match(session, bank, max_distance, hashes)
        if any(match.item is not None and match.kind == "block" for match in matches.values()):
            allowed = self.allowed(session, tenant, hashes)
            if allowed is not None:
                matches = {name: _suppressed(match, allowed) for name, match in matches.items()}
        return matches

    def allowed(self, session: Session, tenant: str, hashes: ImageHashes) -> str | None:
        """The first allow-list item ("bank/item") of the tenant that the image matches, or None."""
        for bank in session.exec(
            select(Bank).where(Bank.tenant == tenant, Bank.kind == "allow").order_by(col(Bank.name))
        ).all():
            match = self._match(session, bank, DEFAULT_MAX_DISTANCE, hashes)
            if match.item is not None:
                return f"{bank.name}/{match.item}"
        return None

    def match_signal(
        self, session: Session, tenant: str, signal_type: str, value: str, max_distance: int
    ) -> list[BankMatch]:
        """Every bank of the tenant holding `value` (a normalised `sha256` digest or `pdq` hash): its closest item,
        by bank name; block matches carry `allowed_by` when an allow bank matched too (what `/v1/lookup` answers)."""
        found = []
        for bank in session.exec(select(Bank).where(Bank.tenant == tenant).order_by(col(Bank.name))).all():
            match = (
                self._exact(session, bank, value)
                if signal_type == "sha256"
                else self._nearest(session, bank, value, max_distance)
            )
            if match.item is not None:
                found.append(match)
        allowed = next((f"{match.bank}/{match.item}" for match in found if match.kind == "allow"), None)
        return [_suppressed(match, allowed) for match in found] if allowed is not None else found

    def _match(self, session: Session, bank: Bank, max_distance: int, hashes: ImageHashes) -> BankMatch:
        exact = self._exact(session, bank, hashes.sha256)
        if exact.item is not None or not hashes.pdq_matchable:
            return exact
        return self._nearest(session, bank, hashes.pdq, max_distance)

    def _exact(self, session: Session, bank: Bank, sha256: str) -> BankMatch:
        item = session.exec(
            select(BankItem.id).where(BankItem.bank_id == bank.id, BankItem.sha256 == sha256).limit(1)
        ).first()
        if item is None:
            return BankMatch(bank.name, kind=bank.kind)
        return BankMatch(bank.name, item=item, distance=0, by="sha256", kind=bank.kind)

    def _nearest(self, session: Session, bank: Bank, pdq: str, max_distance: int) -> BankMatch:
        index, ids = self._index(session, bank)
        nearest = index.nearest(pdq, max_distance)
        if nearest is None:
            return BankMatch(bank.name, kind=bank.kind)
        return BankMatch(bank.name, item=ids[nearest.position], distance=nearest.distance, by="pdq", kind=bank.kind)

    def _index(self, session: Session, bank: Bank) -> tuple[PdqIndex, list[str]]:
        with self._lock:
            cached = self._indexes.get(bank.id)
            if cached is not None and cached[0] == bank.revision:
                return cached[1], cached[2]
            rows = session.exec(
                select(BankItem.id, BankItem.pdq).where(
                    BankItem.bank_id == bank.id,
                    col(BankItem.pdq).is_not(None),
                    # An item banked from a low-quality image would match unrelated flat images.
                    (col(BankItem.pdq_quality).is_(None)) | (col(BankItem.pdq_quality) >= PDQ_MIN_QUALITY),
                )
            ).all()
            ids = [item_id for item_id, _ in rows]
            index = PdqIndex([pdq for _, pdq in rows if pdq is not None])
            self._indexes[bank.id] = (bank.revision, index, ids)
            return index, ids


def _find_bank(session: Session, tenant: str, name: str) -> Bank | None:
    return session.exec(select(Bank).where(Bank.tenant == tenant, Bank.name == name)).first()


def _suppressed(match: BankMatch, allowed: str) -> BankMatch:
    return replace(match, allowed_by=allowed) if match.item is not None and match.kind == "block" else match


def _bump(session: Session, bank: Bank) -> None:
    # In SQL, so two writers at once both count: the index is rebuilt after either.
    session.execute(update(Bank).where(col(Bank.id) == bank.id).values(revision=col(Bank.revision) + 1))


def _bank_record(bank: Bank) -> dict[str, object]:
    return {"name": bank.name, "description": bank.description, "kind": bank.kind}


def _item_record(item: BankItem, bank: Bank) -> dict[str, object]:
    return {"bank": bank.name, "sha256": item.sha256, "pdq": item.pdq, "note": item.note}

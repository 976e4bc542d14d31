"""The audit log: every change to keys and to the review queue, who made it, when, before and after.

`record` adds the entry to the caller's session without committing, so an entry is written in the same
transaction as the change it describes: both or neither.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from core.errors import BadRequest
from core.principals import Principal
from core.tables import AuditEntry


def record(
    session: Session,
    actor: Principal,
    action: str,
    target_type: str,
    target_id: str,
    *,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    tenant: str | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        tenant=tenant or actor.tenant,
        actor_key_id=actor.key_id,
        actor_name=actor.name[:128],
        actor_role=actor.role.value if actor.via != "system" else None,
        action=action,
        target_type=target_type,
        target_id=target_id,
        before=before,
        after=after,
    )
    session.add(entry)
    return entry


def list_entries(
    session: Session,
    *,
    tenant: str,
    action: str | None = None,
    target_id: str | None = None,
    actor_key_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[AuditEntry], str | None]:
    """A tenant's entries, newest first, filtered; keyset paging on the entry id."""
    query = select(AuditEntry).where(AuditEntry.tenant == tenant)
    if action:
        # `review.` lists every review step; a full name lists one kind.
        query = query.where(
            col(AuditEntry.action).startswith(action) if action.endswith(".") else AuditEntry.action == action
        )
    if target_id:
        query = query.where(AuditEntry.target_id == target_id)
    if actor_key_id:
        query = query.where(AuditEntry.actor_key_id == actor_key_id)
    if since:
        query = query.where(col(AuditEntry.at) >= since)
    if until:
        query = query.where(col(AuditEntry.at) < until)
    if cursor:
        query = query.where(col(AuditEntry.id) < decode_cursor(cursor))
    query = query.order_by(col(AuditEntry.id).desc()).limit(limit + 1)
    rows = list(session.exec(query).all())
    next_cursor = encode_cursor(rows[limit - 1].id or 0) if len(rows) > limit else None
    return rows[:limit], next_cursor


def encode_cursor(entry_id: int) -> str:
    return base64.urlsafe_b64encode(f"a{entry_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("a") or not raw[1:].isdigit() or len(raw) > 20:
            raise ValueError(raw)
        return int(raw[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor is not one this API returned", code="invalid_cursor") from None

"""Signed webhooks (the Standard Webhooks specification): tenant secrets, signatures and the delivery log.

An event (core/events.py: a final job or listing, a review resolved) with a callback URL becomes one
`WebhookDelivery` row, whose id is the message's `webhook-id` and whose payload is the exact body (the Standard
Webhooks envelope): every attempt sends the same bytes under the same id, so a receiver can drop duplicates. An
admin's redelivery (`redeliver`) sends the same id and body again, with a fresh timestamp and signature, and
restarts the retry schedule. Every attempt says `User-Agent: modtag-webhooks/<version>`.

Delivery is at least once: the row is written before the first attempt, and a
failed attempt (a network error or a non-2xx answer) schedules the next one after `webhook_retry_intervals_s`
(exponential, over hours); past the last interval the delivery is `failed`. Each attempt is signed with every
live secret of the tenant: `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one
signature per secret, so a receiver can move to a rotated secret while the old one still signs (for
`webhook_secret_overlap_s`, a day by default).

Erasure (core/erasure.py) empties the deliveries of an erased job or listing: each row stays for the audit trail
(when, to which host, how it went) without its body or the URL's path and query, and a pending one is `dropped`.
A delivery recorded for a job already erased is written that way at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, or_, select, update

from core import __version__, audit
from core.errors import Conflict, NotFound
from core.principals import Principal
from core.settings import Settings
from core.tables import FINAL_STATUSES, ID_PATTERN, Job, WebhookDelivery, WebhookSecret, as_utc, iso, utcnow

SECRET_PREFIX = "whsec_"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
DROPPED = "dropped"  # its subject was erased before it was delivered: never sent again
USER_AGENT = f"modtag-webhooks/{__version__}"


def tenant_secret(session: Session, tenant: str) -> WebhookSecret:
    """The tenant's newest secret, made on first use."""
    row = session.exec(
        select(WebhookSecret).where(WebhookSecret.tenant == tenant).order_by(col(WebhookSecret.created_at).desc())
    ).first()
    if row is not None:
        return row
    row = WebhookSecret(tenant=tenant, secret=_new_secret())
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def rotate_secret(
    session: Session, tenant: str, overlap_s: int, *, revoke_old: bool = False, actor: Principal | None = None
) -> WebhookSecret:
    """A new secret for the tenant; the ones before it keep signing for `overlap_s` more seconds, or stop at once
    with `revoke_old` (a leaked secret). Audited under `actor` when given, in the same transaction."""
    now = utcnow()
    still_signing = or_(col(WebhookSecret.expires_at).is_(None), col(WebhookSecret.expires_at) > now)
    session.exec(
        update(WebhookSecret)  # type: ignore[call-overload]
        .where(col(WebhookSecret.tenant) == tenant)
        .where(still_signing if revoke_old else col(WebhookSecret.expires_at).is_(None))
        .values(expires_at=now if revoke_old else now + timedelta(seconds=overlap_s))
    )
    row = WebhookSecret(tenant=tenant, secret=_new_secret(), created_at=now)
    session.add(row)
    if actor is not None:
        # The secret itself never enters the audit log: which one, and whether the old ones stopped at once.
        session.flush()
        after = {"created_at": iso(now), "revoke_old": revoke_old, "overlap_s": 0 if revoke_old else overlap_s}
        audit.record(session, actor, "webhook_secret.rotate", "webhook_secret", row.id, before=None, after=after)
    session.commit()
    session.refresh(row)
    return row


def signing_secrets(session: Session, tenant: str) -> list[str]:
    """Every secret that signs now: the newest first, then those rotated out less than the overlap ago."""
    now = utcnow()
    tenant_secret(session, tenant)
    rows = session.exec(
        select(WebhookSecret)
        .where(WebhookSecret.tenant == tenant)
        .where(or_(col(WebhookSecret.expires_at).is_(None), col(WebhookSecret.expires_at) > now))
        .order_by(col(WebhookSecret.created_at).desc())
    ).all()
    return [row.secret for row in rows]


def signature_headers(secrets_: Sequence[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt, signed with each of `secrets_`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    signatures = [
        "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()
        for secret in secrets_
    ]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


def record_delivery(
    session: Session, *, tenant: str, event_type: str, subject_id: str, url: str, payload: bytes
) -> WebhookDelivery:
    """The delivery of this event for this subject, written once (a redelivered task finds the first one). It commits
    what the session holds with it: a listing's callback claim is made durable only together with its row."""
    existing = _find(session, event_type, subject_id, 0)
    if existing is not None:
        return existing
    row = add_delivery(
        session, tenant=tenant, event_type=event_type, subject_id=subject_id, sequence=0, url=url, payload=payload
    )
    try:
        session.commit()
    except IntegrityError:  # another worker wrote it first
        session.rollback()
        found = _find(session, event_type, subject_id, 0)
        assert found is not None
        return found
    session.refresh(row)
    return row


def add_delivery(
    session: Session, *, tenant: str, event_type: str, subject_id: str, sequence: int, url: str, payload: bytes
) -> WebhookDelivery:
    """A new delivery row, due now, added to the session: the caller commits it with the change it announces."""
    row = WebhookDelivery(
        id=f"msg_{secrets.token_hex(16)}",
        tenant=tenant,
        event_type=event_type,
        subject_id=subject_id,
        sequence=sequence,
        url=url,
        payload=payload.decode(),
        next_attempt_at=utcnow(),
    )
    if _erased_job(session, subject_id):
        _empty(row)
    session.add(row)
    return row


def redeliver(session: Session, delivery_id: str, actor: Principal) -> WebhookDelivery:
    """Send a message again (the same `webhook-id` and body; each attempt signs a fresh timestamp): pending and due
    now, with a fresh retry schedule (`attempts` counts from 0 again). The tenant's own messages only (another's id
    is 404); an erased one (`dropped`, its body gone) is 409 `delivery_erased`. Audited, in the same transaction.
    The workers' sender sends it on its next poll (`webhook_poll_s`)."""
    row = session.get(WebhookDelivery, delivery_id) if ID_PATTERN.match(delivery_id) else None
    if row is None or row.tenant != actor.tenant:
        raise NotFound(f"no webhook delivery with id {delivery_id[:64]!r}", code="delivery_not_found")
    if row.status == DROPPED or not row.payload:
        raise Conflict(
            f"the webhook {row.id} was emptied when its {row.event_type.split('.')[0]} was erased; there is nothing "
            "to send",
            code="delivery_erased",
        )
    before = _delivery_state(row)
    now = utcnow()
    row.status, row.attempts, row.next_attempt_at = PENDING, 0, now
    row.delivered_at = None
    row.redeliveries += 1
    row.redelivered_at = now
    session.add(row)
    session.flush()
    audit.record(
        session, actor, "webhook.redeliver", "webhook_delivery", row.id, before=before, after=_delivery_state(row)
    )
    session.commit()
    session.refresh(row)
    return row


def erase_deliveries(session: Session, subject_ids: Sequence[str]) -> int:
    """Empty the deliveries of erased subjects (jobs, listings): the rows stay for the audit trail, without their
    bodies or the path and query of their URL (a token may be there); pending ones are dropped, never sent again.
    How many were still pending. The caller commits, in the erasure's transaction.

    An attempt a sender claimed before this commit may still be on the wire; none starts after it.
    """
    rows = session.exec(select(WebhookDelivery).where(col(WebhookDelivery.subject_id).in_(list(subject_ids)))).all()
    pending = 0
    for row in rows:
        pending += row.status == PENDING
        _empty(row)
        session.add(row)
    return pending


def claim_attempt(session: Session, delivery_id: str, lease_s: float) -> WebhookDelivery | None:
    """Take the next attempt of a due delivery (a conditional UPDATE: one sender per attempt), or None."""
    now = utcnow()
    claimed = session.exec(
        update(WebhookDelivery)  # type: ignore[call-overload]
        .where(
            col(WebhookDelivery.id) == delivery_id,
            col(WebhookDelivery.status) == PENDING,
            col(WebhookDelivery.next_attempt_at) <= now,
        )
        .values(next_attempt_at=now + timedelta(seconds=lease_s))
    )
    session.commit()
    if claimed.rowcount != 1:
        return None
    return session.get(WebhookDelivery, delivery_id)


def finish_attempt(
    session: Session, delivery_id: str, settings: Settings, *, status_code: int | None, error: str | None
) -> WebhookDelivery:
    """Record an attempt: delivered on 2xx; else the next attempt after the next interval, or failed past the last."""
    row = session.get(WebhookDelivery, delivery_id)
    assert row is not None
    now = utcnow()
    row.attempts += 1
    row.last_status_code = status_code
    row.last_error = error[:500] if error else None
    if status_code is not None and 200 <= status_code < 300:
        row.status, row.delivered_at, row.next_attempt_at = DELIVERED, now, None
    elif row.attempts > len(settings.webhook_retry_intervals_s):
        row.status, row.next_attempt_at = FAILED, None
    else:
        row.next_attempt_at = now + timedelta(seconds=settings.webhook_retry_intervals_s[row.attempts - 1])
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def due_deliveries(session: Session, limit: int = 100) -> list[str]:
    """Ids of pending deliveries whose next attempt is due, oldest first."""
    return list(
        session.exec(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == PENDING, col(WebhookDelivery.next_attempt_at) <= utcnow())
            .order_by(col(WebhookDelivery.next_attempt_at))
            .limit(limit)
        ).all()
    )


def jobs_missing_delivery(
    session: Session, event_types: Sequence[str], finished_before: datetime, limit: int = 100
) -> list[str]:
    """Final jobs with a callback URL, finished before `finished_before` (and within a day of it), that have no
    delivery of any of `event_types`: their worker stopped between finishing them and recording the webhook."""
    recorded = select(WebhookDelivery.subject_id).where(col(WebhookDelivery.event_type).in_(list(event_types)))
    return list(
        session.exec(
            select(Job.id)
            .where(
                col(Job.callback_url).is_not(None),
                col(Job.status).in_(list(FINAL_STATUSES)),
                col(Job.finished_at) < finished_before,
                col(Job.finished_at) >= finished_before - timedelta(days=1),
                col(Job.id).not_in(recorded),
            )
            .limit(limit)
        ).all()
    )


def list_deliveries(
    session: Session, tenant: str, *, status: str | None, before: datetime | None, limit: int
) -> list[WebhookDelivery]:
    """The tenant's deliveries, newest first; `before` pages on created_at."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant == tenant)
    if status:
        query = query.where(WebhookDelivery.status == status)
    if before is not None:
        query = query.where(col(WebhookDelivery.created_at) < as_utc(before))
    return list(session.exec(query.order_by(col(WebhookDelivery.created_at).desc()).limit(limit)).all())


def _erased_job(session: Session, subject_id: str) -> bool:
    """Whether the subject is an erased job, asked under the job row's lock (held until the caller commits), so an
    erasure either committed before (seen here) or waits for this row to be written and then empties it.

    The lock is a conditional no-op UPDATE: PostgreSQL locks the row it matches, SQLite the database; a listing's
    id matches no job (its own claim is the listing's guard: core.listings.listing_callback_due)."""
    live = session.execute(
        update(Job).where(col(Job.id) == subject_id, col(Job.erased_at).is_(None)).values(erased_at=None)
    )
    if getattr(live, "rowcount", 0) == 1:
        return False
    return session.exec(select(Job.id).where(Job.id == subject_id)).first() is not None


def _empty(row: WebhookDelivery) -> None:
    """A delivery of erased content: no body, only the URL's scheme and host, and never sent (again) if pending."""
    parts = urlsplit(row.url)
    row.payload = ""
    row.url = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    if row.status == PENDING:
        row.status, row.next_attempt_at = DROPPED, None


def _find(session: Session, event_type: str, subject_id: str, sequence: int) -> WebhookDelivery | None:
    return session.exec(
        select(WebhookDelivery).where(
            WebhookDelivery.event_type == event_type,
            WebhookDelivery.subject_id == subject_id,
            WebhookDelivery.sequence == sequence,
        )
    ).first()


def _delivery_state(row: WebhookDelivery) -> dict[str, object]:
    """What the audit log keeps of a delivery: its state, never its body or URL."""
    return {
        "status": row.status,
        "attempts": row.attempts,
        "redeliveries": row.redeliveries,
        "event_type": row.event_type,
        "subject_id": row.subject_id,
    }


def _new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))

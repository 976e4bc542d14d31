"""Per-tenant quota overrides (tenant_quotas); webhook event types job.decided / job.failed / listing.decided /
review.resolved with bodies in the Standard Webhooks envelope, a sequence for repeated events of one subject, and
the redelivery count of each message"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

from core.migrations.columns import columns

revision = "0010"
down_revision = "0009"

_deliveries = sa.table(
    "webhook_deliveries",
    sa.column("id", sa.String),
    sa.column("event_type", sa.String),
    sa.column("subject_id", sa.String),
    sa.column("payload", sa.Text),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
_jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("status", sa.String))


def upgrade() -> None:
    op.create_table(
        "tenant_quotas",
        *columns(
            """
            tenant      varchar(64)
            limits      json
            updated_at  timestamptz
            updated_by  varchar(128)  null
            """
        ),
        sa.PrimaryKeyConstraint("tenant"),
    )
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("sequence", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("redeliveries", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("redelivered_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint("uq_webhook_deliveries_event_subject", type_="unique")
        batch.create_unique_constraint(
            "uq_webhook_deliveries_event_subject_sequence", ["event_type", "subject_id", "sequence"]
        )
    # The stored messages take the new names and the envelope, so a redelivery of an old one reads like a new one.
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(
            _deliveries.c.id,
            _deliveries.c.event_type,
            _deliveries.c.payload,
            _deliveries.c.created_at,
            _jobs.c.status,
        ).select_from(_deliveries.outerjoin(_jobs, _jobs.c.id == _deliveries.c.subject_id))
    ).all()
    for row in rows:
        if row.event_type == "listing.completed":
            kind = "listing.decided"
        elif row.event_type == "job.completed":
            kind = "job.failed" if row.status == "failed" else "job.decided"
        else:
            continue
        payload = _wrap(kind, row.created_at, row.payload) if row.payload else ""
        connection.execute(
            sa.update(_deliveries).where(_deliveries.c.id == row.id).values(event_type=kind, payload=payload)
        )


def downgrade() -> None:
    connection = op.get_bind()
    # The old code knows no review events, and one subject had one message per type.
    connection.execute(sa.delete(_deliveries).where(_deliveries.c.event_type == "review.resolved"))
    rows = connection.execute(sa.select(_deliveries.c.id, _deliveries.c.event_type, _deliveries.c.payload)).all()
    for row in rows:
        kind = "listing.completed" if row.event_type.startswith("listing.") else "job.completed"
        payload = _unwrap(row.payload) if row.payload else ""
        connection.execute(
            sa.update(_deliveries).where(_deliveries.c.id == row.id).values(event_type=kind, payload=payload)
        )
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_constraint("uq_webhook_deliveries_event_subject_sequence", type_="unique")
        batch.create_unique_constraint("uq_webhook_deliveries_event_subject", ["event_type", "subject_id"])
        batch.drop_column("redelivered_at")
        batch.drop_column("redeliveries")
        batch.drop_column("sequence")
    op.drop_table("tenant_quotas")


def _wrap(kind: str, created_at: Any, payload: str) -> str:
    moment = created_at.isoformat() if hasattr(created_at, "isoformat") else str(created_at)
    if moment and "+" not in moment[10:] and not moment.endswith("Z"):
        moment += "+00:00"  # SQLite hands back naive datetimes, every one written in UTC
    return json.dumps({"type": kind, "timestamp": moment, "data": json.loads(payload)}, separators=(",", ":"))


def _unwrap(payload: str) -> str:
    document = json.loads(payload)
    return json.dumps(document["data"]) if isinstance(document, dict) and "data" in document else payload

"""Signed webhooks: per-tenant signing secrets and the delivery log (one row per message, retried from it);
a job's request id (its submission's X-Request-ID, for following it through the logs)"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrations.columns import columns

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("request_id", sa.String(length=128), nullable=True))
    op.create_table(
        "webhook_secrets",
        *columns(
            """
            id          varchar(32)
            tenant      varchar(64)
            secret      varchar(128)
            created_at  timestamptz
            expires_at  timestamptz   null
            """
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_secrets_tenant", "webhook_secrets", ["tenant"])
    op.create_table(
        "webhook_deliveries",
        *columns(
            """
            id                varchar(64)
            tenant            varchar(64)
            event_type        varchar(32)
            subject_id        varchar(32)
            url               varchar(2048)
            payload           text
            status            varchar(16)
            attempts          integer
            next_attempt_at   timestamptz    null
            last_status_code  integer        null
            last_error        varchar(500)   null
            created_at        timestamptz
            delivered_at      timestamptz    null
            """
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_type", "subject_id", name="uq_webhook_deliveries_event_subject"),
    )
    op.create_index("ix_webhook_deliveries_status_next_attempt_at", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_deliveries_tenant_created_at", "webhook_deliveries", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
    op.drop_column("jobs", "request_id")

"""Listings (one job per photo), shadow decisions, and a decision's reason and contradictions."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrations.columns import columns

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "listings",
        *columns(
            """
            id               varchar(32)
            tenant           varchar(64)
            policy           varchar(64)
            policy_version   varchar(64)   null
            title            varchar(500)  null
            description      text          null
            attributes       json
            image_count      integer
            idempotency_key  varchar(255)  null
            submitted_by     varchar(32)   null
            created_at       timestamptz
            """
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_listings_tenant_idempotency_key"),
    )
    op.create_index("ix_listings_tenant_created_at", "listings", ["tenant", "created_at"], unique=False)

    # Plain ALTER TABLE, not batch mode: on SQLite a batch copies `jobs`, which the foreign keys of
    # `decisions` forbid. No foreign key on listing_id: SQLite cannot drop such a column again on a
    # downgrade; the API writes a listing and its jobs in one transaction instead.
    op.add_column("jobs", sa.Column("listing_id", sa.String(length=32), nullable=True))
    op.add_column("jobs", sa.Column("listing_index", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_listing_id", "jobs", ["listing_id"], unique=False)

    op.add_column("decisions", sa.Column("reason", sa.String(length=2000), nullable=True))
    op.add_column("decisions", sa.Column("contradictions", sa.JSON(), nullable=True))

    op.create_table(
        "shadow_decisions",
        *columns(
            """
            id              varchar(32)
            job_id          varchar(32)
            tenant          varchar(64)
            policy          varchar(64)
            policy_version  varchar(64)
            active_policy   varchar(64)
            active_version  varchar(64)
            active_action   varchar(16)
            action          varchar(16)    null
            categories      json
            evidence        json
            tags            json
            reason          varchar(2000)  null
            error_code      varchar(64)    null
            error_message   varchar(2000)  null
            decided_at      timestamptz
            """
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "policy", name="uq_shadow_decisions_job_policy"),
    )
    op.create_index("ix_shadow_decisions_job_id", "shadow_decisions", ["job_id"], unique=False)
    op.create_index(
        "ix_shadow_decisions_active_policy_decided_at",
        "shadow_decisions",
        ["active_policy", "decided_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_shadow_decisions_active_policy_decided_at", table_name="shadow_decisions")
    op.drop_index("ix_shadow_decisions_job_id", table_name="shadow_decisions")
    op.drop_table("shadow_decisions")
    op.drop_column("decisions", "contradictions")
    op.drop_column("decisions", "reason")
    op.drop_index("ix_jobs_listing_id", table_name="jobs")
    op.drop_column("jobs", "listing_index")  # SQLite 3.35+ drops a column in place
    op.drop_column("jobs", "listing_id")
    op.drop_table("listings")

"""Listings (one job per photo), shadow decisions, and a decision's reason and contradictions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "listings",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("policy", sa.String(length=64), nullable=False),
        sa.Column("policy_version", sa.String(length=64), nullable=True),
        sa.Column("title", sa.String(length=500), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("image_count", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("submitted_by", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
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
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("policy", sa.String(length=64), nullable=False),
        sa.Column("policy_version", sa.String(length=64), nullable=False),
        sa.Column("active_policy", sa.String(length=64), nullable=False),
        sa.Column("active_version", sa.String(length=64), nullable=False),
        sa.Column("active_action", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=True),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=2000), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.String(length=2000), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
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

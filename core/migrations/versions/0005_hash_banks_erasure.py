"""Hash banks and their items; a job's PDQ hash, its erasure tombstone; a decision's reuse of an earlier one"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "banks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=2000), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "name", name="uq_banks_tenant_name"),
    )
    op.create_table(
        "bank_items",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("bank_id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("pdq", sa.String(length=64), nullable=True),
        sa.Column("pdq_quality", sa.Integer(), nullable=True),
        sa.Column("note", sa.String(length=2000), nullable=True),
        sa.Column("added_by", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["bank_id"], ["banks.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bank_items_bank_id", "bank_items", ["bank_id"], unique=False)
    op.create_index("ix_bank_items_bank_id_sha256", "bank_items", ["bank_id", "sha256"], unique=False)

    # Plain ALTER TABLE like 0003: nullable columns need no batch copy on SQLite.
    op.add_column("jobs", sa.Column("pdq", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("pdq_quality", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_tenant_image_sha256", "jobs", ["tenant", "image_sha256"], unique=False)
    op.add_column("decisions", sa.Column("reused_from", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("decisions", "reused_from")
    op.drop_index("ix_jobs_tenant_image_sha256", table_name="jobs")
    op.drop_column("jobs", "erased_at")
    op.drop_column("jobs", "pdq_quality")
    op.drop_column("jobs", "pdq")
    op.drop_index("ix_bank_items_bank_id_sha256", table_name="bank_items")
    op.drop_index("ix_bank_items_bank_id", table_name="bank_items")
    op.drop_table("bank_items")
    op.drop_table("banks")

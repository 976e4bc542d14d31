"""Hash banks and their items; a job's PDQ hash, its erasure tombstone; a decision's reuse of an earlier one"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrations.columns import columns

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "banks",
        *columns(
            """
            id           varchar(32)
            tenant       varchar(64)
            name         varchar(64)
            description  varchar(2000)  null
            revision     integer
            created_at   timestamptz
            """
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "name", name="uq_banks_tenant_name"),
    )
    op.create_table(
        "bank_items",
        *columns(
            """
            id           varchar(32)
            bank_id      varchar(32)
            tenant       varchar(64)
            sha256       varchar(64)    null
            pdq          varchar(64)    null
            pdq_quality  integer        null
            note         varchar(2000)  null
            added_by     varchar(32)    null
            created_at   timestamptz
            """
        ),
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

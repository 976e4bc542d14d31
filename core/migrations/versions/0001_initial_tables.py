"""initial tables."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrations.columns import columns

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        *columns(
            """
            id               varchar(32)
            tenant           varchar(64)
            status           varchar(16)
            policy           varchar(64)
            policy_version   varchar(64)    null
            source           varchar(8)
            image_url        varchar(2048)  null
            blob_key         varchar(128)   null
            image_sha256     varchar(64)    null
            image_bytes      integer        null
            image_width      integer        null
            image_height     integer        null
            image_format     varchar(16)    null
            context          json           null
            callback_url     varchar(2048)  null
            idempotency_key  varchar(255)   null
            attempts         integer
            error_code       varchar(64)    null
            error_message    varchar(2000)  null
            worker           varchar(255)   null
            created_at       timestamptz
            updated_at       timestamptz
            started_at       timestamptz    null
            finished_at      timestamptz    null
            """
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_status_updated_at", ["status", "updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_tenant"), ["tenant"], unique=False)

    op.create_table(
        "decisions",
        *columns(
            """
            id              varchar(32)
            job_id          varchar(32)
            tenant          varchar(64)
            action          varchar(16)
            policy          varchar(64)
            policy_version  varchar(64)
            caption         varchar(2000)  null
            categories      json
            evidence        json
            tags            json
            models          json
            duration_ms     float
            decided_at      timestamptz
            """
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
    )
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_decisions_action"), ["action"], unique=False)
        batch_op.create_index("ix_decisions_decided_at_id", ["decided_at", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_decisions_policy"), ["policy"], unique=False)
        batch_op.create_index(batch_op.f("ix_decisions_tenant"), ["tenant"], unique=False)

    op.create_table(
        "decision_categories",
        *columns(
            """
            decision_id  varchar(32)
            category     varchar(64)
            score        float
            action       varchar(16)
            fired        boolean
            """
        ),
        sa.ForeignKeyConstraint(
            ["decision_id"],
            ["decisions.id"],
        ),
        sa.PrimaryKeyConstraint("decision_id", "category"),
    )
    with op.batch_alter_table("decision_categories", schema=None) as batch_op:
        batch_op.create_index("ix_decision_categories_category_fired", ["category", "fired"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("decision_categories", schema=None) as batch_op:
        batch_op.drop_index("ix_decision_categories_category_fired")

    op.drop_table("decision_categories")
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_decisions_tenant"))
        batch_op.drop_index(batch_op.f("ix_decisions_policy"))
        batch_op.drop_index("ix_decisions_decided_at_id")
        batch_op.drop_index(batch_op.f("ix_decisions_action"))

    op.drop_table("decisions")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_tenant"))
        batch_op.drop_index("ix_jobs_status_updated_at")

    op.drop_table("jobs")

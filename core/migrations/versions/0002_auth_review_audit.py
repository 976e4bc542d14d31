"""API keys, dashboard sessions, the review queue and the audit log."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrations.columns import columns

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("submitted_by", sa.String(length=32), nullable=True))

    op.create_table(
        "api_keys",
        *columns(
            """
            id            varchar(32)
            key_hash      varchar(64)
            prefix        varchar(32)
            name          varchar(128)
            role          varchar(16)
            tenant        varchar(64)
            created_at    timestamptz
            last_used_at  timestamptz   null
            revoked_at    timestamptz   null
            """
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant"), ["tenant"], unique=False)

    op.create_table(
        "dashboard_sessions",
        *columns(
            """
            id          varchar(64)
            key_id      varchar(32)
            csrf_token  varchar(64)
            created_at  timestamptz
            expires_at  timestamptz
            """
        ),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dashboard_sessions_key_id"), ["key_id"], unique=False)

    op.create_table(
        "review_items",
        *columns(
            """
            job_id            varchar(32)
            decision_id       varchar(32)
            tenant            varchar(64)
            policy            varchar(64)
            category          varchar(64)    null
            score             float
            state             varchar(16)
            queued_at         timestamptz
            claimed_by        varchar(32)    null
            claimed_by_name   varchar(128)   null
            claim_expires_at  timestamptz    null
            resolution        varchar(16)    null
            reason            varchar(2000)  null
            resolved_by       varchar(32)    null
            resolved_by_name  varchar(128)   null
            resolved_at       timestamptz    null
            reopen_count      integer
            """
        ),
        sa.ForeignKeyConstraint(["decision_id"], ["decisions.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("job_id"),
        sa.UniqueConstraint("decision_id"),
    )
    with op.batch_alter_table("review_items", schema=None) as batch_op:
        batch_op.create_index("ix_review_items_tenant_state_queued_at", ["tenant", "state", "queued_at"], unique=False)
        batch_op.create_index("ix_review_items_tenant_state_score", ["tenant", "state", "score"], unique=False)

    op.create_table(
        "audit_log",
        *columns(
            """
            id            bigserial
            at            timestamptz
            tenant        varchar(64)
            actor_key_id  varchar(32)   null
            actor_name    varchar(128)
            actor_role    varchar(16)   null
            action        varchar(64)
            target_type   varchar(32)
            target_id     varchar(64)
            before        json          null
            after         json          null
            """
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_tenant_id", ["tenant", "id"], unique=False)
        batch_op.create_index("ix_audit_log_target", ["target_type", "target_id"], unique=False)

    # Decisions stored before this revision whose action was `review` join the queue as the worker now does.
    op.execute(
        """
        INSERT INTO review_items (job_id, decision_id, tenant, policy, category, score, state, queued_at, reopen_count)
        SELECT d.job_id, d.id, d.tenant, d.policy,
               (SELECT dc.category FROM decision_categories dc
                 WHERE dc.decision_id = d.id AND dc.action <> 'allow'
                 ORDER BY dc.score DESC, dc.category LIMIT 1),
               COALESCE((SELECT MAX(dc.score) FROM decision_categories dc
                          WHERE dc.decision_id = d.id AND dc.action <> 'allow'), 0.0),
               'open', d.decided_at, 0
          FROM decisions d
         WHERE d.action = 'review'
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_target")
        batch_op.drop_index("ix_audit_log_tenant_id")
    op.drop_table("audit_log")

    with op.batch_alter_table("review_items", schema=None) as batch_op:
        batch_op.drop_index("ix_review_items_tenant_state_score")
        batch_op.drop_index("ix_review_items_tenant_state_queued_at")
    op.drop_table("review_items")

    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboard_sessions_key_id"))
    op.drop_table("dashboard_sessions")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant"))
    op.drop_table("api_keys")

    # Not in batch mode: on SQLite that would copy `jobs` and drop the original, which the foreign keys of
    # `decisions` forbid. SQLite 3.35+ drops a column in place.
    op.drop_column("jobs", "submitted_by")

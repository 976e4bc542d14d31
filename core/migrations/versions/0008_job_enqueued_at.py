"""When a job's task reached the broker: the outbox sweep enqueues the jobs whose task never did"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    # Rows from before this column were enqueued at intake as far as anyone knows: the queued grace still covers
    # them, and the outbox sweep must not re-enqueue the whole history at once.
    op.execute("UPDATE jobs SET enqueued_at = created_at")
    op.create_index("ix_jobs_status_enqueued_at", "jobs", ["status", "enqueued_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_enqueued_at", table_name="jobs")
    op.drop_column("jobs", "enqueued_at")

"""A job's priority (interactive or bulk): which Celery queue its task goes to and the reconciler puts it back on"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    # Every job before this revision was submitted as a live one: the server default fills them.
    op.add_column("jobs", sa.Column("priority", sa.String(length=16), nullable=False, server_default="interactive"))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+ has it): a batch copy of `jobs` would trip the decisions' foreign key.
    op.drop_column("jobs", "priority")

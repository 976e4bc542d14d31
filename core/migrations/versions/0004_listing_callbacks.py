"""A listing's callback: where to POST the listing once every photo is final, and when that was claimed."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    # Plain ALTER TABLE like 0003: nullable columns need no batch copy on SQLite.
    op.add_column("listings", sa.Column("callback_url", sa.String(length=2048), nullable=True))
    op.add_column("listings", sa.Column("callback_sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("listings", "callback_sent_at")  # SQLite 3.35+ drops a column in place
    op.drop_column("listings", "callback_url")

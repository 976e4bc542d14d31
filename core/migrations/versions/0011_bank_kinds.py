"""Allow-list banks: a bank's `kind` (`block`, the default and every existing bank, or `allow`)"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.add_column("banks", sa.Column("kind", sa.String(length=8), nullable=False, server_default="block"))


def downgrade() -> None:
    with op.batch_alter_table("banks") as batch:
        batch.drop_column("kind")

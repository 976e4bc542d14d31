"""The lines OCR read in a job's image, stored beside its caption"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.add_column("decisions", sa.Column("text", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("decisions", "text")

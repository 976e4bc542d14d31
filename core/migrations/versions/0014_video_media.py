"""Video jobs: a job's media (image or video); a video decision's judged frames, its segments and its filmstrip"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    # Every job before this revision was an image: the server default fills them, and intake sets it from now on.
    op.add_column("jobs", sa.Column("media", sa.String(length=8), nullable=False, server_default="image"))
    op.add_column("decisions", sa.Column("frames", sa.JSON(), nullable=True))
    op.add_column("decisions", sa.Column("segments", sa.JSON(), nullable=True))
    # The blob key of the filmstrip JPEG the worker drew from the judged frames (null for images).
    op.add_column("decisions", sa.Column("filmstrip_key", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMNs (SQLite 3.35+ has them): a batch copy of `decisions` or `jobs` would trip the foreign keys
    # other tables hold on them.
    for column in ("filmstrip_key", "segments", "frames"):
        op.drop_column("decisions", column)
    op.drop_column("jobs", "media")

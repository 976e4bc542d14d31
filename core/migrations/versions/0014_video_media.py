"""Reserved for video jobs: media, frames and segments (issue 19): filled in by that change; a no-op until then"""

from __future__ import annotations

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

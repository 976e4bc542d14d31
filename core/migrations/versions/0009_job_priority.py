"""Reserved for the job priority lane (interactive/bulk) (issue 18): filled in by that change; a no-op until then"""

from __future__ import annotations

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

"""Reserved for allow-list banks and hash exchange (issue 18): filled in by that change; a no-op until then"""

from __future__ import annotations

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

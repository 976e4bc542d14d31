"""Reserved for per-category review labels and audit items (issue 22): filled in by that change; a no-op until then"""

from __future__ import annotations

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

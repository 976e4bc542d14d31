"""Reserved for per-tenant quota overrides and webhook event types (issue 18): filled in by that change; a no-op until then"""

from __future__ import annotations

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

"""Reserved for image embeddings and example sets (issue 22): filled in by that change; a no-op until then"""

from __future__ import annotations

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

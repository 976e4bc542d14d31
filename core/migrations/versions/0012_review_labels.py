"""Per-category review labels and audit items: a resolution's labels, and which queue items are an audit sample"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    with op.batch_alter_table("review_items", schema=None) as batch_op:
        # `review` (the policy said review) or `audit` (an automatic allow/block sampled at the policy's audit_rate).
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="review"))
        # The resolution's per-category labels {category: true|false}: null while open (and for older resolutions).
        batch_op.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        # Calibration and the labels export read a tenant's resolutions of one policy since a moment.
        batch_op.create_index(
            "ix_review_items_tenant_policy_resolved_at", ["tenant", "policy", "resolved_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("review_items", schema=None) as batch_op:
        batch_op.drop_index("ix_review_items_tenant_policy_resolved_at")
        batch_op.drop_column("labels")
        batch_op.drop_column("kind")

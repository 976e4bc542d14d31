"""Image embeddings per job (pgvector's `vector` on PostgreSQL, float32 bytes on SQLite) and example sets per tenant

The `vector` column has no fixed dimension (models differ); an HNSW index is per dimension, so it is left to the
operator (README: "Image embeddings"). The extension is created only on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.migrations.columns import columns
from core.vectors import EmbeddingVector

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "job_embeddings",
        *columns(
            """
            job_id      varchar(32)
            tenant      varchar(64)
            model       varchar(255)
            dim         integer
            created_at  timestamptz
            """
        ),
        sa.Column("vector", EmbeddingVector(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_job_embeddings_tenant_model", "job_embeddings", ["tenant", "model"], unique=False)
    op.create_table(
        "example_sets",
        *columns(
            """
            id           varchar(32)
            tenant       varchar(64)
            name         varchar(64)
            description  varchar(2000)  null
            revision     integer
            created_at   timestamptz
            """
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "name", name="uq_example_sets_tenant_name"),
    )
    op.create_table(
        "example_items",
        *columns(
            """
            id          varchar(32)
            set_id      varchar(32)
            job_id      varchar(32)
            tenant      varchar(64)
            label       varchar(16)
            added_by    varchar(32)  null
            created_at  timestamptz
            """
        ),
        sa.ForeignKeyConstraint(["set_id"], ["example_sets.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("set_id", "job_id", name="uq_example_items_set_job"),
    )
    op.create_index("ix_example_items_set_id", "example_items", ["set_id"], unique=False)
    op.create_index("ix_example_items_job_id", "example_items", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_example_items_job_id", table_name="example_items")
    op.drop_index("ix_example_items_set_id", table_name="example_items")
    op.drop_table("example_items")
    op.drop_table("example_sets")
    op.drop_index("ix_job_embeddings_tenant_model", table_name="job_embeddings")
    op.drop_table("job_embeddings")

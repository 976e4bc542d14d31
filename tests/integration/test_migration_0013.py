"""Migration 0013 on SQLite and PostgreSQL: the embedding and example-set tables (pgvector's `vector` on PostgreSQL,
bytes on SQLite), a vector written and read back, and its downgrade dropping them.

Its own module: it resets the session's PostgreSQL database, which no other test may be using meanwhile."""

from __future__ import annotations

import numpy as np
from alembic import command
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from core import embeddings
from core.db import alembic_config, get_engine, session_scope

TABLES = {"job_embeddings", "example_sets", "example_items"}
VECTOR = np.array([0.5, -0.5, 0.5, -0.5, 0.0, 0.0], dtype="<f4")


def test_migration_0013_stores_vectors_and_goes_back(empty_database_url: str) -> None:
    url = empty_database_url
    backend = get_engine(url).dialect.name
    config = alembic_config(url)
    command.upgrade(config, "0013")
    with get_engine(url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (id, tenant, status, policy, source, attempts, priority, created_at, updated_at) "
                "VALUES ('j1', 'default', 'done', 'moderation', 'url', 1, 'interactive', :at, :at)"
            ),
            {"at": "2026-01-02 03:04:05"},
        )
        connection.execute(
            text(
                "INSERT INTO job_embeddings (job_id, tenant, model, dim, vector, created_at) "
                "VALUES ('j1', 'default', 'm', 6, :vector, :at)"
            ),
            {"vector": _literal(backend, VECTOR), "at": "2026-01-02 03:04:05"},
        )
    with session_scope(url) as session:
        row = embeddings.get(session, "j1")  # read through the column type the application uses
        assert row is not None and row.dim == 6
        assert np.allclose(row.vector, VECTOR)
    if backend == "postgresql":
        with get_engine(url).connect() as connection:
            kind = connection.execute(
                text(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = 'job_embeddings'::regclass AND attname = 'vector'"
                )
            ).scalar_one()
        assert kind == "vector"  # no fixed dimension: rows of several models' sizes live side by side
    command.downgrade(config, "0012")
    assert not TABLES & set(sa_inspect(get_engine(url)).get_table_names())
    command.upgrade(config, "0013")
    assert set(sa_inspect(get_engine(url)).get_table_names()) >= TABLES
    get_engine(url).dispose()


def _literal(backend: str, vector: np.ndarray) -> object:
    """The vector as each backend stores it: pgvector's text form, or little-endian float32 bytes."""
    return "[" + ",".join(str(float(x)) for x in vector) + "]" if backend == "postgresql" else vector.tobytes()

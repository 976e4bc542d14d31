"""Alembic environment: runs migrations on the engine core.db hands over (no alembic.ini needed)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool
from sqlmodel import SQLModel, create_engine

import core.tables  # noqa: F401  (registers the tables on SQLModel.metadata)

target_metadata = SQLModel.metadata


def run_migrations() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        # `alembic -x url=...` from the command line, for operators who run migrations by hand.
        url = context.get_x_argument(as_dictionary=True).get("url")
        if not url:
            raise SystemExit("pass the database URL: alembic -x url=postgresql://... upgrade head")
        engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several workers may start at once: one migrates, the others wait here.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(715_301)")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        context.run_migrations()


run_migrations()

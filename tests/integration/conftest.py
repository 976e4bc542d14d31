"""The integration layer's fixtures: the API served in-process on SQLite and PostgreSQL (`api`), a deployment of
child processes (`deployment`), the photos as files and a callback receiver. Helpers are in tests/support/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import Api, admin_key, api_settings, running_api
from tests.support.deployment import Deployment, child_env
from tests.support.photos import encoded_photos
from tests.support.receiver import receiver, webhook_receiver
from tests.support.s3 import S3Bucket
from tests.support.servers import empty_database, reset_postgres

__all__ = ["api", "api_overrides", "db_url", "deployment", "encoded_photos", "fleet", "receiver", "webhook_receiver"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh database per module and backend; the API's lifespan migrates it."""
    return empty_database(request, tmp_path_factory.mktemp("api-db"))


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    """Settings fields a test module gives its `api`: override this fixture in the module."""
    return {}


@pytest.fixture(scope="module")
def api(
    db_url: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory, api_overrides: dict[str, Any]
) -> Iterator[Api]:
    """The API of this module, on each backend, served in-process over real HTTP, with a real Redis."""
    settings = api_settings(tmp_path_factory.mktemp("api"), db_url, redis_server.url, **api_overrides)
    with running_api(settings) as server:
        yield server


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str, database_url: str, models_cache: Path) -> Iterator[Deployment]:
    """Settings for the child processes a test starts (`start_api`, `start_worker`); they are stopped after it."""
    env = child_env(
        tmp_path,
        inherited=os.environ,
        database_url=database_url,
        redis_url=redis_url,
        models_cache=models_cache,
        MODTAG_FETCH_ALLOW_PRIVATE="true",
    )
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    deployment = Deployment(env=env, log_dir=log_dir, key=admin_key(database_url))
    yield deployment
    deployment.stop_all()


@pytest.fixture
def fleet(
    tmp_path: Path, redis_url: str, postgres_url: str, s3_bucket: S3Bucket, tiny_models_dir: Path
) -> Iterator[Deployment]:
    """A deployment as a fleet runs it: PostgreSQL, Redis and S3 shared, and every process (API, each worker)
    on a directory of its own, so nothing can pass through a shared path."""
    reset_postgres(postgres_url)
    env = {
        **os.environ,
        **s3_bucket.env,
        "MODTAG_DATABASE_URL": postgres_url,
        "MODTAG_REDIS_URL": redis_url,
        "MODTAG_BLOB_URL": s3_bucket.blob_url,
        "MODTAG_MODELS": "tiny-random",
        "MODTAG_WORKER_METRICS_PORT": "0",
        "MODTAG_BATCH_WAIT_MS": "5",
        "PYTHONUNBUFFERED": "1",
    }
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    deployment = Deployment(
        env=env,
        log_dir=log_dir,
        key=admin_key(postgres_url),
        hosts_dir=tmp_path / "hosts",
        models_source=tiny_models_dir.parent,
    )
    yield deployment
    deployment.stop_all()

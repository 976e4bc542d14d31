"""A real modtag deployment in child processes (the API, `modtag api`, and workers, `modtag worker`), an API served
in-process by uvicorn (`serve`, and the module-scoped `api` fixture on SQLite and PostgreSQL built on it), API keys
made through core code, and the error-shape assertion every API test uses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from sqlmodel import func, select

from api.app import create_app
from core.db import get_engine, session_scope
from core.queues import Queue
from core.settings import Settings
from core.tables import Job
from modtag.servers import free_port


def admin_key(database_url: str, *, role: str = "admin", tenant: str = "default", name: str = "test admin") -> str:
    """A new key made through core code (the same as `modtag keys create`), on a migrated database."""
    from core.auth import cli_principal, create_key
    from core.db import migrate, session_scope

    migrate(database_url)
    with session_scope(database_url) as session:
        _, secret = create_key(session, role=role, tenant=tenant, name=name, actor=cli_principal(tenant))
    return secret


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The documented error shape: exactly `detail` (a sentence) and `code` (snake_case)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and len(body["detail"]) > 10, body
    assert "Traceback" not in body["detail"]
    return dict(body)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free port; yield its base URL; stop it cleanly."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API failed to start; its log is above")
        if time.monotonic() > deadline:
            raise TimeoutError("the API did not start within 30 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


@dataclass
class Api:
    """An API served in-process over real HTTP, and what a test needs to look behind it.

    `client` sends `key`, an admin key of tenant `default`; `redis` is a client of the API's Redis.
    """

    client: httpx.Client
    base_url: str
    settings: Settings
    redis: redis.Redis
    key: str

    @property
    def db_url(self) -> str:
        return self.settings.resolved_database_url

    def upload(self, data: bytes, *, filename: str = "photo.jpg", mime: str = "image/jpeg", **fields: str) -> Any:
        return self.client.post("/v1/jobs", files={"image": (filename, data, mime)}, data=fields)

    def messages(self) -> list[dict[str, Any]]:
        """The inference task messages waiting in Redis."""
        return [json.loads(raw) for raw in self.redis.lrange(Queue.INFERENCE.value, 0, -1)]

    def job_count(self) -> int:
        with session_scope(self.db_url) as session:
            return int(session.exec(select(func.count()).select_from(Job)).one())


def api_settings(data_dir: Path, db_url: str, redis_url: str, **fields: Any) -> Settings:
    """Settings of a test API: no .env, no extra policies, blobs under `data_dir`; `fields` override."""
    # Every test API shares one Redis and sends from 127.0.0.1: a high failure limit keeps the bad keys of one
    # test from locking out the next (test_auth_failures.py tests the limit itself).
    chosen: dict[str, Any] = {
        "blob_dir": data_dir / "blobs",
        "policies_dir": None,
        "auth_max_failures": 1_000_000,
        **fields,
    }
    return Settings(_env_file=None, data_dir=data_dir, database_url=db_url, redis_url=redis_url, **chosen)


@contextmanager
def running_api(settings: Settings, app: FastAPI | None = None) -> Iterator[Api]:
    """Serve `app` (default: `create_app(settings)`) with a fresh admin key; yield the running API."""
    key = admin_key(settings.resolved_database_url)
    headers = {"Authorization": f"Bearer {key}"}
    with (
        serve(app or create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=headers) as client,
        closing(redis.Redis.from_url(settings.redis_url)) as connection,
    ):
        yield Api(client, base_url, settings, connection, key)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh database per module and backend; the API's lifespan migrates it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('api-db') / 'modtag.db'}"
    url: str = request.getfixturevalue("postgres_url")
    with get_engine(url).begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    return url


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


@dataclass
class Deployment:
    """Env and child processes of one test deployment; every process shares the database and blobs."""

    env: dict[str, str]
    log_dir: Path
    api_url: str = ""
    key: str = ""  # an admin key of tenant `default`; `headers` carries it
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def start_api(self) -> subprocess.Popen[bytes]:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        process = self._spawn("api", ["api", "--port", str(port)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, self.log("api")
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=1).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("API not ready:\n" + self.log("api"))

    def start_worker(self, name: str = "worker", **extra_env: str) -> subprocess.Popen[bytes]:
        process = self._spawn(name, ["worker", "--concurrency", "4"], extra_env)
        from celery import Celery

        app = Celery(broker=self.env["MODTAG_REDIS_URL"])
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                assert process.poll() is None, self.log(name)
                # The hostname carries the pid, so this waits for this very process.
                try:
                    answers = app.control.ping(timeout=0.5) or []
                except (OSError, redis.RedisError):  # a connection kept from before a Redis restart
                    continue
                if any(str(process.pid) in next(iter(answer)) for answer in answers):
                    return process
        finally:
            app.close()
        raise AssertionError("worker not ready:\n" + self.log(name))

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {**self.env, **(extra_env or {})}
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "-m", "modtag", *args], env=env, stdout=log, stderr=log)
        self.processes.append(process)
        return process


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random models are built once per session and shared by every worker."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str, database_url: str, models_cache: Path) -> Iterator[Deployment]:
    env = {
        **os.environ,
        "MODTAG_DATA_DIR": str(tmp_path / "data"),
        "MODTAG_DATABASE_URL": database_url,
        "MODTAG_REDIS_URL": redis_url,
        "MODTAG_MODELS": "tiny-random",
        "MODTAG_MODELS_CACHE_DIR": str(models_cache),
        "MODTAG_WORKER_METRICS_PORT": "0",
        "MODTAG_FETCH_ALLOW_PRIVATE": "true",
        "MODTAG_BATCH_WAIT_MS": "5",
        "PYTHONUNBUFFERED": "1",
    }
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    deployment = Deployment(env=env, log_dir=log_dir, key=admin_key(database_url))
    yield deployment
    for process in deployment.processes:
        deployment.stop(process)

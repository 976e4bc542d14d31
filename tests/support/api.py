"""An API served in-process by uvicorn over real HTTP (`serve`, `running_api`), API keys made through core code,
raw HTTP for requests no client would send, and the error-shape assertion every API test uses."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import uvicorn
from fastapi import FastAPI
from sqlmodel import func, select

from api.app import create_app, server_config
from core.db import session_scope
from core.queues import Queue
from core.settings import Settings
from core.tables import Job
from modtag.client import ApiClient
from modtag.servers import free_port
from tests.support.waiting import wait_for


def admin_key(database_url: str, *, role: str = "admin", tenant: str = "default", name: str = "test admin") -> str:
    """A new key made through core code (the same as `modtag keys create`), on a migrated database."""
    from core.auth import cli_principal, create_key
    from core.db import migrate

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
    config = server_config(app, app.state.settings, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("the API failed to start; its log is above")
        return bool(server.started)

    wait_for(started, 30, "the API started")
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

    client: ApiClient
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
    with (
        serve(app or create_app(settings)) as base_url,
        ApiClient(base_url, key=key, timeout_s=30) as client,
        closing(redis.Redis.from_url(settings.redis_url)) as connection,
    ):
        yield Api(client, base_url, settings, connection, key)


def raw_http(base_url: str, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send bytes as they are (headers that may lie) and read the response until the server closes."""
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=15) as sock:
        # The server may answer and close before reading everything: that is what some tests want to see.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = received.partition(b"\r\n")
    head, _, payload = rest.partition(b"\r\n\r\n")
    # The first response only: bytes sent past a lying Content-Length may draw a second answer (h11's 400).
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    if lengths:
        payload = payload[: int(lengths[0])]
    try:
        return int(status_line.split()[1]), json.loads(payload)
    except ValueError:  # the server's own plain-text refusal of a malformed request, not the app's
        return int(status_line.split()[1]), {"detail": payload.decode(errors="replace"), "code": None}

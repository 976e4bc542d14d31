"""A real modtag deployment in child processes: the API (`modtag api`) and workers (`modtag worker`) sharing
one database, Redis and blob store, driven through the CLI's own HTTP client. A fleet (`hosts_dir` set)
gives every process a directory of its own, as separate machines would have: they share no path."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from modtag.client import ApiClient, ApiUnreachable
from modtag.servers import free_port
from tests.support.waiting import wait_for


@dataclass
class Deployment:
    """Env and child processes of one test deployment; every process shares the database and blobs."""

    env: dict[str, str]
    log_dir: Path
    api_url: str = ""
    key: str = ""  # an admin key of tenant `default`; `headers` and `client` carry it
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    hosts_dir: Path | None = None  # each process's own data directory (and models copy) lives under it
    models_source: Path | None = None  # the models cache each host gets a copy of
    _client: ApiClient | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def client(self) -> ApiClient:
        """A client of the running API (start_api first), sending the admin key."""
        assert self._client is not None, "start_api() first"
        return self._client

    def start_api(self) -> subprocess.Popen[bytes]:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        process = self._spawn("api", ["api", "--port", str(port)])
        if self._client is not None:
            self._client.close()
        self._client = ApiClient(self.api_url, key=self.key, timeout_s=30)

        def ready() -> bool:
            assert process.poll() is None, self.log("api")
            try:
                return self.client.get("/readyz", timeout=1).status_code == 200
            except ApiUnreachable:
                return False

        wait_for(ready, 30, f"the API ready (its log: {self.log_dir / 'api.log'})")
        return process

    def start_worker(
        self, name: str = "worker", *, concurrency: int | None = 4, **extra_env: str
    ) -> subprocess.Popen[bytes]:
        """A `modtag worker` process, ready; `concurrency` task threads (None: the worker's default)."""
        threads = [] if concurrency is None else ["--concurrency", str(concurrency)]
        process = self._spawn(name, ["worker", *threads], extra_env)

        def answered(app: Celery) -> bool:
            assert process.poll() is None, self.log(name)
            try:
                answers = app.control.ping(timeout=0.5) or []
            except (OSError, redis.RedisError):  # a connection kept from before a Redis restart
                return False
            # The hostname carries the pid, so this waits for this very process.
            return any(str(process.pid) in next(iter(answer)) for answer in answers)

        with self._celery() as app:
            wait_for(lambda: answered(app), 120, f"worker {name} ready (its log: {self.log_dir / name}.log)")
        return process

    def wait_idle(self, timeout_s: float = 30) -> None:
        """Until every worker answers with no task running: what a finished task would still send has been sent."""

        def idle(app: Celery) -> bool:
            active = app.control.inspect(timeout=0.5).active()
            return active is not None and not any(active.values())

        with self._celery() as app:
            wait_for(lambda: idle(app), timeout_s, "the workers idle")

    @contextmanager
    def _celery(self) -> Iterator[Celery]:
        """A Celery client of the deployment's broker, for control commands."""
        app = Celery(broker=self.env["MODTAG_REDIS_URL"])
        try:
            yield app
        finally:
            app.close()

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def stop_all(self) -> None:
        for process in self.processes:
            self.stop(process)
        if self._client is not None:
            self._client.close()

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {**self.env, **self._host_env(name), **(extra_env or {})}
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "-m", "modtag", *args], env=env, stdout=log, stderr=log)
        self.processes.append(process)
        return process

    def _host_env(self, name: str) -> dict[str, str]:
        if self.hosts_dir is None:
            return {}
        host = self.hosts_dir / name
        env = {"MODTAG_DATA_DIR": str(host / "data")}
        if self.models_source is not None:
            if not (host / "models").exists():
                shutil.copytree(self.models_source, host / "models")
            env["MODTAG_MODELS_CACHE_DIR"] = str(host / "models")
        return env


def child_env(
    tmp_path: Path,
    *,
    inherited: Mapping[str, str],
    database_url: str,
    redis_url: str,
    models_cache: Path,
    **extra: str,
) -> dict[str, str]:
    """The environment of a test deployment's children: `inherited`, the settings every test deployment shares
    (tiny random models, blobs under `tmp_path`, a 5 ms batch wait, no worker metrics port), then `extra`."""
    return {
        **inherited,
        "MODTAG_DATA_DIR": str(tmp_path / "data"),
        "MODTAG_DATABASE_URL": database_url,
        "MODTAG_REDIS_URL": redis_url,
        "MODTAG_MODELS": "tiny-random",
        "MODTAG_MODELS_CACHE_DIR": str(models_cache),
        "MODTAG_WORKER_METRICS_PORT": "0",
        "MODTAG_BATCH_WAIT_MS": "5",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def submit(deployment: Deployment, data: bytes, name: str = "photo.jpg", **fields: str) -> dict[str, Any]:
    """POST an upload with form `fields`; the accepted job."""
    response = deployment.client.post("/v1/jobs", files={"image": (name, data)}, data=fields)
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_final(deployment: Deployment, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """The job once done or failed."""
    return deployment.client.wait_job(job_id, timeout_s=timeout_s)


def wait_listing(deployment: Deployment, listing_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """The listing once its verdict is final."""
    body = deployment.client.wait_listing(listing_id, timeout_s=timeout_s)
    assert body["verdict"]["status"] != "pending", f"listing not final: {body}"
    return body

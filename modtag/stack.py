"""The embedded stack: Redis, the database, the API and N workers on one machine, as child processes.

`modtag up` runs it until Ctrl-C; `modtag scan` without `--api` starts one for the duration of a scan.
Every child gets its settings from the `Settings` object the stack was given, written into its environment:
the parent's own environment is never changed, so two stacks in one process cannot see each other's settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from pydantic import SecretStr

from core.db import migrate, session_scope
from core.errors import ConfigError
from core.settings import Settings, prepare_data_dir
from modtag.client import ApiClient, ApiUnreachable
from modtag.servers import RedisServer, die_with_parent, free_port

# A worker that died is restarted by `modtag up`, unless it died this often within the window (a crash loop).
WORKER_RESTARTS = 5
WORKER_RESTART_WINDOW_S = 300.0


class StackError(ConfigError):
    code = "stack_failed"


def settings_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with every setting of `settings` as its MODTAG_* variable, for a child.

    A variable of a setting that is None in `settings` is left out even where this process has it, so
    the child reads exactly the settings given.
    """
    fields = {f"MODTAG_{name}".upper(): name for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in fields}
    for variable, name in fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[variable] = str(value)
    return env


class Stack:
    """Child processes of one local modtag installation. Use as a context manager."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        workers: int = 1,
        embedded_redis: bool | None = None,
        quiet: bool = False,
        temporary_key: bool = False,
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port if port is not None else settings.api_port
        self.workers = workers
        # Start our own Redis unless the operator pointed us at one.
        self.embedded_redis = "redis_url" not in settings.model_fields_set if embedded_redis is None else embedded_redis
        self.quiet = quiet
        self.data_dir = settings.data_dir.resolve()
        self.log_dir = self.data_dir / "logs"
        self.redis: RedisServer | None = None
        self.redis_url = settings.redis_url
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # The admin key for this stack's user (None with MODTAG_AUTH=false). A temporary one (`modtag scan`)
        # is revoked when the stack stops; the `modtag up` one lasts until the next `modtag up`.
        self.temporary_key = temporary_key
        self.admin_key: str | None = None
        self._admin_key_id: str | None = None
        self._envs: dict[str, dict[str, str]] = {}  # each child's environment, to restart a worker with
        self._restarts: dict[str, list[float]] = {}  # when each worker was restarted (`supervise`)

    @property
    def api_url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{shown}:{self.port}"

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()

    def start(self, ready_timeout_s: float = 600) -> None:
        prepare_data_dir(self.settings)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.embedded_redis:
            self.redis = RedisServer(self.data_dir / "redis").start()
            self.redis_url = self.redis.url
        migrate(self.settings.resolved_database_url)
        self._bootstrap_admin_key()
        if self.port == 0:
            self.port = free_port()
        env = self._child_env()
        self._spawn("api", [sys.executable, "-m", "modtag", "api", "--host", self.host, "--port", str(self.port)], env)
        for index in range(self.workers):
            worker_env = dict(env)
            base_port = self.settings.worker_metrics_port
            worker_env["MODTAG_WORKER_METRICS_PORT"] = str(base_port + index if base_port else 0)
            self._spawn(f"worker-{index}", [sys.executable, "-m", "modtag", "worker"], worker_env)
        self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for the API's /readyz and a ping answer from every worker; fail fast if a child dies."""
        from core.broker import make_celery

        deadline = time.monotonic() + timeout_s
        api_ready = False
        celery = make_celery(self.settings.model_copy(update={"redis_url": self.redis_url}))
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                if not api_ready:
                    with contextlib.suppress(ApiUnreachable), ApiClient(self.api_url, timeout_s=2) as client:
                        api_ready = client.get("/readyz").status_code == 200
                if api_ready:
                    answers = celery.control.ping(timeout=1.0) or []
                    if len(answers) >= self.workers:
                        return
                else:
                    time.sleep(0.2)
        finally:
            celery.close()
        raise StackError(f"the stack was not ready after {timeout_s:.0f}s; logs are in {self.log_dir}")

    def stop(self) -> None:
        """Warm shutdown: workers finish or hand back their jobs, then the API, then Redis."""
        order = sorted(self.processes, key=lambda name: name == "api")  # workers first
        for name in order:
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name in order:
            process = self.processes[name]
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.processes.clear()
        if self.redis:
            self.redis.stop()
            self.redis = None
        if self.temporary_key and self._admin_key_id and self.settings.admin_key is None:
            from core.auth import cli_principal, revoke_key

            with session_scope(self.settings.resolved_database_url) as session:
                revoke_key(session, self._admin_key_id, cli_principal("default"))
            self._admin_key_id = None

    def _bootstrap_admin_key(self) -> None:
        if not self.settings.auth:
            return
        from core.auth import bootstrap_admin_key

        given = self.settings.admin_key.get_secret_value() if self.settings.admin_key else None
        with session_scope(self.settings.resolved_database_url) as session:
            row, self.admin_key = bootstrap_admin_key(session, given, temporary=self.temporary_key)
        self._admin_key_id = row.id

    def _child_env(self) -> dict[str, str]:
        settings = self.settings.model_copy(
            update={
                "redis_url": self.redis_url,
                "database_url": self.settings.resolved_database_url,
                "data_dir": self.data_dir,
            }
        )
        return {**settings_environment(settings), "PYTHONUNBUFFERED": "1"}

    def supervise(self) -> None:
        """While the stack runs: restart a worker that died (its running jobs come back through their lease), up to
        WORKER_RESTARTS times in WORKER_RESTART_WINDOW_S each; any other child's death, or a worker dying too often or
        of its own configuration error, stops the stack (StackError)."""
        for name, process in list(self.processes.items()):
            code = process.poll()
            if code is None:
                continue
            now = time.monotonic()
            recent = [moment for moment in self._restarts.get(name, []) if now - moment < WORKER_RESTART_WINDOW_S]
            if not name.startswith("worker-") or self._own_error(name) or len(recent) >= WORKER_RESTARTS:
                self._check_alive()
            self._restarts[name] = [*recent, now]
            if not self.quiet:
                print(f"{name} exited with status {code}; restarting it (its log: {self.log_dir / name}.log)")
            self._spawn(name, list(process.args), self._envs[name])  # type: ignore[arg-type]

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self._envs[name] = env
        log = (self.log_dir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            code = process.poll()
            if code is not None:
                reason = self._own_error(name)
                if reason:
                    raise StackError(f"{name} could not start: {reason}")
                raise StackError(f"{name} exited with status {code}:\n{self.log_tail(name)}")

    def _own_error(self, name: str) -> str | None:
        """The error line a modtag command printed before exiting (`modtag: <sentence> [code]`), if any."""
        try:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        found = [line.removeprefix("modtag: ") for line in lines if line.startswith("modtag: ")]
        return found[-1] if found else None

    def log_tail(self, name: str, lines: int = 15) -> str:
        path: Path = self.log_dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

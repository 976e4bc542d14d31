"""The embedded Redis of `modtag up` (modtag/servers.py): a real redis-server that refuses clients without its
generated password, which never appears in its command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from modtag.servers import RedisServer


def test_the_embedded_redis_requires_its_generated_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persist=False).start()
    try:
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert server.process is not None
        argv = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode()
        assert server.password not in argv
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
        assert RedisServer(tmp_path / "other").password != server.password
    finally:
        server.stop()

"""Failed key checks by client address: after too many in a window, that address is refused (429) until it passes.

Counters live in Redis (`modtag:authfail:<ip>`, a fixed window: the first failure starts it, the key expires
with it), so every API process sees the same count and memory stays bounded. Only failed key checks count
(a wrong or revoked key, on the API or the dashboard sign-in); a success neither counts nor resets. If Redis
does not answer, the check is skipped (fail open) with one warning: an outage must never lock everyone out.
The address is the client the ASGI server reports: uvicorn replaces the TCP peer with X-Forwarded-For only when
the peer is in FORWARDED_ALLOW_IPS (default 127.0.0.1, a local reverse proxy); nothing else is trusted.
"""

from __future__ import annotations

import logging
import math

from fastapi import Request
from redis import Redis, RedisError

from core.errors import TooManyFailures
from core.metrics import AUTH_FAILURES
from core.settings import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "modtag:authfail:"
# The peer address is at most ~45 characters (IPv6); the cap keeps an odd ASGI server's value from bloating keys.
_MAX_ADDRESS = 64
_warned = False


def client_address(request: Request) -> str:
    """The caller's address as the server reports it (a header a remote caller sends is not trusted)."""
    host = request.client.host if request.client is not None else ""
    return (host or "unknown")[:_MAX_ADDRESS]


def check_failures(redis: Redis, address: str, settings: Settings) -> None:
    """Raise TooManyFailures if `address` has used up its failures in the current window; Redis down: pass."""
    key = KEY_PREFIX + address
    try:
        with redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            raw_count, ttl_ms = pipe.execute()
    except (RedisError, OSError) as exc:
        _warn_once(exc)
        return
    _recovered()
    if raw_count is None or int(raw_count) < settings.auth_max_failures:
        return
    retry_after = math.ceil(ttl_ms / 1000) if ttl_ms > 0 else settings.auth_failure_window_s
    AUTH_FAILURES.labels(code="too_many_failures").inc()
    raise TooManyFailures(
        f"too many failed sign-ins from this address; wait {retry_after} s and use a valid key",
        retry_after_s=max(1, retry_after),
    )


def record_failure(redis: Redis, address: str, settings: Settings) -> None:
    """Count one failed key check of `address`; the first failure of a window starts its expiry."""
    key = KEY_PREFIX + address
    try:
        # SET NX EX then INCR in one transaction: the key always carries its expiry, even if we die between.
        with redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=settings.auth_failure_window_s, nx=True)
            pipe.incr(key)
            pipe.execute()
    except (RedisError, OSError) as exc:
        _warn_once(exc)
        return
    _recovered()


def _warn_once(exc: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("sign-in failure limiting is off while Redis is unavailable (%s)", type(exc).__name__)


def _recovered() -> None:
    # Warn again at the next outage, not at every failed request of this one.
    global _warned
    _warned = False

"""Failed key checks by client address and by key prefix: past the limit in a window, failures answer 429.

The key is always checked first: a valid key is never refused, whatever its address or prefix did (a limiter
that refuses valid keys lets one anonymous client lock every tenant out). A failed check counts against the
client address (`modtag:authfail:<ip>`) and, for a key of the generated shape, its prefix
(`modtag:authfail:key:mtk_<12 hex>`: guesses at one key's secret from many addresses); once either has used up
`auth_max_failures` in the window, further failures are 429 `too_many_failures` with Retry-After instead of 401.
Counters live in Redis (a fixed window: the first failure starts it, the key expires with it), so every API
process sees the same count and memory stays bounded. If Redis does not answer, limiting is skipped (fail open)
with one warning. Single sign-ons started from an address and not finished count the same way, in a bucket of
their own (`modtag:authfail:sso:<ip>`; `count_sso_start`, forgiven when the sign-in completes): each one holds a
flow in Redis for its lifetime, so one address cannot fill Redis with sign-ins nobody finishes. The address is the
TCP peer; X-Forwarded-For replaces it only when the peer is one of
`MODTAG_TRUSTED_PROXIES` (empty by default: not even loopback is trusted; see api.app.server_config).
"""

from __future__ import annotations

import logging
import math

from redis import Redis, RedisError
from starlette.requests import HTTPConnection

from core.auth import generated_prefix
from core.errors import TooManyFailures
from core.metrics import AUTH_FAILURES
from core.settings import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "modtag:authfail:"
# The peer address is at most ~45 characters (IPv6); the cap keeps an odd ASGI server's value from bloating keys.
_MAX_ADDRESS = 64
_warned = False
SSO_BUCKET = "sso:"
# DECR only a live counter: a DECR of a lapsed one would make a key without an expiry.
_FORGIVE = (
    "if redis.call('exists', KEYS[1]) == 1 and tonumber(redis.call('get', KEYS[1])) > 0 then "
    "return redis.call('decr', KEYS[1]) end return 0"
)


def client_address(request: HTTPConnection) -> str:
    """The caller's address as the server reports it (a header a remote caller sends is not trusted)."""
    host = request.client.host if request.client is not None else ""
    return (host or "unknown")[:_MAX_ADDRESS]


def refuse_repeated_failure(redis: Redis, address: str, presented: str | None, settings: Settings) -> None:
    """Count a failed key check against `address` and the presented key's prefix; TooManyFailures when either
    had already used up its failures in the window (the caller answers 401 otherwise)."""
    prefix = generated_prefix(presented) if presented else None
    buckets = [address, *([f"key:{prefix}"] if prefix else [])]
    try:
        for bucket in buckets:
            check_failures(redis, bucket, settings)
    finally:
        for bucket in buckets:
            record_failure(redis, bucket, settings)


def count_sso_start(redis: Redis, address: str, settings: Settings) -> None:
    """Count a single sign-on started from `address` as a failure until `forgive_sso_start`; TooManyFailures when
    the address already has `auth_max_failures` unfinished in the window (Redis down: pass)."""
    bucket = SSO_BUCKET + address
    try:
        check_failures(redis, bucket, settings)
    except TooManyFailures as exc:
        raise TooManyFailures(
            f"too many sign-ins were started from this address and not finished; wait {exc.retry_after_s} s, or "
            "sign in with a key",
            retry_after_s=exc.retry_after_s,
        ) from None
    record_failure(redis, bucket, settings)


def forgive_sso_start(redis: Redis, address: str) -> None:
    """A single sign-on from `address` completed: it no longer counts (a lapsed window is left lapsed)."""
    try:
        redis.eval(_FORGIVE, 1, KEY_PREFIX + SSO_BUCKET + address)
    except (RedisError, OSError) as exc:
        _warn_once(exc)


def check_failures(redis: Redis, address: str, settings: Settings) -> None:
    """Raise TooManyFailures if `address` (or a `key:` bucket) has used up its failures in the window; Redis down:
    pass."""
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
        f"too many failed sign-ins from this address or for this key; wait {retry_after} s and use a valid key",
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

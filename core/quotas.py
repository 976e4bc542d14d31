"""Tenant quotas: how many submissions a tenant may make, as a token bucket per tenant and lane and a daily cap.

A submission costs one token per photo (a job one, a listing one per photo). Each lane (`interactive`, `bulk`) has
its own bucket: `rate` tokens a second up to `burst`; the daily cap counts both lanes' photos per UTC day. A
listing with more photos than the burst waits for a full bucket and empties it (the cap still counts every photo).
Unset limits are unlimited, and a tenant with no limit at all never touches Redis.

The check is one Lua script in Redis (`_CHARGE`): refill, compare and take, and count the day, atomically across
every API process. Keys are per tenant and lane (`modtag:quota:{tenant}:lane:interactive`) and per tenant and day
(`...:day:2026-12-06`), and each expires once it would not matter (a bucket when it would be full again, a day
after the day), so idle tenants cost Redis nothing. The time comes from the API's clock (injectable), not Redis's.

Limits come from the MODTAG_TENANT_* settings, overridden per tenant by an admin of `quota_admin_tenant` through
`/v1/quotas/{tenant}` (a `TenantQuota` row; audited as `quota.set` / `quota.delete`). Redis unreachable: the
submission is admitted (a quota protects the service; refusing everyone during an outage would not), with one log
line per outage and `modtag_dependency_up{dependency="broker"}` at 0 (core/dependencies.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from core import audit
from core.dependencies import RECORD, Dependency, DependencyRecord, outage_of
from core.errors import QuotaExceeded
from core.metrics import QUOTA_ADMITTED, QUOTA_REFUSED, QUOTA_UNCHECKED
from core.principals import Principal
from core.settings import Settings
from core.tables import TenantQuota, utcnow

LANES = ("interactive", "bulk")
FIELDS = ("rate", "burst", "bulk_rate", "bulk_burst", "daily_cap")
KEY_PREFIX = "modtag:quota:"
# During an outage a submission waits for Redis at most this long, and Redis is asked again at most this often;
# submissions in between are admitted unchecked at once.
REDIS_TIMEOUT_S = 0.5
OUTAGE_RETRY_S = 1.0


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; None is unlimited. Bursts left unset follow their rate (at least 1)."""

    rate: float | None = None
    burst: int | None = None
    bulk_rate: float | None = None
    bulk_burst: int | None = None
    daily_cap: int | None = None

    def bucket(self, lane: str) -> tuple[float, int] | None:
        """(tokens per second, capacity) of the lane's bucket, or None when the lane has no rate."""
        rate, burst = (self.bulk_rate, self.bulk_burst) if lane == "bulk" else (self.rate, self.burst)
        if rate is None:
            return None
        return rate, burst if burst is not None else max(1, math.ceil(rate))

    @property
    def unlimited(self) -> bool:
        return self.rate is None and self.bulk_rate is None and self.daily_cap is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """What the bucket said: admitted, or refused for `reason` (`rate`, `daily_cap`) until `retry_after_s`."""

    admitted: bool
    reason: str | None = None
    retry_after_s: int = 0
    checked: bool = True  # False: Redis could not be asked, and the submission was let through


def default_limits(settings: Settings) -> Limits:
    return Limits(
        rate=settings.tenant_rate,
        burst=settings.tenant_burst,
        bulk_rate=settings.tenant_bulk_rate,
        bulk_burst=settings.tenant_bulk_burst,
        daily_cap=settings.tenant_daily_cap,
    )


def effective_limits(settings: Settings, override: Mapping[str, Any] | None) -> Limits:
    """The settings' limits with an override's fields (a number, or None for unlimited) above them."""
    values = default_limits(settings).as_dict()
    values.update({name: value for name, value in (override or {}).items() if name in FIELDS})
    return Limits(**values)


def tenant_limits(session: Session, settings: Settings, tenant: str) -> Limits:
    row = session.get(TenantQuota, tenant)
    return effective_limits(settings, row.limits if row is not None else None)


def list_overrides(session: Session, tenant: str | None = None) -> list[TenantQuota]:
    query = select(TenantQuota).order_by(col(TenantQuota.tenant))
    if tenant is not None:
        query = query.where(TenantQuota.tenant == tenant)
    return list(session.exec(query).all())


def set_override(session: Session, actor: Principal, tenant: str, limits: Mapping[str, Any]) -> TenantQuota:
    """Replace the tenant's override with `limits` (only the fields given); audited in the same transaction."""
    row = session.get(TenantQuota, tenant)
    before = dict(row.limits) if row is not None else None
    if row is None:
        row = TenantQuota(tenant=tenant)
    row.limits = {name: limits[name] for name in FIELDS if name in limits}
    row.updated_at = utcnow()
    row.updated_by = actor.name[:128]
    session.add(row)
    audit.record(session, actor, "quota.set", "tenant_quota", tenant, before=before, after=dict(row.limits))
    session.commit()
    session.refresh(row)
    return row


def delete_override(session: Session, actor: Principal, tenant: str) -> bool:
    """Remove the tenant's override (the settings apply again); False when there was none. Audited."""
    row = session.get(TenantQuota, tenant)
    if row is None:
        return False
    audit.record(session, actor, "quota.delete", "tenant_quota", tenant, before=dict(row.limits), after=None)
    session.delete(row)
    session.commit()
    return True


class QuotaGate:
    """Charges submissions against tenants' buckets in Redis; one per API process (its `clock` injectable)."""

    def __init__(
        self,
        redis: Any,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        record: DependencyRecord = RECORD,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._monotonic = monotonic
        self._record = record
        self._script = redis.register_script(_CHARGE)
        self._skip_until = float("-inf")  # while Redis is down: when to ask it again

    @classmethod
    def for_url(cls, url: str, **options: Any) -> QuotaGate:
        """A gate with its own Redis client: short timeouts and no retries, so an outage never holds a submission
        for more than REDIS_TIMEOUT_S (the client's default retries would hold it for seconds)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0)
        )
        return cls(client, **options)

    def close(self) -> None:
        self._redis.close()

    def charge(self, tenant: str, lane: str, cost: int, limits: Limits) -> Verdict:
        """Take `cost` tokens from the tenant's `lane` bucket and count them toward its day, or refuse (taking
        nothing). Fails open: Redis unreachable admits, unchecked."""
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        bucket = limits.bucket(lane)
        if bucket is None and limits.daily_cap is None:
            verdict = Verdict(admitted=True)
        else:
            verdict = self._ask(tenant, lane, cost, bucket, limits.daily_cap)
        if not verdict.checked:
            QUOTA_UNCHECKED.labels(lane).inc(cost)
        if verdict.admitted:
            QUOTA_ADMITTED.labels(tenant, lane).inc(cost)
        else:
            QUOTA_REFUSED.labels(tenant, lane, verdict.reason or "rate").inc(cost)
        return verdict

    def _ask(self, tenant: str, lane: str, cost: int, bucket: tuple[float, int] | None, cap: int | None) -> Verdict:
        if self._monotonic() < self._skip_until:
            return Verdict(admitted=True, checked=False)
        now = self._clock()
        moment = datetime.fromtimestamp(now, UTC)
        day_end = datetime(moment.year, moment.month, moment.day, tzinfo=UTC) + timedelta(days=1)
        until_day_end = (day_end - moment).total_seconds()
        rate, burst = bucket if bucket is not None else (-1.0, 0)
        keys = [f"{KEY_PREFIX}{{{tenant}}}:lane:{lane}", f"{KEY_PREFIX}{{{tenant}}}:day:{moment.date().isoformat()}"]
        args = [repr(now), repr(rate), burst, cost, -1 if cap is None else cap, repr(until_day_end)]
        try:
            admitted, reason, wait = self._script(keys=keys, args=args)
        except Exception as exc:
            outage = outage_of(exc)
            if outage is None:
                raise
            self._record.failed(outage)
            self._skip_until = self._monotonic() + OUTAGE_RETRY_S
            return Verdict(admitted=True, checked=False)
        self._record.succeeded(Dependency.BROKER)
        if int(admitted) == 1:
            return Verdict(admitted=True)
        return Verdict(admitted=False, reason=_text(reason), retry_after_s=max(1, math.ceil(float(_text(wait)) - 1e-9)))


def refusal(verdict: Verdict, tenant: str, lane: str, cost: int, limits: Limits) -> QuotaExceeded:
    """The 429 a refused verdict answers, saying which limit and when to come back."""
    what = f"these {cost} photos fit" if cost > 1 else "this submission fits"
    if verdict.reason == "daily_cap" and limits.daily_cap is not None and cost > limits.daily_cap:
        detail = (
            f"these {cost} photos are more than tenant {tenant!r}'s whole daily cap of {limits.daily_cap} "
            "submissions: send fewer at once, or ask an operator to raise the cap"
        )
    elif verdict.reason == "daily_cap":
        detail = (
            f"tenant {tenant!r} reached its daily cap of {limits.daily_cap} submissions (UTC day); "
            f"retry after {verdict.retry_after_s} s, or ask an operator to raise it"
        )
    else:
        bucket = limits.bucket(lane)
        rate = f"{bucket[0]:g}/s, burst {bucket[1]}" if bucket else "?"
        detail = (
            f"tenant {tenant!r} is over its {lane} submission rate ({rate}); {what} in "
            f"{verdict.retry_after_s} s: retry after it (Retry-After)"
        )
    return QuotaExceeded(detail, retry_after_s=verdict.retry_after_s)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# KEYS: the lane's bucket, the tenant's day counter. ARGV: now (s), rate (tokens/s; < 0: no bucket), burst, cost,
# daily cap (< 0: none), seconds until the UTC day ends. Returns {1, "", "0"} admitted, or {0, reason, seconds to
# wait}: strings, since Redis truncates a Lua number it returns to an integer. A refusal takes nothing.
_CHARGE = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, cap, day_left = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if cap >= 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + cost > cap then
    return {0, 'daily_cap', tostring(day_left)}
  end
end
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens, at = tonumber(state[1]), tonumber(state[2])
  if tokens == nil or at == nil then
    tokens, at = burst, now
  end
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  local need = math.min(cost, burst)
  if tokens < need then
    return {0, 'rate', tostring((need - tokens) / rate)}
  end
  tokens = tokens - need
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1)
end
if cap >= 0 then
  redis.call('INCRBY', KEYS[2], cost)
  redis.call('EXPIRE', KEYS[2], math.ceil(day_left) + 3600)
end
return {1, '', '0'}
"""

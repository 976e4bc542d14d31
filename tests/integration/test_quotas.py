"""Tenant quotas: the token bucket and the daily cap in a real Redis with an injected clock (no sleeps), the 429 with
Retry-After over real HTTP while another tenant goes on, replays free, the admin routes and what they refuse, and
submissions admitted while Redis is unreachable."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from core.dependencies import DependencyRecord
from core.errors import ConfigError
from core.quotas import KEY_PREFIX, Limits, QuotaGate, refusal
from core.settings import load_settings
from modtag.cli import main
from modtag.client import ApiClient
from modtag.servers import free_port
from tests.support.api import Api, admin_key, api_settings, assert_error, running_api

IMAGE_URL = "https://img.example/a.jpg"


class Clock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


# --- the bucket, in Redis ------------------------------------------------------------------------------------------


def test_the_bucket_refills_at_the_rate_on_the_injected_clock(client: redis.Redis) -> None:
    clock = Clock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    gate = QuotaGate(client, clock=clock)
    limits = Limits(rate=0.5, burst=2)
    assert gate.charge("acme", "interactive", 1, limits).admitted
    assert gate.charge("acme", "interactive", 1, limits).admitted
    refused = gate.charge("acme", "interactive", 1, limits)
    assert not refused.admitted and refused.reason == "rate" and refused.retry_after_s == 2  # one token per 2 s
    assert gate.charge("other", "interactive", 1, limits).admitted  # another tenant has its own bucket
    clock.now += 1.5
    assert gate.charge("acme", "interactive", 1, limits).retry_after_s == 1  # half a second left, in whole seconds
    clock.now += 0.5
    assert gate.charge("acme", "interactive", 1, limits).admitted
    assert not gate.charge("acme", "interactive", 1, limits).admitted  # a refusal took nothing, the refill did
    clock.now += 3600  # an hour idle fills the bucket to its burst, never past it
    assert [gate.charge("acme", "interactive", 1, limits).admitted for _ in range(3)] == [True, True, False]
    bucket_ttl = client.ttl(f"{KEY_PREFIX}{{acme}}:lane:interactive")
    assert 0 < bucket_ttl <= 5  # gone once it would be full again: idle tenants cost Redis nothing


def test_lanes_have_their_own_budgets_and_a_listing_costs_its_photos(client: redis.Redis) -> None:
    clock = Clock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    gate = QuotaGate(client, clock=clock)
    limits = Limits(rate=1, burst=3, bulk_rate=100, bulk_burst=100)
    assert gate.charge("shop", "interactive", 2, limits).admitted  # a listing of two photos
    refused = gate.charge("shop", "interactive", 2, limits)
    assert not refused.admitted and refused.retry_after_s == 1
    assert gate.charge("shop", "bulk", 50, limits).admitted  # a backfill does not eat the live uploads' budget
    clock.now += 1  # two tokens of three
    # More photos than the burst: waits for a full bucket, then empties it.
    assert not gate.charge("shop", "interactive", 10, limits).admitted
    clock.now += 1
    assert gate.charge("shop", "interactive", 10, limits).admitted
    assert not gate.charge("shop", "interactive", 1, limits).admitted


def test_the_daily_cap_counts_both_lanes_until_the_utc_day_rolls_over(client: redis.Redis) -> None:
    clock = Clock(datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC))
    gate = QuotaGate(client, clock=clock)
    limits = Limits(daily_cap=3)
    assert gate.charge("capped", "interactive", 2, limits).admitted
    assert gate.charge("capped", "bulk", 1, limits).admitted
    refused = gate.charge("capped", "bulk", 1, limits)
    assert not refused.admitted and refused.reason == "daily_cap" and refused.retry_after_s == 30
    assert 0 < client.ttl(f"{KEY_PREFIX}{{capped}}:day:2026-03-01") <= 30 + 3600
    clock.now += 30
    assert gate.charge("capped", "interactive", 3, limits).admitted  # a new day
    assert not gate.charge("capped", "interactive", 1, limits).admitted
    # A listing larger than the whole cap would never fit: the answer says so instead of "come back tomorrow".
    oversized = gate.charge("fresh", "interactive", 4, limits)
    assert "more than tenant 'fresh''s whole daily cap" in refusal(oversized, "fresh", "interactive", 4, limits).message


def test_redis_unreachable_admits_with_one_log_line_per_outage(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    record, ticks = DependencyRecord(), Clock(datetime(2026, 3, 1, tzinfo=UTC))
    # This test's own outage record, and a clock it moves for the pause between asking a Redis that is down.
    gate = QuotaGate.for_url(f"redis://127.0.0.1:{port}/0", record=record, monotonic=ticks)
    limits = Limits(rate=0.001, burst=1)
    with caplog.at_level(logging.INFO, logger="core.dependencies"):
        verdicts = [gate.charge("acme", "interactive", 1, limits) for _ in range(3)]
        assert all(verdict.admitted and not verdict.checked for verdict in verdicts)
        assert not record.is_up("broker")
        ticks.now += 2  # past OUTAGE_RETRY_S: asked again, still down, still admitted, no second line
        assert gate.charge("acme", "interactive", 1, limits).admitted
    gate.close()
    assert len([r for r in caplog.records if "broker unreachable" in r.getMessage()]) == 1
    # Back up (a live Redis behind a gate that saw it down): checked again, and the outage's end is logged once.
    live = QuotaGate.for_url(redis_server.url, record=record, monotonic=ticks)
    with caplog.at_level(logging.INFO, logger="core.dependencies"):
        assert live.charge("acme-up", "interactive", 1, limits).checked
    live.close()
    assert record.is_up("broker")
    assert len([r for r in caplog.records if "reachable again" in r.getMessage()]) == 1


def test_quota_settings_refuse_broken_values() -> None:
    assert load_settings(tenant_rate="unlimited", tenant_daily_cap="").tenant_rate is None
    assert load_settings(tenant_rate="2.5", tenant_burst="10").tenant_burst == 10
    for name, value in (
        ("tenant_rate", "-1"),
        ("tenant_rate", "0"),
        ("tenant_rate", "nan"),
        ("tenant_rate", "inf"),
        ("tenant_rate", "fast"),
        ("tenant_burst", "0"),
        ("tenant_burst", "1.5"),
        ("tenant_bulk_rate", "1e300"),
        ("tenant_daily_cap", "-5"),
        ("tenant_daily_cap", "9" * 30),
        ("quota_admin_tenant", "Not A Tenant"),
    ):
        with pytest.raises(ConfigError, match=f"MODTAG_{name.upper()}"):
            load_settings(**{name: value})


# --- over HTTP -----------------------------------------------------------------------------------------------------


def submit(client: ApiClient, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/jobs", json={"image_url": IMAGE_URL}, headers=headers)


def tenant_client(api: Api, tenant: str, role: str = "submit") -> ApiClient:
    return ApiClient(api.base_url, key=admin_key(api.db_url, role=role, tenant=tenant), timeout_s=30)


def test_a_tenant_past_its_quota_gets_429_and_another_goes_on(api: Api) -> None:
    tenant = f"rated-{api.settings.resolved_database_url[:6]}"  # one per backend: they share one Redis
    put = api.client.put(f"/v1/quotas/{tenant}", json={"rate": 0.001, "burst": 2})
    assert put.status_code == 200, put.text
    with tenant_client(api, tenant) as rated, tenant_client(api, f"free-{tenant}") as free:
        first = submit(rated, "order-1")
        assert first.status_code == 202, first.text
        assert submit(rated).status_code == 202
        refused = submit(rated)
        body = assert_error(refused, 429, "quota_exceeded")
        assert refused.headers["Retry-After"] == "1000"  # a token every 1000 s, whole seconds
        assert "rate" in body["detail"] and tenant in body["detail"]
        replay = submit(rated, "order-1")  # a replay is not charged: it is answered even now
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
        assert all(submit(free).status_code == 202 for _ in range(3))
    exposition = api.client.get("/metrics").text
    assert f'modtag_quota_refused_total{{lane="interactive",reason="rate",tenant="{tenant}"}} 1.0' in exposition


def test_the_daily_cap_over_http_and_a_listing_counts_its_photos(api: Api) -> None:
    tenant = f"capped-{api.settings.resolved_database_url[:6]}"
    assert api.client.put(f"/v1/quotas/{tenant}", json={"daily_cap": 3}).status_code == 200
    with tenant_client(api, tenant) as capped:
        listing = capped.post("/v1/listings", json={"image_urls": [IMAGE_URL, IMAGE_URL], "title": "Two mugs"})
        assert listing.status_code == 202, listing.text
        assert submit(capped).status_code == 202
        refused = submit(capped)
        assert_error(refused, 429, "quota_exceeded")
        assert 1 <= int(refused.headers["Retry-After"]) <= 86_400  # until the UTC day rolls over
        assert "daily cap of 3" in refused.json()["detail"]


def test_overrides_through_the_api_are_audited(api: Api) -> None:
    tenant = f"tuned-{api.settings.resolved_database_url[:6]}"
    put = api.client.put(f"/v1/quotas/{tenant}", json={"rate": 5, "burst": None, "daily_cap": 1000})
    assert put.status_code == 200, put.text
    assert put.json()["override"] == {"rate": 5, "burst": None, "daily_cap": 1000}
    assert put.json()["limits"] == {"rate": 5, "burst": None, "bulk_rate": None, "bulk_burst": None, "daily_cap": 1000}
    assert put.json()["updated_by"] == "test admin"
    assert api.client.get(f"/v1/quotas/{tenant}").json() == put.json()
    assert tenant in [entry["tenant"] for entry in api.client.get("/v1/quotas").json()["data"]]
    whole = api.client.put(f"/v1/quotas/{tenant}", json={"burst": 13.0})  # JSON Schema's integer 13
    assert whole.status_code == 200 and whole.json()["override"] == {"burst": 13}
    deleted = api.client.delete(f"/v1/quotas/{tenant}")
    assert deleted.status_code == 200 and deleted.json()["override"] is None
    assert_error(api.client.delete(f"/v1/quotas/{tenant}"), 404, "quota_not_found")
    actions = [e["action"] for e in api.client.get("/v1/audit", params={"action": "quota."}).json()["data"]]
    assert actions[:3] == ["quota.delete", "quota.set", "quota.set"]


def test_the_quotas_command_sets_only_the_limits_it_names(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    tenant = f"cli-{api.settings.resolved_database_url[:6]}"
    connect = ["--api", api.base_url, "--api-key", api.key]

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["quotas", *argv, *connect])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("set", tenant, "--rate", "5", "--daily-cap", "1000")[0] == 0
    assert api.client.get(f"/v1/quotas/{tenant}").json()["override"] == {"rate": 5, "daily_cap": 1000}
    # Another limit later keeps the first ones; `unlimited` is null, `default` leaves the override.
    code, out, _ = run("set", tenant, "--burst", "unlimited", "--daily-cap", "default", "--bulk-rate", "0.5")
    assert code == 0 and f"tenant {tenant} (set by test admin)" in out
    assert api.client.get(f"/v1/quotas/{tenant}").json()["override"] == {"rate": 5, "burst": None, "bulk_rate": 0.5}
    assert "rate" in out and "unlimited  (override)" in out and "(setting)" in out
    code, out, _ = run("show", tenant, "--json")
    assert code == 0 and json.loads(out)["limits"]["rate"] == 5
    code, out, _ = run("list")
    assert code == 0 and out.startswith("defaults (MODTAG_TENANT_*): ") and f"{tenant}: rate 5" in out
    assert run("delete", tenant)[0] == 0
    assert api.client.get(f"/v1/quotas/{tenant}").json()["override"] is None

    # Refusals: what the API refuses is one line with its code; what is not a limit never reaches it.
    code, _, err = run("delete", tenant)
    assert code == 3 and "(quota_not_found)" in err and "Traceback" not in err
    code, _, err = run("set", tenant, "--rate", "0")
    assert code == 3 and "(invalid_field)" in err
    for bad in ("many", "-1", "nan", "inf", "1e999", "x" * 10_000):
        with pytest.raises(SystemExit) as exited:
            main(["quotas", "set", tenant, "--rate", bad, *connect])
        assert exited.value.code == 2, bad
    assert run("set", tenant)[0] == 2  # no limit named
    assert run("set", "UPPER", "--rate", "1")[0] == 3
    reviewer = admin_key(api.db_url, role="review", name="a reviewer")
    assert main(["quotas", "list", "--api", api.base_url, "--api-key", reviewer]) == 3
    assert api.client.get(f"/v1/quotas/{tenant}").json()["override"] is None  # nothing refused was stored


def test_the_admin_route_refuses_hostile_input(api: Api) -> None:
    path = "/v1/quotas/hostile"
    for body in (
        {"rate": -1},
        {"rate": 0},
        {"rate": 1e300},
        {"rate": "5"},
        {"rate": True},
        {"burst": 1.5},
        {"burst": 0},
        {"burst": 10**12},
        {"daily_cap": -1},
        {"daily_cap": "many"},
        {"daily_cap": [1]},
    ):
        assert_error(api.client.put(path, json=body), 422, "invalid_field")
    assert "limit" in api.client.put(path, json={"limit": 5}).json()["detail"]  # an unknown field is named
    assert api.client.put(path, json={"limit": 5}).status_code == 422
    nan = api.client.put(path, content=b'{"rate": NaN}', headers={"Content-Type": "application/json"})
    assert nan.status_code == 422
    assert api.client.put(path, json=[5]).status_code == 422
    huge = json.dumps({"rate": 1, "x": "y" * (api.settings.max_body_bytes + 10)})
    assert api.client.put(path, content=huge, headers={"Content-Type": "application/json"}).status_code == 413
    for tenant in ("UPPER", "a" * 65, "-x", "x%00"):
        assert api.client.put(f"/v1/quotas/{tenant}", json={"rate": 1}).status_code in (404, 422), tenant
    assert api.client.get("/v1/quotas/hostile").json()["override"] is None  # nothing was stored


def test_a_tenant_admin_reads_its_own_quota_and_changes_none(api: Api) -> None:
    tenant = f"tenant-{api.settings.resolved_database_url[:6]}"
    assert api.client.put(f"/v1/quotas/{tenant}", json={"rate": 2}).status_code == 200
    with tenant_client(api, tenant, role="admin") as own:
        assert own.get(f"/v1/quotas/{tenant}").json()["limits"]["rate"] == 2
        assert [entry["tenant"] for entry in own.get("/v1/quotas").json()["data"]] == [tenant]
        assert_error(own.get("/v1/quotas/default"), 404, "quota_not_found")
        assert_error(own.put("/v1/quotas/default", json={"rate": 1}), 404, "quota_not_found")
        assert_error(own.put(f"/v1/quotas/{tenant}", json={"rate": 1000}), 403, "forbidden")
        assert_error(own.delete(f"/v1/quotas/{tenant}"), 403, "forbidden")
    with tenant_client(api, tenant, role="submit") as submitter:
        assert_error(submitter.get(f"/v1/quotas/{tenant}"), 403, "forbidden")


def test_submissions_are_admitted_while_redis_is_unreachable(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'modtag.db'}"  # what is checked is Redis: one backend is enough
    settings = api_settings(tmp_path, database_url, f"redis://127.0.0.1:{free_port()}/0", tenant_rate=0.001)
    with running_api(settings) as server:
        for _ in range(3):  # past the rate: it cannot be checked, so it is let through, never a 500
            response = submit(server.client)
            assert response.status_code == 202, response.text

"""Failed key checks are limited by client address and key prefix, and a valid key is never refused: the API and
the dashboard sign-in, over real HTTP and Redis."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.failures import KEY_PREFIX, check_failures, record_failure
from core.errors import TooManyFailures
from core.metrics import AUTH_FAILURES
from modtag.client import ApiClient
from modtag.servers import free_port
from tests.support.api import Api, api_settings, assert_error, raw_http, running_api
from tests.support.waiting import wait_for

LIMIT = 10
ADDRESS = "127.0.0.1"  # every request of these tests comes from here


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    # A local reverse proxy, configured: X-Forwarded-For from loopback names the client (unset, it does not).
    return {"auth_max_failures": LIMIT, "auth_failure_window_s": 300, "trusted_proxies": "127.0.0.1"}


@pytest.fixture(autouse=True)
def clean_counters(api: Api) -> Iterator[None]:
    """Each test starts with no failures counted (the Redis is shared with other modules)."""
    api.redis.delete(*api.redis.keys(KEY_PREFIX + "*") or [KEY_PREFIX + ADDRESS])
    yield
    api.redis.delete(*api.redis.keys(KEY_PREFIX + "*") or [KEY_PREFIX + ADDRESS])


def _bad(api: Api, key: str = "mtk_wrong") -> httpx.Response:
    return api.client.get("/v1/audit", headers={"Authorization": f"Bearer {key}"})


def _bad_from(api: Api, address: str, key: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": address}
    return api.client.get("/v1/audit", headers=headers)


def _count(code: str) -> float:
    return AUTH_FAILURES.labels(code=code)._value.get()


def test_the_eleventh_failure_is_refused_but_a_valid_key_never_is(api: Api) -> None:
    for _ in range(LIMIT):
        assert_error(_bad(api), 401, "auth_invalid")
    before = _count("too_many_failures")
    refused = _bad(api)
    body = assert_error(refused, 429, "too_many_failures")
    assert "wait" in body["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 300
    assert _count("too_many_failures") == before + 1
    with ApiClient(api.base_url) as other:
        assert_error(other.get("/v1/audit", headers={"X-API-Key": "mtk_wrong"}), 429, "too_many_failures")
    # The key is checked first: the admin's own key from the locked-out address still works.
    assert api.client.get("/v1/audit").status_code == 200
    # Probes and metrics carry no key and stay open.
    for path in ("/healthz", "/metrics"):
        assert api.client.get(path, headers={"Authorization": ""}).status_code == 200
    with ApiClient(api.base_url) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        assert_error(anonymous.get("/v1/audit"), 401, "auth_required")  # no key: not an attempt


def test_wrong_keys_promising_big_bodies_are_counted_unread_and_a_valid_key_still_works(api: Api) -> None:
    def promise(key: str, path: str = "/v1/review/x/resolve", length: int = 50_000_000) -> tuple[int, dict[str, Any]]:
        # Only the head: a server that read (or waited for) the body before checking the key would not answer.
        head = f"POST {path} HTTP/1.1\nHost: t\nContent-Type: application/json\nContent-Length: {length}\n"
        return raw_http(api.base_url, head + f"Authorization: Bearer {key}\n")

    for index in range(LIMIT):
        path = "/v1/jobs" if index % 2 else "/v1/review/x/resolve"
        status, body = promise("mtk_wrong", path, 50_000_000 if index % 3 else 4000)
        assert (status, body["code"]) == (401, "auth_invalid")
    assert int(api.redis.get(KEY_PREFIX + ADDRESS) or 0) == LIMIT
    status, body = promise("mtk_wrong")
    assert (status, body["code"]) == (429, "too_many_failures")
    # The valid key from the same address is checked first and never refused: its big body gets the body limit.
    status, body = promise(api.key)
    assert (status, body["code"]) == (413, "body_too_large")
    assert api.client.get("/v1/audit").status_code == 200


def test_another_address_is_unaffected(api: Api) -> None:
    # uvicorn takes X-Forwarded-For only from FORWARDED_ALLOW_IPS (default 127.0.0.1: a local proxy), which is
    # where these requests come from: so here it names the client, as a local reverse proxy would.
    for index in range(LIMIT):
        assert_error(_bad(api, f"mtk_{index}"), 401, "auth_invalid")
    assert_error(_bad(api), 429, "too_many_failures")
    other = _bad_from(api, "203.0.113.9", "mtk_other")
    assert_error(other, 401, "auth_invalid")
    assert int(api.redis.get(KEY_PREFIX + "203.0.113.9") or 0) == 1


def test_forwarded_for_from_loopback_is_not_trusted_unless_configured(tmp_path: Path, api: Api) -> None:
    settings = api_settings(tmp_path, api.db_url, api.settings.redis_url, auth_max_failures=LIMIT)
    assert settings.trusted_proxies == ""
    with running_api(settings) as default:
        for index in range(LIMIT):  # each claims another address: none is believed
            assert_error(_bad_from(default, f"198.51.100.{index}", "mtk_x"), 401, "auth_invalid")
        assert_error(_bad_from(default, "198.51.100.200", "mtk_x"), 429, "too_many_failures")
        assert int(default.redis.get(KEY_PREFIX + ADDRESS) or 0) == LIMIT + 1
        assert default.redis.keys(KEY_PREFIX + "198.51.100.*") == []


def test_guesses_at_one_key_are_limited_by_its_prefix_from_any_address(api: Api) -> None:
    from core.auth import generated_prefix

    prefix = generated_prefix(api.key)
    assert prefix is not None
    for index in range(LIMIT):
        guess = api.key[:-8] + secrets.token_urlsafe(6)[:8]
        assert_error(_bad_from(api, f"192.0.2.{index}", guess), 401, "auth_invalid")
    guess = api.key[:-8] + "AAAAAAAA"
    assert_error(_bad_from(api, "192.0.2.250", guess), 429, "too_many_failures")  # a fresh address, the same prefix
    assert int(api.redis.get(f"{KEY_PREFIX}key:{prefix}") or 0) == LIMIT + 1
    # The key itself, from any address, is never refused.
    assert api.client.get("/v1/audit", headers={"X-Forwarded-For": "192.0.2.250"}).status_code == 200
    assert api.client.get("/v1/audit").status_code == 200


def test_successes_do_not_count(api: Api) -> None:
    for _ in range(3 * LIMIT):
        assert api.client.get("/v1/audit").status_code == 200
    assert api.redis.get(KEY_PREFIX + ADDRESS) is None
    for _ in range(LIMIT - 1):
        assert_error(_bad(api), 401, "auth_invalid")
    assert api.client.get("/v1/audit").status_code == 200  # 9 failures and a success: still allowed
    assert int(api.redis.get(KEY_PREFIX + ADDRESS) or 0) == LIMIT - 1


def test_revoked_and_malformed_keys_count(api: Api) -> None:
    for _ in range(LIMIT // 2):
        assert_error(api.client.get("/v1/audit", headers={"Authorization": "Basic abc"}), 401, "auth_invalid")
    for _ in range(LIMIT - LIMIT // 2):
        assert_error(_bad(api), 401, "auth_invalid")
    assert_error(_bad(api), 429, "too_many_failures")
    assert api.client.get("/v1/audit").status_code == 200


def test_hostile_keys_are_counted_by_address_only(api: Api) -> None:
    hostile = ["x" * 4000, "mtk_" + "é" * 100, "mtk_" + secrets.token_hex(40), "a b c", "%00" * 50]
    for key in hostile * 2:
        response = api.client.get("/v1/audit", headers={b"Authorization": b"Bearer " + key.encode()})
        assert response.status_code == 401, response.text
    assert api.redis.keys(KEY_PREFIX + "*") == [(KEY_PREFIX + ADDRESS).encode()]
    assert int(api.redis.get(KEY_PREFIX + ADDRESS) or 0) == 2 * len(hostile)
    assert 0 < api.redis.ttl(KEY_PREFIX + ADDRESS) <= 300  # a window, never a key without expiry
    assert_error(_bad(api), 429, "too_many_failures")


def test_the_counter_is_per_address_and_fixed_window(api: Api) -> None:
    settings = api.settings.model_copy(update={"auth_max_failures": 3, "auth_failure_window_s": 1})
    for _ in range(3):
        check_failures(api.redis, "10.0.0.1", settings)
        record_failure(api.redis, "10.0.0.1", settings)
    with pytest.raises(TooManyFailures) as refused:
        check_failures(api.redis, "10.0.0.1", settings)
    assert refused.value.code == "too_many_failures" and refused.value.http_status == 429
    assert refused.value.retry_after_s == 1
    check_failures(api.redis, "10.0.0.2", settings)  # another address is unaffected
    check_failures(api.redis, "2001:db8::1", settings)
    wait_for(lambda: not api.redis.exists(KEY_PREFIX + "10.0.0.1"), 5, "the window's key expired")
    check_failures(api.redis, "10.0.0.1", settings)  # the window passed: allowed again


def test_the_window_passes_over_http(tmp_path: Path, api: Api) -> None:
    settings = api_settings(tmp_path, api.db_url, api.settings.redis_url, auth_max_failures=2, auth_failure_window_s=1)
    with running_api(settings) as short:
        for _ in range(2):
            assert_error(_bad(short), 401, "auth_invalid")
        refused = _bad(short)
        assert_error(refused, 429, "too_many_failures")
        assert refused.headers["Retry-After"] == "1"
        wait_for(lambda: not short.redis.exists(KEY_PREFIX + ADDRESS), 5, "the window's key expired")
        assert_error(_bad(short), 401, "auth_invalid")


def test_redis_down_fails_open(tmp_path: Path, api: Api, caplog: pytest.LogCaptureFixture) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    settings = api_settings(tmp_path, api.db_url, dead_url, auth_max_failures=1)
    with caplog.at_level("WARNING", logger="api.failures"), running_api(settings, create_app(settings)) as dead:
        for _ in range(5):
            assert_error(_bad(dead), 401, "auth_invalid")  # never 429, never 500
        assert dead.client.get("/v1/audit").status_code == 200
        with ApiClient(dead.base_url) as browser:
            form = browser.get("/dashboard/login")
            wrong = browser.post("/dashboard/login", data={"key": "mtk_nope", "csrf_token": _csrf(form)})
            assert wrong.status_code == 401
    warnings = [record for record in caplog.records if "failure limiting is off" in record.getMessage()]
    assert len(warnings) == 1


def test_dashboard_sign_in_is_limited_with_a_page(api: Api) -> None:
    with ApiClient(api.base_url) as browser:
        page = browser.get("/dashboard/login")
        for _ in range(LIMIT):
            page = browser.post("/dashboard/login", data={"key": "mtk_nope", "csrf_token": _csrf(page)})
            assert page.status_code == 401
        refused = browser.post(
            "/dashboard/login", data={"key": "mtk_nope", "csrf_token": _csrf(page)}, follow_redirects=False
        )
        assert refused.status_code == 429
        assert refused.headers["content-type"].startswith("text/html")
        assert 1 <= int(refused.headers["Retry-After"]) <= 300
        assert "too many failed sign-ins" in refused.text
        assert "modtag_session" not in refused.headers.get("set-cookie", "")
        signed_in = browser.post(
            "/dashboard/login", data={"key": api.key, "csrf_token": _csrf(refused)}, follow_redirects=False
        )
        assert signed_in.status_code == 303  # the valid key is never refused
        assert "modtag_session" in signed_in.headers.get("set-cookie", "")
    # Failures at the sign-in count for the API too: one address, one counter.
    assert_error(_bad(api), 429, "too_many_failures")


def test_api_failures_lock_the_sign_in_too(api: Api) -> None:
    for _ in range(LIMIT):
        assert_error(_bad(api), 401, "auth_invalid")
    with ApiClient(api.base_url) as browser:
        form = browser.get("/dashboard/login")
        assert form.status_code == 200  # the form itself is not an attempt
        refused = browser.post("/dashboard/login", data={"key": "mtk_nope", "csrf_token": _csrf(form)})
        assert refused.status_code == 429


def _csrf(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)

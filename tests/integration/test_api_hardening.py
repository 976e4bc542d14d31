"""The audit's small findings, over real HTTP against the API on SQLite and PostgreSQL: a webhook secret revoked at
once, callbacks to private hosts refused at submit, no Host header in redirects, 415 closing the connection, the
431 of oversized headers, every method of a path in `Allow`."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from core import webhooks
from core.db import session_scope
from modtag.cli import main
from tests.support.api import Api, api_settings, assert_error, running_api

pytestmark = pytest.mark.timeout(120)


# -- webhook secrets ---------------------------------------------------------------------------------------------


def test_a_leaked_webhook_secret_is_revoked_at_once(api: Api) -> None:
    old = api.client.get("/v1/webhooks/secret").json()["secret"]
    overlapping = api.client.post("/v1/webhooks/secret/rotate").json()
    with session_scope(api.db_url) as session:
        assert webhooks.signing_secrets(session, "default") == [overlapping["secret"], old]

    revoked = api.client.post("/v1/webhooks/secret/rotate", params={"revoke_old": "true"})

    assert revoked.status_code == 200, revoked.text
    new = revoked.json()
    assert new["previous_valid_until"] == new["created_at"]
    with session_scope(api.db_url) as session:
        assert webhooks.signing_secrets(session, "default") == [new["secret"]]  # neither earlier one signs now
    audit = api.client.get("/v1/audit", params={"action": "webhook_secret.rotate"}).json()["data"]
    assert [entry["after"]["revoke_old"] for entry in audit[:2]] == [True, False]
    assert not any(secret in json.dumps(audit) for secret in (old, overlapping["secret"], new["secret"]))


# -- callbacks -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "callback",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://10.0.0.7/hook",
        "http://169.254.169.254/latest",
        "http://2130706433/hook",  # 127.0.0.1 spelled as one number
        "https://no-such-host.invalid/hook",  # read the same as an internal name: no map of the network
    ],
)
def test_callbacks_to_private_hosts_are_refused_at_submit(api: Api, photos: dict[str, bytes], callback: str) -> None:
    before = api.job_count()
    refusals = [
        api.upload(photos["rocket"], callback_url=callback),
        api.client.post("/v1/jobs", json={"image_url": "https://93.184.215.14/a.jpg", "callback_url": callback}),
        api.client.post(
            "/v1/listings",
            files=[("images", ("a.jpg", photos["rocket"], "image/jpeg"))],
            data={"title": "A rocket", "callback_url": callback},
        ),
    ]
    for response in refusals:
        body = assert_error(response, 422, "callback_forbidden")
        assert "callback_url" in body["detail"] and "MODTAG_FETCH_ALLOW_PRIVATE" in body["detail"]
        assert "loopback" not in body["detail"] and "resolves" not in body["detail"]
    assert api.job_count() == before


def test_a_public_callback_host_is_accepted(api: Api, photos: dict[str, bytes]) -> None:
    response = api.upload(photos["rocket"], callback_url="https://93.184.215.14/hook")
    assert response.status_code == 202, response.text


def test_private_callbacks_are_accepted_when_the_private_setting_is_on(
    api: Api, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api.settings, "fetch_allow_private", True)
    response = api.upload(photos["rocket"], callback_url="http://127.0.0.1:9/hook")
    assert response.status_code == 202, response.text


# -- HTTP edges ------------------------------------------------------------------------------------------------------


def test_a_trailing_slash_redirect_never_reflects_the_host_header(api: Api) -> None:
    hostile = {"Host": "evil.example"}
    response = api.client.get("/v1/decisions/", params={"limit": "5"}, headers=hostile, follow_redirects=False)
    assert response.status_code == 307, response.text
    assert response.headers["location"] == "/v1/decisions?limit=5"
    assert api.client.get("/v1/decisions/", follow_redirects=True).status_code == 200  # clients keep working
    assert_error(api.client.get("//evil.example/", headers=hostile, follow_redirects=False), 404, "not_found")


def test_405_allows_every_method_of_the_path(api: Api) -> None:
    response = api.client.put("/v1/jobs/00000000000000000000000000")
    assert_error(response, 405, "method_not_allowed")
    allowed = {method.strip() for method in response.headers["allow"].split(",")}
    assert {"GET", "DELETE"} <= allowed, allowed
    assert "GET" in response.json()["detail"] and "DELETE" in response.json()["detail"]


def test_415_on_an_upload_closes_the_connection(api: Api) -> None:
    boundary = "modtagboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\n{'not an image ' * 100}\r\n--{boundary}--\r\n"
    ).encode()
    address = urlsplit(api.base_url)
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Bearer {api.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        received = b""
        try:
            while chunk := sock.recv(65536):  # ends only when the server closes
                received += chunk
        except TimeoutError:
            pytest.fail(f"the server kept the connection open after {received[:200]!r}")
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.split()[1] == b"415", received[:300]
    assert b"connection: close" in rest.partition(b"\r\n\r\n")[0].lower()


def test_oversized_headers_are_431_as_documented(api: Api) -> None:
    limit = api.settings.max_header_bytes
    assert_error(api.client.get("/healthz", headers={"X-Padding": "p" * (limit + 100)}), 431, "headers_too_large")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `MODTAG_MAX_HEADER_BYTES`")]
    assert "431 `headers_too_large`" in row and "400" not in row
    description = api.client.get("/openapi.json").json()["info"]["description"]
    assert "past it 431 `headers_too_large`" in description


# -- the command line against the API --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["mtk_" + "0" * 40, None])
def test_scan_with_a_refused_key_exits_3_with_one_line(
    api: Api, photos: dict[str, bytes], tmp_path: Path, key: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "rocket.jpg"
    photo.write_bytes(photos["rocket"])
    argv = ["scan", "--no-progress", "--api", api.base_url, *(["--api-key", key] if key else []), str(photo)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modtag: the API refused the request") and "[auth_" in err, err


def test_scan_past_the_failed_key_limit_exits_3(
    db_url: str, redis_server: Any, tmp_path: Path, photos: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    # Behind a proxy every client may share one address: the refusal then comes as 429, and is still the key's.
    settings = api_settings(tmp_path, db_url, redis_server.url, auth_max_failures=1, auth_failure_window_s=60)
    photo = tmp_path / "rocket.jpg"
    photo.write_bytes(photos["rocket"])
    with running_api(settings) as limited:
        argv = ["scan", "--no-progress", "--api", limited.base_url, "--api-key", "mtk_" + "1" * 40, str(photo)]
        main(argv)  # the first refusal: 401
        capsys.readouterr()
        assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[too_many_failures]" in err, err

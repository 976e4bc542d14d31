"""The API client lets an idle connection go before the API closes it: at equal timeouts a request sent just as the
server closes the connection fails with "connection reset by peer" (seen in a browser test's submit)."""

from __future__ import annotations

from core.settings import Settings
from modtag.client import KEEPALIVE_EXPIRY_S, ApiClient


def test_the_client_drops_idle_connections_before_the_api_closes_them() -> None:
    assert Settings.model_fields["keep_alive_timeout_s"].default > KEEPALIVE_EXPIRY_S
    with ApiClient("http://127.0.0.1:9") as client:
        pool = client._transport._pool  # type: ignore[attr-defined]  # httpx keeps the limits on its pool
        assert pool._keepalive_expiry == KEEPALIVE_EXPIRY_S

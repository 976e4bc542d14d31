"""A real OpenID Connect provider process (`oidc-provider-mock`, a Flask app on authlib's server side) for the
dashboard's single sign-on tests, and the steps a person takes on its sign-in form.

Its form signs in whichever subject is typed (or pressed, for predefined users); the subject's claims are
the ones `set_user` stored (PUT /users/<sub>), all of them in the ID token. It accepts any client id and
secret unless told otherwise, and requires a nonce here (`--require-nonce`), as a strict provider would.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from modtag.servers import free_port
from tests.support.waiting import wait_for

CLIENT_ID = "modtag-dashboard"
CLIENT_SECRET = "test-client-secret"


@dataclass
class OidcProvider:
    issuer: str
    log: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """The provider goes away (an outage); stopping twice is harmless."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def set_user(self, subject: str, claims: dict[str, Any]) -> None:
        """The claims the provider vouches for when `subject` signs in (replacing any earlier ones)."""
        response = httpx.put(f"{self.issuer}/users/{subject}", json=claims, timeout=10)
        assert response.status_code < 300, response.text

    def sign_in_as(self, client: httpx.Client, authorize_url: str, subject: str) -> httpx.Response:
        """A person on the provider's form: open it, type the subject, submit; the provider's redirect is returned
        unfollowed."""
        form = client.get(authorize_url)
        assert form.status_code == 200, form.text[:500]
        return client.post(authorize_url, data={"sub": subject}, follow_redirects=False)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The modtag settings that sign in through this provider."""
        return {
            "oidc_issuer": self.issuer,
            "oidc_client_id": CLIENT_ID,
            "oidc_client_secret": CLIENT_SECRET,
            "oidc_display_name": "Test IdP",
            **overrides,
        }


@contextmanager
def oidc_provider(log_dir: Path) -> Iterator[OidcProvider]:
    """The provider as its own process on a free port; stopped (and its log kept) when the block ends."""
    port = free_port()
    log = log_dir / "oidc-provider.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "oidc_provider_mock", "--port", str(port), "--require-nonce", "true"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    issuer = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the OIDC provider exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    provider = OidcProvider(issuer, log, process)
    try:
        wait_for(answers, 30, "the OIDC provider answered")
        yield provider
    finally:
        provider.stop()

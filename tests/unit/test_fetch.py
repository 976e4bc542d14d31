"""core.urls: URL validation and the safe fetcher, against a real HTTP(S) server running in the test process."""

from __future__ import annotations

import asyncio
import gzip
import io
import ipaddress
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from core.errors import FetchError
from core.urls import MAX_URL_LENGTH, fetch_image_bytes, validate_image_url

MAX_BYTES = 1_000_000
LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.1/32")]


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()
GZIP_BOMB = gzip.compress(b"\x00" * 30_000_000, compresslevel=1)  # ~130 KB on the wire, 30 MB inflated


@dataclass
class Server:
    """A threaded HTTP server on 127.0.0.1 with the routes below; `hits` lists every path requested."""

    httpd: ThreadingHTTPServer
    stop: threading.Event
    hits: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state: Server = self.server.state
        state.hits.append(self.path)
        parts = urlsplit(self.path)
        route = getattr(self, "route_" + parts.path.strip("/").split("/")[0].replace("-", "_"), None)
        if route is None:
            self.send_body(b"no such route", status=404)
            return
        try:
            route(parts, state.stop)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True  # the fetcher hung up, as it should

    def send_body(self, body: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "image/png", "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def route_image(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(PNG)

    def route_missing(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(b"gone", status=404, headers={"Content-Type": "text/plain"})

    def route_boom(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(b"oops", status=500, headers={"Content-Type": "text/plain"})

    def route_echo_host(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(self.headers["Host"].encode(), headers={"Content-Type": "text/plain"})

    def route_exact(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(b"x" * int(parse_qs(parts.query)["n"][0]))

    def route_chunked_huge(self, parts: Any, stop: threading.Event) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"z" * 65536
        for _ in range(200):  # 13 MB if nobody stops reading
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def route_close_huge(self, parts: Any, stop: threading.Event) -> None:
        # No length at all: the body ends when the connection closes (HTTP/1.0 style).
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for _ in range(200):
            self.wfile.write(b"z" * 65536)

    def route_declared_huge(self, parts: Any, stop: threading.Event) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        while not stop.wait(0.05):
            self.wfile.write(b"z" * 1024)

    def route_declared_short(self, parts: Any, stop: threading.Event) -> None:
        # Claims 1000 bytes, then keeps sending: the extra must never reach the caller.
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(b"y" * 2_000_000)

    def route_drip_body(self, parts: Any, stop: threading.Event) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        while not stop.wait(0.05):
            self.wfile.write(b"d")
            self.wfile.flush()

    def route_drip_headers(self, parts: Any, stop: threading.Event) -> None:
        self.close_connection = True
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 10_000:
            if stop.wait(0.05):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def route_silent(self, parts: Any, stop: threading.Event) -> None:
        self.close_connection = True
        stop.wait(30)

    def route_redirect(self, parts: Any, stop: threading.Event) -> None:
        remaining = int(parts.path.rsplit("/", 1)[1])
        if remaining == 0:
            self.send_body(PNG)
        else:
            self.send_body(b"", status=302, headers={"Location": f"/redirect/{remaining - 1}"})

    def route_redirect_to(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(b"", status=302, headers={"Location": parse_qs(parts.query)["location"][0]})

    def route_redirect_blank(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(b"", status=302)

    def route_gzip_image(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(gzip.compress(PNG), headers={"Content-Encoding": "gzip"})

    def route_gzip_bomb(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(GZIP_BOMB, headers={"Content-Encoding": "gzip"})

    def route_brotli(self, parts: Any, stop: threading.Event) -> None:
        self.send_body(b"\x0b\x02\x80hello\x03", headers={"Content-Encoding": "br"})


def start_server(tls: ssl.SSLContext | None = None) -> Server:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    state = Server(httpd=httpd, stop=threading.Event())
    httpd.state = state  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return state


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    state = start_server()
    yield state
    state.stop.set()
    state.httpd.shutdown()
    state.httpd.server_close()


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the test controls, answered in order (the last answer repeats); others go to the real resolver.

    A fake because no real DNS server can be told to change its answer here (DNS rebinding).
    The returned dict also collects `calls`: every name the fetcher asked for.
    """
    answers: dict[str, list[str]] = {"calls": []}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        answers["calls"].append(str(host))
        if host in answers:
            queue = answers[host]
            address = queue.pop(0) if len(queue) > 1 else queue[0]
            return real(address, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def fetch(url: str, **overrides: Any) -> bytes:
    options: dict[str, Any] = {"max_bytes": MAX_BYTES, "timeout_s": 1.0, "allow_private": True}
    options.update(overrides)
    return fetch_image_bytes(url, **options)


def fetch_error(url: str, code: str, **overrides: Any) -> FetchError:
    with pytest.raises(FetchError) as caught:
        fetch(url, **overrides)
    assert caught.value.code == code, caught.value
    return caught.value


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


@pytest.fixture
def body_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs whose response body the fetcher started to read (a spy on httpx's raw body iterator)."""
    reads: list[str] = []
    real = httpx.Response.aiter_raw

    def aiter_raw(response: httpx.Response, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        reads.append(str(response.request.url))
        return real(response, chunk_size)

    monkeypatch.setattr(httpx.Response, "aiter_raw", aiter_raw)
    return reads


# --- the happy paths ------------------------------------------------------------------------------------------


def test_fetches_an_image(server: Server) -> None:
    assert fetch(server.url("/image")) == PNG


def test_host_header_is_the_name_while_the_connection_goes_to_the_vetted_address(
    server: Server, fake_dns: dict[str, list[str]]
) -> None:
    # First answer public-enough (trusted loopback), every later one a private address: a rebinding
    # attack. The fetcher must resolve once and connect to what it checked.
    fake_dns["images.modtag.test"] = ["127.0.0.1", "10.0.0.1"]

    body = fetch(server.url("/echo-host", "images.modtag.test"), allow_private=False, allowed_networks=LOOPBACK_ONLY)

    assert body == f"images.modtag.test:{server.port}".encode()
    assert fake_dns["calls"].count("images.modtag.test") == 1


def test_gzip_body_is_undone(server: Server) -> None:
    assert fetch(server.url("/gzip-image")) == PNG


def test_body_exactly_at_the_limit_is_accepted(server: Server) -> None:
    assert len(fetch(server.url("/exact?n=5000"), max_bytes=5000)) == 5000
    error = fetch_error(server.url("/exact?n=5001"), "fetch_too_large", max_bytes=5000)
    assert error.http_status == 413


def test_redirect_chain_within_the_limit(server: Server) -> None:
    assert fetch(server.url("/redirect/3")) == PNG


def test_redirect_to_another_host_is_followed(server: Server) -> None:
    target = server.url("/image", "localhost")
    assert fetch(server.url(f"/redirect-to?location={target}")) == PNG


def test_works_from_code_that_already_runs_an_event_loop(server: Server) -> None:
    async def inside_a_loop() -> bytes:
        return fetch(server.url("/image"))

    assert asyncio.run(inside_a_loop()) == PNG


# --- too large, too slow ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chunked-huge", "/close-huge", "/gzip-bomb"])
def test_body_over_the_limit_is_cut_off(server: Server, path: str) -> None:
    error = fetch_error(server.url(path), "fetch_too_large", timeout_s=5.0)
    assert error.http_status == 413
    assert f"limit of {MAX_BYTES} bytes" in error.message
    assert "MODTAG_MAX_UPLOAD_BYTES" in error.message


def test_declared_length_over_the_limit_is_refused_before_reading(server: Server, body_reads: list[str]) -> None:
    error = fetch_error(server.url("/declared-huge"), "fetch_too_large", timeout_s=5.0)
    assert "1000000000000 bytes (Content-Length)" in error.message
    assert body_reads == []  # refused on the header: not one byte of the body was read
    assert fetch(server.url("/image")) == PNG and body_reads == [server.url("/image")]  # the spy does see reads


def test_lying_content_length_never_yields_more_than_declared(server: Server) -> None:
    assert fetch(server.url("/declared-short")) == b"y" * 1000


@pytest.mark.timeout(60)  # without an overall deadline the drips would run for minutes to hours: fail, don't hang
@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers", "/silent"])
def test_one_deadline_for_the_whole_fetch(server: Server, path: str) -> None:
    def timed_out() -> None:
        error = fetch_error(server.url(path), "fetch_timeout", timeout_s=1.0)
        assert "within 1 s (MODTAG_FETCH_TIMEOUT_S)" in error.message

    elapsed = timed(timed_out)
    # The bound is the feature: a dripping server gets no extra time per byte. The drips would take 500 s
    # (headers) and 5000 s (body) to finish, so 10x the deadline leaves a loaded machine plenty of room while a
    # deadline per read, or one that restarts per byte, still fails. A deadline never fires early: 0.9 is safe.
    assert 0.9 < elapsed < 10, f"the fetch took {elapsed:.1f} s against a 1 s deadline"


# --- HTTP errors and redirects ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "status"), [("/missing", "404 Not Found"), ("/boom", "500 Internal Server Error")])
def test_http_error_status(server: Server, path: str, status: str) -> None:
    error = fetch_error(server.url(path), "fetch_http_error")
    assert f"answered HTTP {status}" in error.message
    assert error.http_status == 422


def test_too_many_redirects(server: Server) -> None:
    error = fetch_error(server.url("/redirect/4"), "fetch_too_many_redirects")
    assert "more than 3 times" in error.message
    fetch_error(server.url("/redirect/1"), "fetch_too_many_redirects", max_redirects=0)
    assert fetch(server.url("/redirect/1"), max_redirects=1) == PNG


def test_redirect_without_location(server: Server) -> None:
    error = fetch_error(server.url("/redirect-blank"), "fetch_http_error")
    assert "no Location" in error.message


@pytest.mark.parametrize(
    ("location", "named"),
    [
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://127.0.0.2/admin", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://10.1.2.3/", "private"),
    ],
)
def test_each_redirect_hop_is_vetted_again(
    server: Server, location: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The first hop is the (trusted) test server; the redirect points somewhere forbidden.
    with caplog.at_level("WARNING", logger="core.urls"):
        error = fetch_error(
            server.url(f"/redirect-to?location={location}"),
            "fetch_host_refused",
            allow_private=False,
            allowed_networks=LOOPBACK_ONLY,
        )
    assert named in caplog.text
    assert "is not allowed" in error.message and not any(word in error.message for word in ("loopback", "metadata"))


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://127.0.0.1:25/", "http://user:pw@example.com/"])
def test_redirect_to_an_unusable_url(server: Server, location: str) -> None:
    error = fetch_error(server.url(f"/redirect-to?location={location}"), "url_invalid")
    assert "redirected to an unusable URL" in error.message


def test_unknown_content_encoding(server: Server) -> None:
    error = fetch_error(server.url("/brotli"), "fetch_failed")
    assert "'br'" in error.message


# --- refused addresses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://127.0.0.1:{port}/image", "127.0.0.1, a loopback address"),
        ("http://localhost:{port}/image", "localhost resolves to 127.0.0.1, a loopback address"),
        ("http://[::1]/", "::1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "the cloud metadata address"),
        ("http://[fe80::1]/", "a link-local address"),
        ("http://10.0.0.1/", "a private address"),
        ("http://192.168.1.1/", "a private address"),
        ("http://[fd00::1]/", "a private address"),
        ("http://0.0.0.0:{port}/image", "an unspecified"),
        ("http://[::]/", "an unspecified"),
        ("http://[::ffff:127.0.0.1]:{port}/image", "embeds 127.0.0.1, a loopback address"),
        ("http://[::ffff:169.254.169.254]/", "embeds 169.254.169.254, the cloud metadata address"),
        ("http://[64:ff9b::a00:1]/", "embeds 10.0.0.1, a private address"),
        ("http://[2002:7f00:1::]/", "embeds 127.0.0.1, a loopback address"),
        ("http://2130706433:{port}/image", "2130706433 resolves to 127.0.0.1, a loopback address"),
        ("http://0x7f.1:{port}/image", "resolves to 127.0.0.1, a loopback address"),
        ("http://127\u30020\u30020\u30021:{port}/image", "127.0.0.1, a loopback address"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://224.0.0.1/", "a multicast address"),
        ("http://[ff02::1]/", "a multicast address"),
        ("http://240.0.0.1/", "address"),  # reserved (Python files 240/4 under private too)
        ("http://192.0.0.8/", "special-purpose address (192.0.0.0/24)"),
        ("http://198.18.0.1/", "address"),
        ("http://[2001:db8::1]/", "address"),
    ],
)
def test_private_and_special_addresses_are_refused(
    server: Server, url: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    hits_before = len(server.hits)

    with caplog.at_level("WARNING", logger="core.urls"):
        error = fetch_error(url.format(port=server.port), "fetch_host_refused", allow_private=False)

    # What the host is and resolves to is in the server log; the tenant learns only that it is not allowed.
    assert named in caplog.text
    assert error.message.startswith("the host ") and "is not allowed" in error.message
    assert not any(word in error.message for word in ("resolves", "embeds", ", a ", "metadata", "loopback"))
    assert "MODTAG_FETCH_ALLOW_PRIVATE=true only for trusted test setups" in error.message
    assert len(server.hits) == hits_before  # refused before connecting, not after


def test_one_private_answer_among_public_ones_refuses_the_host(
    fake_dns: dict[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    fake_dns["mixed.modtag.test"] = ["8.8.8.8"]
    real = socket.getaddrinfo

    def two_answers(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "mixed.modtag.test":
            return real("8.8.8.8", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", two_answers)
        with caplog.at_level("WARNING", logger="core.urls"):
            error = fetch_error("http://mixed.modtag.test/x.png", "fetch_host_refused", allow_private=False)
    assert "mixed.modtag.test resolves to 127.0.0.1, a loopback address" in caplog.text
    assert "127.0.0.1" not in error.message


# --- network failures --------------------------------------------------------------------------------------------


def test_unknown_host() -> None:
    error = fetch_error("http://no-such-host.invalid/x.png", "fetch_host_refused", timeout_s=3.0)
    assert "no-such-host.invalid" in error.message


def test_a_missing_name_and_a_refused_address_read_the_same(caplog: pytest.LogCaptureFixture) -> None:
    # Were they told apart, a tenant could map which internal names exist; the difference is for the server log.
    with caplog.at_level("WARNING", logger="core.urls"):
        missing = fetch_error("http://no-such-host.invalid/x.png", "fetch_host_refused", timeout_s=3.0)
        internal = fetch_error("http://localhost/x.png", "fetch_host_refused", allow_private=False)
    assert missing.message.replace("no-such-host.invalid", "H") == internal.message.replace("localhost", "H")
    assert missing.retryable == internal.retryable is False
    assert "no-such-host.invalid: it does not resolve" in caplog.text
    assert "localhost resolves to 127.0.0.1, a loopback address" in caplog.text


def test_nothing_listening() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = fetch_error(f"http://127.0.0.1:{port}/x.png", "fetch_connect")
    assert f"port {port}" in error.message


# --- https: the certificate is checked against the name, not the pinned IP -----------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ssl.SSLContext]]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder: Path = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
    command += " -subj /CN=images.modtag.test -addext subjectAltName=DNS:images.modtag.test"
    subprocess.run(
        [*command.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert, key)
    state = start_server(tls=served)
    trusted = ssl.create_default_context(cafile=str(cert))
    yield state, trusted
    state.stop.set()
    state.httpd.shutdown()
    state.httpd.server_close()


def test_https_to_a_pinned_address_verifies_the_hostname(
    tls_server: tuple[Server, ssl.SSLContext], fake_dns: dict[str, list[str]]
) -> None:
    state, trusted = tls_server
    fake_dns["images.modtag.test"] = ["127.0.0.1"]
    fake_dns["other.modtag.test"] = ["127.0.0.1"]
    options: dict[str, Any] = {"allow_private": False, "allowed_networks": LOOPBACK_ONLY, "ssl_context": trusted}

    assert fetch(f"https://images.modtag.test:{state.port}/image", **options) == PNG

    # Same address, another name: the certificate does not match, so the fetch must fail.
    error = fetch_error(f"https://other.modtag.test:{state.port}/image", "fetch_connect", **options)
    assert "certificate" in error.message.lower() or "hostname" in error.message.lower()
    # And the default store does not trust a self-signed certificate.
    fetch_error(f"https://images.modtag.test:{state.port}/image", "fetch_connect", allow_private=True)


# --- validate_image_url ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "file:///etc/passwd",
        "gopher://example.com:70/_GET",
        "javascript:alert(1)",
        "data:image/png;base64,iVBORw0KGgo=",
        "ftp://example.com/x.jpg",
        "example.com/x.jpg",
        "//example.com/x.jpg",
        "http://user:pass@example.com/x.jpg",
        "http://user@example.com/x.jpg",
        "http://evil.example\\@127.0.0.1/x.jpg",
        "http://example.com/" + "a" * 5000,
        "http:///x.jpg",
        "http://",
        "http://exa mple.com/x.jpg",
        "http://example.com/x.jpg\r\nX-Injected: 1",
        "http://ex\u200bample.com/x.jpg",
        "http://example.com\u202e/gpj.x",
        "http://\u2603.net/x.jpg",
        "http://-bad-.example/x.jpg",
        "http://a..b/x.jpg",
        "http://exa$mple.com/x.jpg",
        "http://%31%32%37.0.0.1/x.jpg",
        "http://example.com:0/x.jpg",
        "http://example.com:99999/x.jpg",
        "http://example.com:http/x.jpg",
        "http://[::1/x.jpg",
        "http://[not-an-ip]/x.jpg",
    ],
)
def test_hostile_urls_are_invalid(url: str) -> None:
    with pytest.raises(FetchError) as caught:
        validate_image_url(url)
    assert caught.value.code == "url_invalid"
    assert caught.value.http_status == 422


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://example.com/a.jpg", "https://example.com/a.jpg"),
        ("  HTTPS://Images.Example.COM/A.jpg?w=1&h=2#top ", "https://images.example.com/A.jpg?w=1&h=2"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com:8080/x.png", "http://example.com:8080/x.png"),
        ("http://cdn_1.example.com/x.png", "http://cdn_1.example.com/x.png"),
        ("http://b\u00fccher.example/x.png", "http://xn--bcher-kva.example/x.png"),
        ("http://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com/x.png", "http://example.com/x.png"),
        ("http://127\u30020\u30020\u30021/", "http://127.0.0.1/"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("http://example.com/caf\u00e9.jpg", "http://example.com/caf\u00e9.jpg"),
    ],
)
def test_valid_urls_are_normalised(url: str, normalised: str) -> None:
    assert validate_image_url(url) == normalised


def test_url_length_limit_is_inclusive() -> None:
    base = "https://example.com/"
    at_limit = base + "a" * (MAX_URL_LENGTH - len(base))
    assert validate_image_url(at_limit) == at_limit
    with pytest.raises(FetchError, match="2049 characters long; the limit is 2048"):
        validate_image_url(at_limit + "a")


def test_fetch_validates_first(server: Server) -> None:
    fetch_error("file:///etc/passwd", "url_invalid")


def test_random_urls_either_validate_to_something_httpx_accepts_or_raise_url_invalid() -> None:
    rng = random.Random(99)
    starts = ["http://", "https://", "HTTP://", "example.com", "[::1]", "127.0.0.1", "xn--", "8080"]
    marks = [":", "@", "/", "?", "#", "%", "%2F", "..", "\\", "-", "_", "[", "]"]
    oddities = [" ", "\t", "\x00", "\u00e9", "\u3002", "\uff0e", "\u200b"]
    pieces = starts + marks + oddities
    accepted = 0
    for _ in range(2000):
        url = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        try:
            normalised = validate_image_url(url)
        except FetchError as exc:
            assert exc.code == "url_invalid"
            continue
        accepted += 1
        parsed = httpx.URL(normalised)
        assert parsed.scheme in ("http", "https") and parsed.host
        assert validate_image_url(normalised) == normalised  # normalising twice changes nothing
    assert accepted > 20

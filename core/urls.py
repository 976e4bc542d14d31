"""Image URLs: the API's cheap syntax check and the worker's fetcher, which cannot be aimed at private networks.

The fetcher resolves each host once, refuses it if any address is not public, then connects to that
vetted address itself, so a DNS answer that changes between the check and the connection (DNS
rebinding) is never used. Redirects are followed by hand, each hop checked the same way. The body
is streamed and cut off at `max_bytes`; the whole fetch (DNS, connect, headers, body) has one
deadline, so a server that drips a byte a second is stopped at `timeout_s`, not let run forever.

Why asyncio under a blocking function: httpx's timeouts apply to each network operation, and a
dripping server never trips one. Cancellation under `asyncio.timeout` ends the fetch wherever it
is. Each call runs its own short event loop (the worker's threads have none).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import socket
import ssl
import unicodedata
import zlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import certifi
import httpx
import idna

from core.errors import FetchError

logger = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
HEAD_BYTES = 64  # how much of a body `fetch_to_file` reads before it knows which cap applies
CALLBACK_CHECK_TIMEOUT_S = 2.0
ALLOW_PRIVATE_HINT = "set MODTAG_FETCH_ALLOW_PRIVATE=true only for trusted test setups"
USER_AGENT = "modtag-image-fetcher/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECTS = {301, 302, 303, 307, 308}
_HOST_LABELS = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?$")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = ipaddress.ip_address("169.254.169.254")
# IANA special-purpose blocks that some Python 3.11 patch releases still call global.
_SPECIAL_PURPOSE: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(block)
    for block in (
        "192.0.0.0/24",
        "192.88.99.0/24",
        "198.18.0.0/15",
        "100::/64",
        "64:ff9b:1::/48",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "5f00::/16",
    )
)
# getaddrinfo can hang for the resolver's own timeout; it runs here, outside the event loop's
# default executor, so `asyncio.run` never waits for it after our deadline has passed.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="modtag-dns")

# getaddrinfo's answers that a name does not exist (not a resolver failing for now).
_NO_SUCH_NAME = frozenset(
    code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)) if code is not None
)

T = TypeVar("T")


def validate_image_url(url: str) -> str:
    """Check an image URL's syntax and return it normalised (ASCII host, no fragment).

    http/https only, a host, at most 2048 characters, no credentials, a valid port. Where the host
    resolves is checked at fetch time. Raises FetchError(code="url_invalid", http_status=422).
    """
    if not isinstance(url, str) or not url.strip():
        raise _invalid("the URL is empty")
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise _invalid(f"the URL is {len(url)} characters long; the limit is {MAX_URL_LENGTH}")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in url):
        raise _invalid("the URL contains spaces or invisible control characters; percent-encode them")
    if "\\" in url:
        # Browsers read "\" as "/", Python's parser does not: refuse rather than guess the host.
        raise _invalid("the URL contains a backslash; percent-encode it as %5C")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _invalid(f"the URL cannot be parsed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"{scheme}:" if scheme else "a URL without a scheme"
        raise _invalid(f"only http:// and https:// URLs can be fetched, not {shown}")
    if "@" in parts.netloc:
        raise _invalid("the URL contains credentials (user:password@host); use a URL that needs none")
    if not parts.hostname:
        raise _invalid("the URL has no host")
    if port == 0:
        raise _invalid("the URL's port must be between 1 and 65535")
    host = _ascii_host(parts.hostname)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def fetch_image_bytes(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool,
    max_redirects: int = 3,
    allowed_networks: Sequence[IPNetwork] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """Download an image from a public http(s) URL, safely. Blocking; the whole call ends by `timeout_s`.

    `allowed_networks` are trusted even though they are not public (an internal image CDN);
    `ssl_context` replaces the default certificate store (certifi). Proxy environment variables
    are ignored: the vetted address must be the one connected to.

    Raises FetchError with code url_invalid, fetch_host_refused (a host that does not resolve or not to a public
    address: one code and sentence for both, so a tenant cannot tell an internal name from a missing one; the
    detail is in the server log), fetch_connect, fetch_timeout, fetch_too_large (413), fetch_http_error,
    fetch_too_many_redirects or fetch_failed.
    """
    fetch = _Fetch(
        max_bytes=max_bytes,
        allow_private=allow_private,
        max_redirects=max_redirects,
        allowed_networks=tuple(allowed_networks),
        ssl_context=ssl_context or _default_ssl_context(),
    )
    return _run_blocking(fetch.run(url, timeout_s))


def fetch_to_file(
    url: str,
    sink: BinaryIO,
    *,
    max_bytes: int,
    cap_for: Callable[[bytes], tuple[int, str]],
    timeout_s: float,
    allow_private: bool,
    max_redirects: int = 3,
    allowed_networks: Sequence[IPNetwork] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """`fetch_image_bytes` for files too large to hold (a video): the body written to `sink` as it arrives.

    `max_bytes` is the largest body taken; `cap_for(head)` names the byte limit and the setting behind it from the
    body's first `HEAD_BYTES` (an image's limit for an image, a video's for a video); past either, 413
    `fetch_too_large`. Returns those first bytes (the
    whole body when shorter); the caller reads the rest from `sink`. Raises what `fetch_image_bytes` raises.
    """
    fetch = _Fetch(
        max_bytes=max_bytes,
        allow_private=allow_private,
        max_redirects=max_redirects,
        allowed_networks=tuple(allowed_networks),
        ssl_context=ssl_context or _default_ssl_context(),
        sink=sink,
        cap_for=cap_for,
    )
    return _run_blocking(fetch.run(url, timeout_s))


def check_callback_url(url: str, *, allow_private: bool, timeout_s: float = CALLBACK_CHECK_TIMEOUT_S) -> None:
    """Refuse at submit a callback URL (already through `validate_image_url`) that could never be delivered: a
    host that resolves to a private or reserved address, or a name that does not exist (one code and sentence for
    both, as fetching does). A resolver that is slow or failing for now passes: each delivery vets again.

    Raises FetchError(code="callback_forbidden", http_status=422).
    """
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    lookup = _RESOLVER.submit(_lookup, host, parts.port or (443 if parts.scheme == "https" else 80))
    try:
        addresses = lookup.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return
    except (socket.gaierror, UnicodeError) as exc:
        if isinstance(exc, socket.gaierror) and exc.errno not in _NO_SUCH_NAME:
            return
        logger.warning("refused the callback host %s: it does not resolve (%s)", host, exc)
        addresses = []
    if not addresses or _refusal(host, addresses, ()):
        raise FetchError(
            f"`callback_url`: modtag does not send callbacks to the host {host[:100]}: it does not resolve to a "
            f"public address ({ALLOW_PRIVATE_HINT})",
            code="callback_forbidden",
            http_status=422,
        )


def post_json(
    url: str, payload: bytes, *, timeout_s: float, allow_private: bool, headers: Mapping[str, str] | None = None
) -> int:
    """POST a JSON body (a job's callback, with `headers` such as its signature) with the same address rules as
    fetching. Returns the status."""
    sender = _Fetch(
        max_bytes=0,
        allow_private=allow_private,
        max_redirects=0,
        allowed_networks=(),
        ssl_context=_default_ssl_context(),
    )
    return _run_blocking(sender.post(url, payload, timeout_s, headers or {}))


# --- helpers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetch:
    max_bytes: int
    allow_private: bool
    max_redirects: int
    allowed_networks: tuple[IPNetwork, ...]
    ssl_context: ssl.SSLContext
    sink: BinaryIO | None = None  # set: the body goes there as it arrives (`fetch_to_file`), not into memory
    cap_for: Callable[[bytes], tuple[int, str]] | None = None  # the limit by the body's first bytes

    async def run(self, url: str, timeout_s: float) -> bytes:
        current = validate_image_url(url)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._follow(current)
        except (TimeoutError, httpx.TimeoutException):
            raise FetchError(
                f"fetching {_short(current)} did not finish within {timeout_s:g} s (MODTAG_FETCH_TIMEOUT_S)",
                code="fetch_timeout",
            ) from None

    async def _follow(self, url: str) -> bytes:
        for hop in range(self.max_redirects + 1):
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = parts.port or (443 if parts.scheme == "https" else 80)
            addresses = await _resolve(host, port)
            self._vet(host, addresses)
            status, location, body = await self._send(parts, host, port, addresses)
            if status in _REDIRECTS:
                if not location:
                    raise _http_error(url, status, "; the redirect has no Location header")
                if hop == self.max_redirects:
                    raise FetchError(
                        f"{_short(url)} redirected more than {self.max_redirects} times; link the image directly",
                        code="fetch_too_many_redirects",
                    )
                try:
                    url = validate_image_url(urljoin(url, location))
                except FetchError as exc:
                    raise FetchError(
                        f"{_short(url)} redirected to an unusable URL: {exc.message}", code=exc.code
                    ) from None
                continue
            if status >= 300:
                raise _http_error(url, status)
            return body
        raise AssertionError("unreachable: the loop returns or raises")

    def _vet(self, host: str, addresses: list[IPAddress]) -> None:
        """Every address must be public: one private answer among public ones still refuses the host."""
        if not self.allow_private and _refusal(host, addresses, self.allowed_networks):
            raise _host_refused(host)

    async def post(self, url: str, payload: bytes, timeout_s: float, headers: Mapping[str, str]) -> int:
        """One POST of a JSON body to a vetted address; redirects are not followed. Returns the status."""
        parts = urlsplit(validate_image_url(url))
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(timeout_s):
                addresses = await _resolve(host, port)
                self._vet(host, addresses)
                status, _, _ = await self._send(
                    parts, host, port, addresses, method="POST", content=payload, extra_headers=headers
                )
                return status
        except (TimeoutError, httpx.TimeoutException):
            raise FetchError(f"{_short(url)} did not answer within {timeout_s:g} s", code="fetch_timeout") from None

    async def _send(
        self,
        parts: SplitResult,
        host: str,
        port: int,
        addresses: list[IPAddress],
        *,
        method: str = "GET",
        content: bytes | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> tuple[int, str | None, bytes]:
        """One request to the vetted addresses in turn (the next only if connecting failed)."""
        default_port = 443 if parts.scheme == "https" else 80
        bracketed = f"[{host}]" if ":" in host else host
        headers = {
            "Host": bracketed if port == default_port else f"{bracketed}:{port}",
            "User-Agent": USER_AGENT,
            # Named formats steer content-negotiating CDNs away from AVIF/HEIC, which modtag cannot read.
            "Accept": "image/jpeg, image/png, image/webp, image/gif, image/bmp, image/tiff, */*;q=0.5",
            "Accept-Encoding": "identity",
        }
        if content is not None:
            headers["Content-Type"] = "application/json"
        headers.update(extra_headers or {})
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        # The request goes to the IP; the hostname travels as the Host header and, for https, as
        # the TLS server name, which httpcore also uses to verify the certificate.
        extensions = {"sni_hostname": host.rstrip(".")} if parts.scheme == "https" and not _is_ip(host) else {}
        errors: list[str] = []
        # No httpx timeouts: they apply per operation; the one deadline is the caller's asyncio.timeout.
        client = httpx.AsyncClient(verify=self.ssl_context, trust_env=False, follow_redirects=False, timeout=None)
        async with client:
            for address in addresses:
                ip_host = f"[{address}]" if address.version == 6 else str(address)
                try:
                    request = client.build_request(
                        method,
                        f"{parts.scheme}://{ip_host}:{port}{target}",
                        headers=headers,
                        extensions=extensions,
                        content=content,
                    )
                except httpx.InvalidURL as exc:
                    raise _invalid(f"the URL cannot be requested ({exc})") from None
                try:
                    response = await client.send(request, stream=True)
                except httpx.ConnectError as exc:
                    errors.append(f"{address}: {exc}")
                    continue
                except httpx.TimeoutException:
                    raise
                except httpx.HTTPError as exc:
                    raise _failed(parts, exc) from None
                try:
                    if response.status_code >= 300 or method != "GET":
                        return response.status_code, response.headers.get("location"), b""
                    return response.status_code, None, await self._read_body(response, parts)
                finally:
                    await response.aclose()
        raise FetchError(f"cannot connect to {host} port {port} ({'; '.join(errors)})", code="fetch_connect")

    async def _read_body(self, response: httpx.Response, parts: SplitResult) -> bytes:
        if self.sink is not None and self.cap_for is not None:
            return await self._write_body(response, parts, self.sink, self.cap_for)
        declared = response.headers.get("content-length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(parts, f"is {int(declared)} bytes (Content-Length), more")
        decoder = _BodyDecoder(response.headers.get("content-encoding", ""), parts)
        body = bytearray()
        try:
            async for raw in response.aiter_raw():
                # One byte of room past the limit tells "exactly at the limit" from "over it".
                body += decoder.feed(raw, room=self.max_bytes - len(body) + 1)
                if len(body) > self.max_bytes:
                    raise self._too_large(parts, "sends more")
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            raise _failed(parts, exc) from None
        return bytes(body)

    async def _write_body(
        self, response: httpx.Response, parts: SplitResult, sink: BinaryIO, cap_for: Callable[[bytes], tuple[int, str]]
    ) -> bytes:
        """The body into `sink`, cut off past the cap its first bytes call for; returns those first bytes."""
        decoder = _BodyDecoder(response.headers.get("content-encoding", ""), parts)
        most = self.max_bytes  # until the first bytes say what this is: the largest cap
        cap: tuple[int, str] | None = None
        head = b""
        written = 0
        try:
            async for raw in response.aiter_raw():
                piece = decoder.feed(raw, room=most - written + 1)
                if len(head) < HEAD_BYTES:
                    head += piece[: HEAD_BYTES - len(head)]
                if cap is None and len(head) >= HEAD_BYTES:
                    cap = cap_for(head)
                    most = cap[0]
                written += len(piece)
                if written > most:
                    raise self._too_large(parts, "sends more", cap)
                await asyncio.to_thread(sink.write, piece)
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            raise _failed(parts, exc) from None
        cap = cap or cap_for(head)
        if written > cap[0]:
            raise self._too_large(parts, "is larger", cap)
        return head

    def _too_large(self, parts: SplitResult, found: str, cap: tuple[int, str] | None = None) -> FetchError:
        limit, setting = cap or (self.max_bytes, "MODTAG_MAX_UPLOAD_BYTES")
        return FetchError(
            f"the {'file' if self.sink else 'image'} at {_short(parts.geturl())} {found} than the limit of {limit} "
            f"bytes ({setting})",
            code="fetch_too_large",
            http_status=413,
        )


class _BodyDecoder:
    """Undo gzip/deflate without ever inflating more than the bytes still allowed.

    modtag asks for no compression, but a server may send it anyway; a few KB of gzip can expand to
    gigabytes, so decompression is bounded by `room`, never done whole.
    """

    def __init__(self, encoding: str, parts: SplitResult) -> None:
        encoding = encoding.strip().lower()
        compressed = encoding in ("gzip", "x-gzip", "deflate")
        # wbits 32 + 15: a zlib or a gzip header, whichever comes.
        self._inflater = zlib.decompressobj(wbits=47) if compressed else None
        if not compressed and encoding not in ("", "identity"):
            raise FetchError(
                f"{_short(parts.geturl())} sent the image compressed as {encoding!r}, which modtag cannot undo",
                code="fetch_failed",
            )
        self._parts = parts

    def feed(self, raw: bytes, *, room: int) -> bytes:
        if self._inflater is None:
            return raw
        try:
            # Stops at `room` bytes, leaving the rest unread: the caller then refuses the body.
            return self._inflater.decompress(raw, max(room, 1))
        except zlib.error as exc:
            raise FetchError(
                f"{_short(self._parts.geturl())} sent a broken compressed body ({exc})", code="fetch_failed"
            ) from None


async def _resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses of a host, resolved once; the connection uses only these."""
    loop = asyncio.get_running_loop()
    try:
        addresses = await loop.run_in_executor(_RESOLVER, _lookup, host, port)
    except (socket.gaierror, UnicodeError) as exc:
        logger.warning("refused to fetch from %s: it does not resolve (%s)", host, exc)
        raise _host_refused(host) from None
    if not addresses:
        logger.warning("refused to fetch from %s: it has no address", host)
        raise _host_refused(host)
    return addresses


def _lookup(host: str, port: int) -> list[IPAddress]:
    """getaddrinfo's distinct addresses of a host (blocking; raises socket.gaierror)."""
    addresses: list[IPAddress] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        # IPv6 link-local answers carry a zone ("fe80::1%eth0"): the address class ignores it.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _refusal(host: str, addresses: Sequence[IPAddress], allowed_networks: Sequence[IPNetwork]) -> str | None:
    """Why the host may not be used (logged here, for the operator only), or None when every address is public
    or in `allowed_networks`."""
    for address in addresses:
        if any(address in network for network in allowed_networks):
            continue
        problem = _address_class(address)
        if problem:
            # The detail goes to the operator's log only: telling a tenant what an internal name resolves
            # to maps the private network for them.
            resolved = "" if host == str(address) else f"{host} resolves to "
            logger.warning("refused the host %s%s, %s", resolved, address, problem)
            return problem
    return None


def _host_refused(host: str) -> FetchError:
    # One code and one sentence whether the name is missing or internal: the difference is for the server log.
    return FetchError(
        f"the host {host[:100]} is not allowed or does not resolve: modtag fetches only from public addresses "
        f"({ALLOW_PRIVATE_HINT})",
        code="fetch_host_refused",
    )


def _address_class(address: IPAddress) -> str | None:
    """Why an address is off limits (a phrase for the message), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = _address_class(embedded)
            return f"which embeds {embedded}, {inner}" if inner else None
    if address.is_unspecified:
        return "an unspecified (0.0.0.0 / ::) address"
    if address.is_loopback:
        return "a loopback address"
    if address == _METADATA:
        return "the cloud metadata address (link-local)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _CGNAT:
        return "a carrier-grade NAT (100.64.0.0/10) address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    special = next((block for block in _SPECIAL_PURPOSE if address in block), None)
    if special is not None or not address.is_global:
        where = f" ({special})" if special is not None else ""
        return f"a special-purpose address{where} that is not publicly routable"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, 6to4, NAT64, deprecated compatible), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address))  # ::a.b.c.d, which some stacks still route
    return None


def _ascii_host(host: str) -> str:
    """The host as it goes on the wire: an IP literal, or an ASCII (punycode) name."""
    if _is_ip(host):
        return str(ipaddress.ip_address(host))
    if not host.isascii():
        try:
            # UTS46 maps full-width letters and ideographic dots to what resolvers will see, so a
            # host written to look harmless is checked (and later resolved) as its real ASCII form.
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise _invalid(f"the URL's host is not a valid international domain name ({exc})") from None
        if _is_ip(host):
            return host
    if len(host) > 253 or not _HOST_LABELS.match(host):
        raise _invalid(f"the URL's host {host!r} is not a valid host name")
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle costs tens of milliseconds; a context is safe to share between threads.
    return ssl.create_default_context(cafile=certifi.where())


def _run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from blocking code, even if this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _invalid(message: str) -> FetchError:
    return FetchError(message, code="url_invalid", http_status=422)


def _http_error(url: str, status: int, detail: str = "") -> FetchError:
    reason = httpx.codes.get_reason_phrase(status)
    error = FetchError(f"{_short(url)} answered HTTP {status} {reason}{detail}".rstrip(), code="fetch_http_error")
    # A busy or failing server may answer later; a 404 or 403 will not change.
    error.retryable = status == 429 or status >= 500
    return error


def _failed(parts: SplitResult, exc: httpx.HTTPError) -> FetchError:
    detail = str(exc) or exc.__class__.__name__
    return FetchError(f"fetching {_short(parts.geturl())} failed: {detail}", code="fetch_failed")


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."

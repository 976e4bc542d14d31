"""HTTP over a raw socket, for what no client library sends: a head without its body, bytes dribbled one at a time,
a connection held open. Open one with `connection`, read the answer with `read_answer`, look whether the server
answered (`readable`) or hung up (`closed`). `api.raw_http` sends one whole request and reads until the close."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

# A safety net only: each test waits on the server's own answer or deadline, far shorter.
SOCKET_TIMEOUT_S = 20.0


@contextmanager
def connection(base_url: str) -> Iterator[socket.socket]:
    """A TCP connection to the server at `base_url`, closed when the block ends."""
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=SOCKET_TIMEOUT_S) as sock:
        yield sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """One response's status and JSON body ({} when it has none), read up to its declared length: the server may
    keep the connection open."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed without answering: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), json.loads(body[:length]) if length else {}


def readable(sock: socket.socket, wait_s: float) -> bool:
    """The server sent something, or hung up, within `wait_s` (nothing is consumed)."""
    return _within(sock, wait_s, lambda: sock.recv(1, socket.MSG_PEEK))


def closed(sock: socket.socket, wait_s: float) -> bool:
    """The server closed the connection (end of stream, or a reset) within `wait_s`; unread answers are skipped."""

    def drain() -> None:
        while sock.recv(65536):
            pass

    return _within(sock, wait_s, drain)


def _within(sock: socket.socket, wait_s: float, read: Callable[[], object]) -> bool:
    """Whether `read` returned, or the connection failed, before a read waited `wait_s`."""
    sock.settimeout(wait_s)
    try:
        read()
        return True
    except TimeoutError:
        return False
    except OSError:  # a reset: the server is done with this connection
        return True
    finally:
        sock.settimeout(SOCKET_TIMEOUT_S)

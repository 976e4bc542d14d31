"""A TCP port in front of a real server that a test can cut and restore: a dependency's outage as its clients see it.

Stopping moto's server would lose its buckets, and stopping the session's PostgreSQL every other test's database;
cutting the path instead keeps both intact. `cut()` closes the listening socket (new connections are refused) and
every connection through it (clients see them reset); `restore()` listens again on the same port.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from modtag.servers import free_port

Upstream = tuple[str, int] | str  # (host, port), or the path of a unix socket (pgserver listens on one)


class CuttableProxy:
    """Forwards 127.0.0.1:`port` to `upstream` until cut; `connections` counts what it accepted."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.connections = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restore(self) -> None:
        """Listen (again) on the same port."""
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port is free again at once
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() its thread is blocked in
            listener.close()
        with self._lock:
            dropped, self._open = self._open, set()
        for connection in dropped:
            _close(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                server = self._connect()
            except OSError:
                _close(client)
                continue
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            threading.Thread(target=_pump, args=(client, server), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client), daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.upstream, str):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.upstream)
            return server
        return socket.create_connection(self.upstream)


@contextmanager
def cuttable_proxy(upstream: Upstream) -> Iterator[CuttableProxy]:
    """A listening proxy to `upstream` for the block; cut (every connection closed) after it."""
    proxy = CuttableProxy(upstream)
    proxy.restore()
    try:
        yield proxy
    finally:
        proxy.cut()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _close(source)
    _close(sink)


def _close(connection: socket.socket) -> None:
    with suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()

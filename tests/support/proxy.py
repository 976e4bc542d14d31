"""A TCP port in front of a real server that a test can cut and restore: a dependency's outage as its clients see it.

Stopping moto's server would lose its buckets, and stopping the session's PostgreSQL every other test's database;
cutting the path instead keeps both intact. `cut()` closes the listening socket (new connections are refused) and
shuts every connection through it (clients see them reset); `restore()` listens again on the same port.
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
        self._open: set[_Pair] = set()
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
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() its thread is blocked in, which closes it
        with self._lock:
            for pair in self._open:
                pair.shut()  # its pumps wake, and the last one to end closes it

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                listener.close()
                return
            try:
                server = self._connect()
            except OSError:
                _shut(client)
                client.close()
                continue
            pair = _Pair(client, server)
            with self._lock:
                self.connections += 1
                self._open.add(pair)
            threading.Thread(target=self._pump, args=(pair, client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, server, client), daemon=True).start()

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            pair.shut()  # the other direction ends too
            pair.pumping -= 1
            if pair.pumping:
                return
            self._open.discard(pair)
        pair.close()

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


class _Pair:
    """A client's connection and the proxy's to the upstream, pumped by two threads (one each way).

    Only `shut()` while a pump may still use the sockets, and `close()` once both have ended: a socket closed under
    a thread about to read or write it frees its descriptor to the next socket this process opens, and that thread's
    bytes then go to, or come from, another connection (a client then waits for an answer that went elsewhere)."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        self.pumping = 2

    def shut(self) -> None:
        for connection in self.sockets:
            _shut(connection)

    def close(self) -> None:
        for connection in self.sockets:
            connection.close()


def _shut(connection: socket.socket) -> None:
    with suppress(OSError):  # already shut, or never connected
        connection.shutdown(socket.SHUT_RDWR)

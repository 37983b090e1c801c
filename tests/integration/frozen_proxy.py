"""A loopback TCP proxy to a PostgreSQL server that can be frozen: a server that hangs while its host's kernel
keeps acknowledging (a backend stuck on a stalled disk, a SIGSTOPped postmaster, a paused VM's guest), without
stopping the machine's own server, which others use. Frozen, it keeps every connection open and reads nothing more
from either side: what a client sends is acknowledged until the buffers fill, and no answer comes. Thawed, it
forwards again what waited, in order."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CHUNK = 65536


class FrozenProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def url(self, database_url: str) -> str:
        """`database_url` (a SQLAlchemy URL to the upstream) with this proxy's host and port in its stead."""
        from sqlalchemy.engine import make_url

        return make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def start(self) -> FrozenProxy:
        self._spawn(self._accept)
        return self

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="frozen-proxy")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._closed.is_set():
            try:
                client = self.listener.accept()[0]
            except TimeoutError:
                continue
            except OSError:
                return
            # Frozen, a new connection is accepted by the kernel and then hears nothing, as from a hung server.
            self._flowing.wait()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                self._flowing.wait()
                if not select.select([source], [], [], 0.1)[0]:
                    continue
                self._flowing.wait()  # frozen while it waited: what came stays unread, in the kernel's buffers
                data = source.recv(CHUNK)
                if not data:
                    break
                sink.sendall(data)
        except (OSError, ValueError):  # closed under it (`close`): a socket's fd is -1 then
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@contextmanager
def frozen_proxy(upstream: tuple[str, int]) -> Iterator[FrozenProxy]:
    proxy = FrozenProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.close()

"""The app under the production HTTP server, in a thread and an event loop of its own: the fuzz modules
send it what no client library would, and reach into its service from the test's thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


def until(check: Any, timeout: float = 20.0) -> bool:
    """Whether `check()` came true within `timeout` (asked every 10 ms: the ingest fuzz waits once per example,
    most often a few milliseconds, and asked every 50 ms it waited 50)."""
    done, deadline = threading.Event(), time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        done.wait(0.01)
    return True


@dataclass
class Served:
    host: str
    port: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    failed: list[BaseException] = field(default_factory=list)


@contextlib.contextmanager
def served_in_a_thread(app: Any, name: str) -> Iterator[Served]:
    """`app` served by uvicorn as `tipstream run` configures it (`http_server.http_config`) until the block ends."""
    import uvicorn

    from app.http_server import http_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(http_config(app))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # not the main thread
    loop = asyncio.new_event_loop()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        except BaseException as error:  # noqa: BLE001 - told to the test below
            failed.append(error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        assert until(lambda: server.started or failed or not thread.is_alive()) and server.started, (
            f"the service did not start: {failed}")
        host, port = sock.getsockname()
        yield Served(host, port, loop, thread, failed)
    finally:
        server.should_exit = True
        thread.join(30)

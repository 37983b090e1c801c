"""A PostgreSQL host that goes silent costs a caller seconds, not the OS's minutes (app/db.py
`NETWORK_BOUNDS`): some reads run on the event loop, which would hang with them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy.exc import OperationalError

from app import db


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never says a word: a host behind a broken link or a
    wedged server, as libpq meets them."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def _connect_outcome(url: str, give_up_after_s: float) -> tuple[BaseException | None, float]:
    """What connecting raised and how long it took; (None, inf) if it still hangs after
    `give_up_after_s` (libpq's default wait is for ever: the test must not hang with it)."""
    outcome: list[tuple[BaseException | None, float]] = []
    engine = db.make_engine(url)

    def connect() -> None:
        started = time.monotonic()
        try:
            engine.connect().close()
            outcome.append((None, time.monotonic() - started))
        except Exception as error:  # noqa: BLE001 - the test reads it
            outcome.append((error, time.monotonic() - started))

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(give_up_after_s)
    return outcome[0] if outcome else (None, float("inf"))


def test_a_server_that_never_answers_is_given_up_on_after_the_bound(silent_server: int, monkeypatch) -> None:
    monkeypatch.setitem(db.NETWORK_BOUNDS, "connect_timeout", 2)  # libpq's least; 10 s in service
    error, took = _connect_outcome(f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/test", 15)
    assert isinstance(error, OperationalError) and "timeout" in str(error), (error, took)
    assert took < 8, took


def test_the_url_can_set_its_own_bound(silent_server: int, monkeypatch) -> None:
    monkeypatch.setitem(db.NETWORK_BOUNDS, "connect_timeout", 600)  # the URL's wins over ours
    error, took = _connect_outcome(f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/test?connect_timeout=2", 15)
    assert isinstance(error, OperationalError) and took < 8, (error, took)


def test_connections_carry_every_bound(postgres_url: str) -> None:
    """The bounds past the connection (tcp_user_timeout, keepalives) need a link that drops
    packets, which loopback cannot; libpq holding them for the connection is what can be checked."""
    engine = db.make_engine(postgres_url)
    with engine.connect() as conn:
        parameters = conn.connection.dbapi_connection.info.get_parameters()
    engine.dispose()
    assert {name: parameters.get(name) for name in db.NETWORK_BOUNDS} == {
        name: str(value) for name, value in db.NETWORK_BOUNDS.items()}

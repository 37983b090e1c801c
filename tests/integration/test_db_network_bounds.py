"""A PostgreSQL host that goes silent costs a caller seconds, not the OS's minutes (app/db.py
`NETWORK_BOUNDS`): some reads run on the event loop, which would hang with them. A server that hangs while its
host's kernel still acknowledges, which no libpq bound ends (`frozen_postgres`), holds up neither /score nor the
stop, and once it answers again everything goes on."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import orjson
import pytest
from sqlalchemy.exc import OperationalError

from app import db
from tests.conftest import NatsServer, RunningService, eventually, reset_postgres, serve_in_process
from tests.integration.frozen_proxy import FrozenProxy, frozen_proxy


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


@pytest.fixture
def frozen_postgres(postgres_url: str) -> Iterator[tuple[FrozenProxy, str]]:
    """A proxy to the test's PostgreSQL that can be frozen (`FrozenProxy`), and the database's URL through it (its
    schema reset): a hung server, as a client meets it, without stopping the server others use."""
    reset_postgres(postgres_url)
    from sqlalchemy.engine import make_url

    upstream = make_url(postgres_url)
    with frozen_proxy((upstream.host or "127.0.0.1", upstream.port or 5432)) as proxy:
        yield proxy, proxy.url(postgres_url)


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


def _opened(i: int) -> bytes:
    return orjson.dumps({"id": f"o-{i}", "type": "app.opened", "user_id": f"u-{i % 5}", "ts": "2026-11-26T08:00:00+01:00"})


def _checkpointed(url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        seq = conn.execute(sa.text("select seq from stream_positions where stream = 'SIGNALS'")).scalar()
    engine.dispose()
    return seq or 0


async def _frozen_after_checkpoint(nc, proxy: FrozenProxy, postgres_url: str, then: int,
                                   before_freeze: Callable[[], Awaitable[object]] | None = None) -> None:
    """20 events published and checkpointed, `before_freeze` awaited, the proxy frozen, `then` more published."""
    js = nc.jetstream()
    for i in range(20):
        await js.publish("signals.app.opened", _opened(i))
    await eventually(lambda: _checkpointed(postgres_url) == 20, timeout=20)
    if before_freeze is not None:
        await before_freeze()
    proxy.freeze()
    for i in range(20, 20 + then):
        await js.publish("signals.app.opened", _opened(i))


@pytest.mark.postgres
async def test_a_hung_database_holds_up_no_score_and_once_it_answers_everything_goes_on(
        frozen_postgres: tuple[FrozenProxy, str], postgres_url: str, start_service, nc, monkeypatch) -> None:
    """Frozen: /score answers from memory, ingest reads on, and /readyz says the checkpoint waits on a database
    that does not answer. Thawed: the waiting checkpoint commits every event read meanwhile, with no restart."""
    from app import checkpoints

    monkeypatch.setattr(checkpoints, "SLOW_CHECKPOINT_S", 0.5)
    proxy, url = frozen_postgres
    running = await start_service(database_url=url, checkpoint_every_s=0.1)
    await _frozen_after_checkpoint(nc, proxy, postgres_url, then=40)
    service = running.service
    await eventually(lambda: service.store.positions["SIGNALS"] == 60)
    async with running.http() as http:
        async def hang_told() -> dict | None:
            body = (await http.get("/readyz", timeout=5)).json()
            return body if not body["checkpoint"]["ok"] else None

        body = await eventually(hang_told)
        assert "the database does not answer" in body["checkpoint"]["last_error"] and body["ready"], body
        started = time.monotonic()
        score = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "a"}]}, timeout=5)
        assert score.status_code == 200 and time.monotonic() - started < 1, score.text
        assert _checkpointed(postgres_url) == 20  # read past the proxy: the database itself, which holds 20
        proxy.thaw()
        await eventually(lambda: _checkpointed(postgres_url) == 60, timeout=15)
        await eventually(lambda: service.checkpointer.uncheckpointed == 0)
        assert (await http.get("/readyz")).json()["checkpoint"]["ok"] is True


@pytest.mark.postgres
async def test_a_stop_while_the_database_hangs_ends_within_its_bound_saying_nothing_is_lost(
        frozen_postgres: tuple[FrozenProxy, str], postgres_url: str, nats_server: NatsServer, nc,
        tmp_path: Path) -> None:
    """SIGTERM while the database hangs: the stop's last checkpoint waited on the lock's check for ever, with no
    line said, and the process's exit would have joined the worker threads stuck in statements. Now it gives the
    database STOP_DATABASE_ANSWER_S, says what it could not save and where the next start reads from, and ends
    with SIGTERM's code; that start reads the rest again from the last checkpoint."""
    from app.bootstrap import STOP_DATABASE_ANSWER_S, STOP_FLUSH_S

    proxy, url = frozen_postgres
    http_port = _free_port()
    env = {**os.environ, "DATABASE_URL": url, "NATS_URL": nats_server.url, "TIPSTREAM_PORT": str(http_port),
           "TIPSTREAM_DATA_DIR": str(tmp_path / "data"), "TIPSTREAM_CHECKPOINT_EVERY_S": "0.1",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    log = tmp_path / "service.log"

    def run() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen([sys.executable, "-m", "app.cli", "run"], env=env, stdout=out, stderr=out)

    service = run()
    try:
        await eventually(lambda: "tipstream on" in log.read_text() or service.poll() is not None, timeout=20)
        await _frozen_after_checkpoint(nc, proxy, postgres_url, then=10)
        service.send_signal(signal.SIGTERM)
        started = time.monotonic()
        bound = STOP_FLUSH_S + STOP_DATABASE_ANSWER_S + 5  # the decisions' flush, the database's answer, the rest
        await eventually(lambda: service.poll() is not None, timeout=bound)
        took = time.monotonic() - started
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    said = log.read_text()
    assert service.returncode == 128 + signal.SIGTERM, said
    assert "no last checkpoint: the database answered nothing within" in said, said
    assert "nothing is lost" in said and "SIGNALS after 20" in said, said
    assert took < bound, took
    proxy.thaw()
    service = run()  # the next start reads the 10 events the stop could not save again
    try:
        await eventually(lambda: _checkpointed(postgres_url) == 30, timeout=20)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def lock_checks(monkeypatch) -> list[int]:
    """[threads inside the service lock's check now, at most so far] (`ServiceLock.keep`, counted)."""
    from app.service_lock import ServiceLock

    counting, counts = threading.Lock(), [0, 0]
    keep = ServiceLock.keep

    def counted(lock: ServiceLock) -> None:
        with counting:
            counts[0] += 1
            counts[1] = max(counts)
        try:
            keep(lock)
        finally:
            with counting:
                counts[0] -= 1

    monkeypatch.setattr(ServiceLock, "keep", counted)
    return counts


async def _served_frozen(proxy: FrozenProxy, url: str, postgres_url: str, tmp_path: Path, monkeypatch,
                         before_freeze: Callable[[], Awaitable[object]] | None = None,
                         **settings: object) -> tuple[RunningService, nats.NATS]:
    """The service in this process, with the embedded nats-server (the default), a lock check every 0.1 s (10 s in
    service) and 1 s for the database's answer at the stop (5 s), frozen after 20 events checkpointed, 10 more read.
    Its stop is the caller's; the connection to the embedded nats-server is returned, open."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "SERVICE_LOCK_CHECK_S", 0.1)
    monkeypatch.setattr(bootstrap, "STOP_DATABASE_ANSWER_S", 1.0)
    running = await serve_in_process(data_dir=tmp_path / "data", database_url=url, checkpoint_every_s=0.1, **settings)
    nc = await nats.connect(running.service.nats_url)
    try:
        await _frozen_after_checkpoint(nc, proxy, postgres_url, then=10, before_freeze=before_freeze)
        await eventually(lambda: running.service.store.positions["SIGNALS"] == 30)
    except BaseException:
        await nc.close()
        proxy.thaw()
        await running.stop()
        raise
    return running, nc


async def _stopped_within_its_bound(running: RunningService, caplog) -> None:
    """The stop, while the database hangs, ends within its bound, saying so; the embedded nats-server stopped."""
    from app import bootstrap

    started = time.monotonic()
    bound = bootstrap.STOP_FLUSH_S + bootstrap.STOP_DATABASE_ANSWER_S + 5
    running.server.should_exit = True
    await asyncio.wait({running.task}, timeout=bound)
    took = time.monotonic() - started
    assert running.task.done(), f"the stop still runs after {took:.1f} s"
    running.task.result()
    assert running.service.database_hangs
    assert "no last checkpoint: the database answered nothing within" in caplog.text
    assert "embedded nats-server stopped" in caplog.text


@pytest.mark.postgres
async def test_a_long_hang_holds_one_thread_in_the_lock_s_check_whoever_asks(
        frozen_postgres: tuple[FrozenProxy, str], postgres_url: str, tmp_path: Path, lock_checks: list[int],
        monkeypatch, caplog) -> None:
    """Each asker of the lock's check (the check every 10 s, each loop's before it writes) took a thread of asyncio's
    default executor, stuck on the lock's mutex behind the one in its SELECT 1: after a minute of a hang, 4 of the 6
    (2 cores), and what needs one waited. Here that executor has 2 threads, the checkpoints and the user_features
    passes ask every 0.1 s: frozen, one check waits on the database, however many ask; the executor runs work;
    /score, ingest, the decision log and /readyz go on."""
    from app import checkpoints

    monkeypatch.setattr(checkpoints, "SLOW_CHECKPOINT_S", 0.5)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-default"))
    caplog.set_level(logging.INFO, logger="tipstream")
    proxy, url = frozen_postgres
    running, nc = await _served_frozen(proxy, url, postgres_url, tmp_path, monkeypatch, offline_features_every_s=0.1)
    try:
        async with running.http() as http:
            async def hang_told() -> dict | None:
                body = (await http.get("/readyz", timeout=5)).json()
                return body if not body["checkpoint"]["ok"] else None

            body = await eventually(hang_told)  # the checkpoint's check waits; the one every 0.1 s has come
            assert body["ready"], body
            decisions = (await nc.jetstream().stream_info("DECISIONS")).state.last_seq
            score = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "a"}]}, timeout=5)
            assert score.status_code == 200, score.text

            async def logged() -> bool:
                return (await nc.jetstream().stream_info("DECISIONS")).state.last_seq > decisions

            await eventually(logged)
        assert lock_checks[1] == 1, lock_checks  # one check waits on the database, however many asked
        await asyncio.wait_for(loop.run_in_executor(None, lambda: None), 5)  # a thread free
        await nc.close()
        await _stopped_within_its_bound(running, caplog)
    finally:
        await nc.close()
        proxy.thaw()  # the threads stuck in statements end
        if not running.task.done():
            await running.stop()


@pytest.mark.postgres
async def test_a_stop_while_the_database_hangs_needs_no_thread_of_asyncio_s_default_executor(
        frozen_postgres: tuple[FrozenProxy, str], postgres_url: str, tmp_path: Path, monkeypatch, caplog) -> None:
    """A database that hangs holds threads of asyncio's default executor in statements (a user's read, the erasures'
    read, the probes of a checkpoint that failed), each loop one: the stop's own work in threads (the embedded
    nats-server's end, the checkpoint writer process's, the decision spool) waited for a free one. Here none is
    free, with the embedded nats-server and a writer process: the stop ends within its bound all the same."""
    from app import checkpoints

    monkeypatch.setattr(checkpoints, "SLOW_CHECKPOINT_S", 0.5)
    caplog.set_level(logging.INFO, logger="tipstream")
    loop = asyncio.get_running_loop()
    # Set before the start, and its thread kept: the embedded nats-server dies with the thread that started it
    # (PR_SET_PDEATHSIG), which an executor let go of ends.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-default"))
    held, release = threading.Event(), threading.Event()
    busy: list[asyncio.Future[object]] = []

    async def hold_the_thread() -> None:  # before the freeze, while what uses it ends
        busy.append(loop.run_in_executor(None, lambda: (held.set(), release.wait())))
        await eventually(held.is_set)

    proxy, url = frozen_postgres
    try:
        running, nc = await _served_frozen(proxy, url, postgres_url, tmp_path, monkeypatch,
                                           before_freeze=hold_the_thread, checkpoint_writer="process")
        try:
            await eventually(lambda: running.service.checkpointer.health()["last_error"] is not None)
            assert running.service.checkpoint_writer is not None
            await nc.close()
            await _stopped_within_its_bound(running, caplog)
        finally:
            release.set()
            await nc.close()
            proxy.thaw()
            if not running.task.done():
                await running.stop()
    finally:
        release.set()  # also if the start failed
        await asyncio.gather(*busy)

"""NATS restarted under a running service: it reconnects and catches up with nothing lost."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import orjson
import pytest
import sqlalchemy as sa
from nats.js.errors import NotFoundError

from streams.events import parse_event
from streams.fold import to_ms
from streams.jetstream import ensure_streams, publish_events, stored_us
from streams.simulator import Population
from streams.store import OnlineStore
from tests.conftest import dead_lettered, eventually, wait_stopped


def _swap_store(nats_server, older=None) -> None:
    """Stop the server and lose its JetStream store, or put back an older copy (`older`); the caller
    starts it again, at its address or another."""
    nats_server.stop()
    shutil.rmtree(nats_server.store / "jetstream")
    if older is not None:
        shutil.copytree(older, nats_server.store / "jetstream")


async def _read_to_11_with_a_copy_at_5(nats_server, store: OnlineStore) -> Path:
    """u-1's app.opened 0..10 on SIGNALS, read to 11 by the service's `store`, and a copy of the server's store
    taken at 5 (its path), for `_swap_store`."""
    client = await nats.connect(nats_server.url)
    for i in range(5):
        await client.jetstream().publish("signals.app.opened", orjson.dumps(opened(i)))
    await client.close()
    await eventually(lambda: store.positions.get("SIGNALS") == 5)
    nats_server.stop()
    old = nats_server.store.parent / "nats-at-5"
    shutil.copytree(nats_server.store / "jetstream", old)
    nats_server.start()
    client = await nats.connect(nats_server.url)
    for i in range(5, 11):
        await client.jetstream().publish("signals.app.opened", orjson.dumps(opened(i)))
    await client.close()
    await eventually(lambda: store.positions.get("SIGNALS") == 11, timeout=20)
    return old


async def _publish_and_fold(nats_server, store: OnlineStore, events: list) -> None:
    client = await nats.connect(nats_server.url)
    await publish_events(client.jetstream(), events)
    await client.close()
    await eventually(lambda: store.applied >= len(events))


async def _publish_rest_and_check(client, store: OnlineStore, events: list, half: int) -> None:
    """The second half published after the restart: every event folded once, as from one pass."""
    js = client.jetstream()
    await publish_events(js, events[half:])
    last = {name: (await js.stream_info(name)).state.last_seq for name in ("SIGNALS", "FEEDBACK")}
    await client.close()
    await eventually(lambda: all(store.positions.get(s) == n for s, n in last.items()), timeout=30)
    expected = OnlineStore()
    for _, event in events:
        expected.apply(parse_event(orjson.dumps(event)))
    assert store.users == expected.users
    assert store.applied == len(events)

async def test_service_reconnects_after_a_nats_restart_and_catches_up(start_service, nats_server) -> None:
    events = list(Population(users=20, seed=4).history(days=5, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    half = len(events) // 2
    running = await start_service()
    store = running.service.store
    await _publish_and_fold(nats_server, store, events[:half])
    nats_server.stop()
    nats_server.start()

    client = await nats.connect(nats_server.url)
    await _publish_rest_and_check(client, store, events, half)


async def test_readyz_says_nats_is_away_and_its_last_error_while_every_stream_reads_caught_up(
        start_service, nats_server, caplog) -> None:
    """NATS stopped: /readyz answered 503 with every stream caught up at lag 0 and the checkpoint ok, and
    nothing in its body said what kept the service unready."""
    caplog.set_level(logging.WARNING, logger="tipstream")
    running = await start_service()
    async with running.http() as http:
        ready = await eventually(lambda: _ready(http))
        assert ready.json()["nats"] == {"connected": True, "last_error": None}
        nats_server.stop()

        async def told() -> object:
            answer = await http.get("/readyz")
            return answer if answer.status_code == 503 and answer.json()["nats"]["last_error"] else None

        away = (await eventually(told)).json()
        assert away["nats"]["connected"] is False
        # The connection's end ("unexpected EOF"), then each reconnect's refusal: what the log says.
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NATS: ")]
        assert f"NATS: {away['nats']['last_error']}" in said, (away, said)
        assert all(s["caught_up"] for s in away["streams"].values()), "the streams alone do not say why"
        nats_server.start()
        back = await eventually(lambda: _ready(http), timeout=30)
        assert back.json()["nats"] == {"connected": True, "last_error": None}


async def test_a_connection_nats_closes_for_good_stops_the_service_with_a_message(start_service) -> None:
    """nats-py closes the connection without reconnecting on an error the server sends (here its
    control line limit, passed by a subject of 5,000 bytes; live: an expired user JWT, a protocol
    limit). Ingest and the decision log retried on the closed client for ever, and nothing said so."""
    running = await start_service()
    service = running.service
    told: list[str] = []
    service.on_fatal = told.append
    await service.nc.publish("signals." + "x" * 5_000, b"{}")
    await eventually(lambda: told)
    assert service.nc.is_closed and not service.ready
    assert told == [service.fatal]
    assert "closed tipstream's connection" in told[0] and "maximum control line exceeded" in told[0]
    assert "exit code 1" in told[0]


async def test_a_nats_server_that_stops_answering_makes_the_service_unready_within_seconds(
        start_service, nats_server) -> None:
    """A server that hangs (or a network that drops packets) closes no connection: nats-py's own pings,
    every 2 minutes, took 330 s to notice it, and meanwhile /readyz said ready with every lag 0, and a
    service on a NATS cluster stayed on the lost node instead of moving to another. Pinged every second
    here (10 s by default: noticed in 20-30 s), it is noticed within 2-3 s; unpinged, it never is."""
    running = await start_service(nats_ping_interval_s=1)
    async with running.http() as http:

        async def status(code: int) -> bool:
            return (await http.get("/readyz")).status_code == code

        await eventually(lambda: status(200))
        nats_server.process.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(nats_server.process.pid)  # every thread: it may answer until then
            await eventually(lambda: status(503), timeout=10)
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        await eventually(lambda: status(200), timeout=30)


async def test_a_hung_nats_server_that_resumes_is_told_as_answering_again(
        start_service, nats_server, caplog) -> None:
    """A server stopped (SIGSTOP) for less than two pings keeps its connection: ingest warned that each consumer
    answered no pull request, and the decision log that JetStream acknowledged no decision, and once it resumed
    (SIGCONT) nothing said it answered again; the operator was left to guess whether it still hung."""
    caplog.set_level(logging.INFO, logger="tipstream")
    running = await start_service()

    def said(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    async with running.http() as http:
        await eventually(lambda: running.service.ready)
        nats_server.process.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(nats_server.process.pid)  # every thread: it may answer until then
            response = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "t-1"}]})
            assert response.status_code == 200  # its decision waits in memory for JetStream
            await eventually(lambda: said("the consumer tipstream-signals of stream SIGNALS answers no pull request")
                             and said("JetStream acknowledged none of the decisions"), timeout=15)
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        await eventually(lambda: said("the consumer tipstream-signals of stream SIGNALS answers pull requests again")
                         and said("JetStream acknowledges decisions again"), timeout=10)
    assert running.service.nc.stats["reconnects"] == 0  # the same connection throughout: no reconnect line told it


async def test_a_stop_while_the_nats_server_hangs_does_not_wait_for_it(
        start_service, nats_server, caplog, monkeypatch) -> None:
    """A stop while the NATS server hung (SIGSTOP, in a soak) drained the connection after its last checkpoint: 20 s
    more, nothing left to lose, logging a drain timed out and a reconnect tried meanwhile. The server is asked for
    a pong first (STOP_NATS_ANSWER_S); unanswered, the connection is closed at once, and the log says why."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.5)  # no decision waits: the flush of decisions ends at once anyway
    caplog.set_level(logging.INFO, logger="tipstream")
    running = await start_service()
    await eventually(lambda: running.service.ready)
    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        wait_stopped(nats_server.process.pid)  # every thread: it may answer until then
        began = time.monotonic()
        await running.stop()
        took = time.monotonic() - began
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    assert any("answered no ping within" in r.getMessage() for r in caplog.records)
    assert took < 3 * bootstrap.STOP_NATS_ANSWER_S + 4, f"the stop took {took:.1f} s"
    assert running.service.nc.is_closed


async def test_a_stop_while_nats_is_away_says_so_in_words_of_its_own(start_service, nats_server, caplog) -> None:
    """A stop while the NATS server was gone (killed, in a soak) logged "NATS connection closed uncleanly (unable to
    perform operation on <TCPTransport closed=True ...>; the handler is closed)": nats-py's words for closing a dead
    socket, where the operator needed only to read that NATS was away."""
    caplog.set_level(logging.INFO, logger="tipstream")
    running = await start_service()
    await eventually(lambda: running.service.ready)
    nats_server.stop()
    await eventually(lambda: not running.service.nc.is_connected)
    await running.stop()
    told = [r.getMessage() for r in caplog.records]
    assert "stopping: NATS is away (the service was reconnecting); the connection is closed" in told, told
    assert not any("closed uncleanly" in line for line in told), told


async def test_the_service_stopping_closes_its_connection_without_calling_it_fatal(start_service) -> None:
    running = await start_service()
    told: list[str] = []
    running.service.on_fatal = told.append
    await running.stop()
    assert running.service.nc.is_closed and told == [] and running.service.fatal is None


async def test_a_nats_server_back_without_its_store_gets_the_streams_again_and_nothing_is_lost(
    start_service, nats_server
) -> None:
    """The server restarted with its store lost (or another server at the same address): re-creating a
    consumer failed on 'stream not found' for ever, /readyz said ready, and publishers were refused."""
    events = list(Population(users=20, seed=5).history(days=5, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    half = len(events) // 2
    running = await start_service()
    store = running.service.store
    await _publish_and_fold(nats_server, store, events[:half])
    _swap_store(nats_server)
    nats_server.start()

    client = await nats.connect(nats_server.url)
    js = client.jetstream()

    async def streams_back() -> bool:
        try:
            await js.stream_info("SIGNALS")
            await js.stream_info("FEEDBACK")
        except NotFoundError:
            return False
        return True

    await eventually(streams_back, timeout=20)  # the service creates the streams again
    await _publish_rest_and_check(client, store, events, half)


def opened(i: int, user: str = "u-1") -> dict:
    return {"id": f"o-{user}-{i}", "type": "app.opened", "user_id": user, "ts": "2026-11-26T08:00:00+01:00", "v": 1,
            "data": {}}


@pytest.mark.parametrize("asking_fails_once", [False, True])
async def test_a_nats_server_back_with_an_older_store_dead_letters_the_new_bad_events(
    start_service, nats_server, monkeypatch, asking_fails_once: bool
) -> None:
    """A start read SIGNALS to 11; the server then came back under it with a copy of its store taken
    at 5. The consumer replayed from 1, but the start's watermark (11) stayed: a bad event the new
    stream stored at 6 was taken for one dead-lettered before, and was in the DLQ nowhere. So too
    when asking the DLQ for the new stream's watermark failed once (NATS away again): the retry
    no longer saw a re-created stream, and kept the old watermark."""
    first = await start_service(checkpoint_every_s=0.1)
    old = await _read_to_11_with_a_copy_at_5(nats_server, first.service.store)
    await first.stop()

    second = await start_service()
    store = second.service.store
    await eventually(lambda: second.service.ready)
    if asking_fails_once:
        from streams import dead_letters

        asked = dead_letters.last_dead_lettered
        failures = [ConnectionError("NATS away again")]

        async def fails_once(*args: object) -> dead_letters.DeadLettered:
            if failures:
                raise failures.pop()
            return await asked(*args)

        monkeypatch.setattr(dead_letters, "last_dead_lettered", fails_once)
    _swap_store(nats_server, old)
    nats_server.start()
    before = dead_lettered("SIGNALS")
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    assert (await js.publish("signals.app.opened", b"{not json")).seq == 6
    await js.publish("signals.app.opened", orjson.dumps(opened(0, user="u-2")))
    await client.close()
    # A chunk's rejections go to the DLQ after its events are folded: u-2 can be in before it is.
    await eventually(lambda: "u-2" in store.users and dead_lettered("SIGNALS") == before + 1, timeout=20)
    assert store.users["u-1"].count("app.opened") == 11 and store.users["u-2"].count("app.opened") == 1
    assert not asking_fails_once or not failures, "the failure was met"


async def test_a_server_back_with_an_older_store_grown_past_the_position_is_read_again_whole(
    start_service, nats_server, caplog
) -> None:
    """Back after a reconnect with a copy of its store taken at 5, and published to past the position
    (11) while this service could not reach it: resumed after 11, the new stream's 6..11 were skipped."""
    from tests.conftest import NatsServer

    running = await start_service()
    store = running.service.store
    old = await _read_to_11_with_a_copy_at_5(nats_server, store)

    _swap_store(nats_server, old)
    elsewhere = NatsServer(nats_server.store)  # the same store at another address, which the service does not know
    elsewhere.start()
    try:
        client = await nats.connect(elsewhere.url)
        for i in range(7):
            assert (await client.jetstream().publish("signals.app.opened", orjson.dumps(opened(i, user="u-2")))).seq == 6 + i
        await client.close()
    finally:
        elsewhere.stop()
    with caplog.at_level("INFO"):
        nats_server.start()
        await eventually(lambda: "u-2" in store.users and store.users["u-2"].count("app.opened") == 7, timeout=20)
        await eventually(lambda: any(r.getMessage().startswith("SIGNALS: caught up, ") for r in caplog.records))
    assert store.users["u-1"].count("app.opened") == 11, "the old stream's events stay, none counted twice"
    [line] = [r.getMessage() for r in caplog.records if "came back with another message at 11, the last one read"
              in r.getMessage()]
    # The copy keeps the stream's creation time: not taken for a stream deleted and made again.
    assert "its store replaced by an older copy" in line and "made again" not in line, line
    # The whole stream read again, a backlog of any length: its progress told, as a start's catch-up is.
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SIGNALS: caught up, ")]
    assert len(told) == 1 and told[0].startswith("SIGNALS: caught up, 12 events read in "), told


async def test_a_start_on_a_store_restored_from_an_older_copy_grown_past_the_checkpoint_says_so(
    start_service, nats_server, caplog
) -> None:
    """Checkpointed at 11, then started on a copy of the store taken at 5 and published to past 11: the copy keeps
    the stream's creation time, so the start's line guesses that copy, not a stream deleted and made again."""
    first = await start_service()
    old = await _read_to_11_with_a_copy_at_5(nats_server, first.service.store)
    await first.stop()
    _swap_store(nats_server, old)
    nats_server.start()
    client = await nats.connect(nats_server.url)
    for i in range(7):
        await client.jetstream().publish("signals.app.opened", orjson.dumps(opened(i, user="u-2")))
    await client.close()
    with caplog.at_level(logging.ERROR, logger="tipstream"):
        second = await start_service()
        store = second.service.store
        await eventually(lambda: "u-2" in store.users and store.users["u-2"].count("app.opened") == 7, timeout=20)
    [told] = [r.getMessage() for r in caplog.records if "not the one the checkpoint was taken from" in r.getMessage()]
    assert "its message 11 is not the one read there" in told, told
    assert "lost, or restored from an older copy" in told and "made again" not in told, told


def _checkpointed_mark(engine, stream: str) -> tuple[int, int | None] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.text("select seq, stored_us from stream_positions where stream = :s"), {"s": stream}).first()
    return None if row is None else (row.seq, row.stored_us)


async def test_a_server_back_with_an_older_store_under_a_running_service_is_told_as_such(
    start_service, nats_server, caplog
) -> None:
    """Read to 11, then the server came back with a copy of its store taken at 5 (a soak): the line said "the
    checkpoint wants stream SIGNALS from 12", the running service's own position taken for the database's, asked
    only whether the stream was re-created or its store lost, and did not say that nothing was counted twice."""
    caplog.set_level(logging.ERROR, logger="tipstream.jetstream")
    running = await start_service()
    store = running.service.store
    old = await _read_to_11_with_a_copy_at_5(nats_server, store)
    _swap_store(nats_server, old)
    nats_server.start()
    told = await eventually(
        lambda: [r.getMessage() for r in caplog.records if "stream SIGNALS ends at 5" in r.getMessage()], timeout=20)
    assert "before 12, the position it is read from" in told[0] and "older copy" in told[0], told
    assert "nothing is counted twice" in told[0] and "checkpoint" not in told[0], told
    await eventually(lambda: store.positions.get("SIGNALS") == 5, timeout=20)
    assert store.users["u-1"].count("app.opened") == 11


async def test_a_stream_created_again_under_the_service_is_checkpointed_with_its_own_stored_times(
    start_service, nats_server
) -> None:
    """The checkpointer asks when NATS stored the message at a position once per position, and kept
    the answer by sequence alone: the stream created again, its position back at 5 was written with
    the old stream's message 5's time, and the next start took the stream for another and replayed it."""
    first = await start_service(checkpoint_every_s=0.1)
    engine = first.service.engine
    client = await nats.connect(nats_server.url)
    for i in range(5):
        await client.jetstream().publish("signals.app.opened", orjson.dumps(opened(i)))
    await client.close()
    await eventually(lambda: (_checkpointed_mark(engine, "SIGNALS") or (0, None))[0] == 5)
    old_mark = _checkpointed_mark(engine, "SIGNALS")[1]
    _swap_store(nats_server)
    nats_server.start()
    client = await nats.connect(nats_server.url)
    js = client.jetstream()

    async def published_again() -> bool:
        try:
            for i in range(5, 10):
                await js.publish("signals.app.opened", orjson.dumps(opened(i)))
        except Exception:  # noqa: BLE001 - the service has not created the streams again yet
            return False
        return True

    await eventually(published_again, timeout=20)
    await eventually(lambda: first.service.store.users["u-1"].count("app.opened") == 10, timeout=20)
    assert first.service.store.positions["SIGNALS"] == 5
    await first.stop()
    seq, mark = _checkpointed_mark(engine, "SIGNALS")
    assert seq == 5 and mark == await stored_us(js, "SIGNALS", 5) and mark != old_mark
    await client.close()


async def test_decisions_followed_by_our_acks_and_back_with_an_older_store_grown_past_are_read_again(
    start_service, nats_server, caplog
) -> None:
    """DECISIONS followed by our own publishes' acks: its position (4) is past the last message read (1),
    so the message at the position was never checked, and the new stream's 1..4 were skipped."""

    from tests.conftest import NatsServer
    from tests.integration.test_score_api import body

    def decision(did: str) -> dict:
        return {"id": did, "type": "decision.scored", "v": 1, "ts": datetime.now(UTC).isoformat(), "user_id": "u-1",
                "model_version": "v1", "features": {"user_id": "u-1", "hour_of_day": 9},
                "ranked": [{"tip_id": "tip-0", "score": 0.5, "propensity": 1.0}]}

    running = await start_service()
    service = running.service
    await eventually(lambda: service.decision_tail.following)
    nats_server.stop()
    old = nats_server.store.parent / "nats-empty"
    shutil.copytree(nats_server.store / "jetstream", old)
    nats_server.start()
    [decisions] = [ingest for ingest in service.ingests if ingest.spec.name == "DECISIONS"]
    tail = service.decision_tail
    paused = lambda: tail.following and decisions.puller is None and not decisions.reset_needed  # noqa: E731
    await eventually(lambda: service.nc.is_connected and paused(), timeout=20)
    read: list[str] = []
    sink = decisions.sink
    decisions.sink = lambda logged, reply=None: read.append(logged.id) or sink(logged, reply)
    client = await nats.connect(nats_server.url)
    await client.jetstream().publish("decisions.score", orjson.dumps(decision("d-old")), headers={"Nats-Msg-Id": "d-old"})
    await client.close()
    await eventually(lambda: read == ["d-old"] and paused() and service.store.positions.get("DECISIONS") == 1, timeout=10)
    async with running.http() as http:
        for _ in range(3):
            assert (await http.post("/score", json=body())).status_code == 200
    await eventually(lambda: service.store.positions.get("DECISIONS") == 4, timeout=10)
    assert read == ["d-old"] and paused(), "followed by our acks, not read"

    _swap_store(nats_server, old)
    elsewhere = NatsServer(nats_server.store)
    elsewhere.start()
    try:
        client = await nats.connect(elsewhere.url)
        for i in range(6):
            ack = await client.jetstream().publish("decisions.score", orjson.dumps(decision(f"d-new-{i}")),
                                                   headers={"Nats-Msg-Id": f"d-new-{i}"})
            assert ack.seq == 1 + i
        await client.close()
    finally:
        elsewhere.stop()
    with caplog.at_level("ERROR"):
        nats_server.start()
        await eventually(lambda: "d-new-5" in read, timeout=20)
    assert {f"d-new-{i}" for i in range(6)} <= set(read), read
    assert any("came back with another message at 1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("anew", "why"), [(7, ("it came back with another message at 5, the last one read; SIGNALS "
                                                "was made again at {created}, after the last message read was stored")),
                                           (3, ("it ends before 5, the position read to (made anew, or an older copy "
                                                "of its store?)"))])
async def test_a_stream_made_anew_is_read_again_with_readyz_503_until_that_replay_has_caught_up(
    start_service, nats_server, anew: int, why: str
) -> None:
    """SIGNALS deleted and made anew while the service could not reach NATS, published to meanwhile: it is read
    again from its first message, its users' states rebuilt meanwhile, and /readyz said 200 throughout (`caught_up`
    is set once, for good), where a start's catch-up answers 503 until it is done. Here the replay is held at its
    first chunk: 503, saying why, until it is read."""
    from tests.conftest import NatsServer

    running = await start_service()
    service = running.service
    store = service.store
    client = await nats.connect(nats_server.url)
    for i in range(5):
        await client.jetstream().publish("signals.app.opened", orjson.dumps(opened(i)))
    await client.close()
    await eventually(lambda: store.positions.get("SIGNALS") == 5)
    async with running.http() as http:
        await eventually(lambda: _ready(http))

        nats_server.stop()
        elsewhere = NatsServer(nats_server.store)  # the same store at another address, which the service does not know
        elsewhere.start()
        try:
            client = await nats.connect(elsewhere.url)
            js = client.jetstream()
            await js.delete_stream("SIGNALS")
            await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
            created = (await js.stream_info("SIGNALS")).created.isoformat(timespec="milliseconds")
            for i in range(anew):
                await js.publish("signals.app.opened", orjson.dumps(opened(i, user="u-2")))
            await client.close()
        finally:
            elsewhere.stop()

        [signals] = [ingest for ingest in service.ingests if ingest.spec.name == "SIGNALS"]
        entered, release = asyncio.Event(), asyncio.Event()
        process = signals.process

        async def held(chunk: list) -> None:  # the replay's chunks wait here until the test lets them go
            entered.set()
            await release.wait()
            await process(chunk)

        signals.process = held
        nats_server.start()
        await asyncio.wait_for(entered.wait(), 20)
        assert store.positions["SIGNALS"] == 0, "read again from its first message"
        during = await http.get("/readyz")
        assert during.status_code == 503, during.text
        told = during.json()["streams"]["SIGNALS"]
        assert told["caught_up"] is False and told["lag"] == anew, told
        assert told["replaying"].startswith(f"read again from its first message: {why.format(created=created)}"), told

        release.set()
        after = await eventually(lambda: _ready(http), timeout=20)
        assert after.json()["streams"]["SIGNALS"] == {"caught_up": True, "lag": 0, "replaying": None}
    assert store.users["u-2"].count("app.opened") == anew and store.users["u-1"].count("app.opened") == 5


async def _ready(http) -> object:
    answer = await http.get("/readyz")
    return answer if answer.status_code == 200 else None

"""kill -9 mid-stream, restart, finish: the result equals an uninterrupted run, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
import sqlalchemy as sa
from nats.js.api import AckPolicy, ConsumerConfig

from app.checkpoint_stores import SqlCheckpointStore
from app.db import make_engine
from app.settings import Settings
from streams import jetstream as jsx
from streams.events import parse_event
from streams.fold import to_ms
from streams.jetstream import DLQ_SEQ, DLQ_STREAM, publish_events
from streams.simulator import Population
from streams.store import OnlineStore
from tests.e2e.support import ServiceProcess, wait_until

pytestmark = pytest.mark.slow
START = to_ms(datetime(2026, 10, 1, tzinfo=UTC))


async def streams_as_the_service_makes_them(js: Any, duplicate_window_s: float) -> None:
    """The four streams, as a start with TIPSTREAM_DUPLICATE_WINDOW_S=`duplicate_window_s` makes them, and nothing
    read: what a start killed at once leaves, without the seconds of a start."""
    s = Settings(duplicate_window_s=duplicate_window_s)
    await jsx.ensure_streams(js, max_age_days=s.stream_max_age_days, max_bytes=s.stream_max_bytes,
                             duplicate_window_s=s.duplicate_window_s, dlq_max_age_days=s.dlq_max_age_days)


def checkpointed(url: str, stream: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("select seq from stream_positions where stream = :s"), {"s": stream}).first()
        return row[0] if row else 0
    except sa.exc.OperationalError:
        return 0
    finally:
        engine.dispose()


async def test_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    events = list(Population(users=40, seed=11).history(days=12, start_ms=START))
    events += events[100:300]  # apps re-send some events with the same ids
    # and some are bad: each must reach the DLQ once, also when read again after the kill
    published = [m for i, (subject, e) in enumerate(events)
                 for m in [(subject, e)] + [(subject, {**e, "id": f"bad-{i}", "ts": "soon"})] * (i % 50 == 0)]
    bad = len(published) - len(events)
    half = len(published) // 2
    js = nc.jetstream(publish_async_max_pending=2_000)
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": database_url,
           "TIPSTREAM_CHECKPOINT_EVERY_EVENTS": "500", "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2",
           "TIPSTREAM_INGEST_BATCH": "256", "TIPSTREAM_DUPLICATE_WINDOW_S": "1"}  # hides no second DLQ copy
    service = ServiceProcess(tmp_path / "data", env).start()
    await publish_events(js, published[:half])
    # Kill after a checkpoint but before ingest has finished: acked events exist past the checkpoint.
    wait_until(lambda: checkpointed(database_url, "SIGNALS") > 1_000, what="a first checkpoint")
    service.kill()
    assert checkpointed(database_url, "SIGNALS") < half, "the kill should land mid-stream"

    service = ServiceProcess(tmp_path / "data", env).start()
    await publish_events(js, published[half:])
    total = {name: (await js.stream_info(name)).state.last_seq for name in ("SIGNALS", "FEEDBACK")}
    wait_until(lambda: all(service.metric("tipstream_stream_position", stream=s) == n for s, n in total.items()),
               timeout=60, what="caught up")
    assert service.stop(), service.log()

    expected = OnlineStore()
    for _, event in events:
        expected.apply(parse_event(orjson.dumps(event)))
    engine = make_engine(database_url)
    positions, states = SqlCheckpointStore(engine).load()
    recovered = dict(states)
    engine.dispose()
    assert positions == total
    assert set(recovered) == set(expected.users)
    mismatched = [u for u, state in expected.users.items() if state.to_bytes() != recovered[u]]
    assert not mismatched, f"{len(mismatched)} users differ from an uninterrupted fold"
    assert (await js.stream_info("DLQ")).state.messages == bad


async def test_a_bad_event_dead_lettered_before_a_kill_9_is_not_dead_lettered_again(
    nats_server, nc, tmp_path: Path
) -> None:
    """Killed after a bad event went to the DLQ and before a checkpoint recorded it, the service
    reads it again at the next start. Before, it went to the DLQ again: JetStream's duplicate
    window (here 1 s, by default 2 minutes) hid the copy only from a quick restart, and
    `tipstream_dlq_total` counted it again even then."""
    js = nc.jetstream()
    env = {"NATS_URL": nats_server.url, "TIPSTREAM_DUPLICATE_WINDOW_S": "1",
           "TIPSTREAM_CHECKPOINT_EVERY_S": "3600", "TIPSTREAM_CHECKPOINT_EVERY_EVENTS": "1000000"}
    service = ServiceProcess(tmp_path / "data", env).start()
    good = {"id": "e-1", "type": "app.opened", "user_id": "u-1", "ts": "2026-11-26T08:00:00+01:00", "data": {}}
    await js.publish("signals.app.opened", orjson.dumps(good))
    await js.publish("signals.app.opened", orjson.dumps({**good, "id": "e-2", "ts": "yesterday"}))
    wait_until(lambda: service.metric("tipstream_dlq_total", reason="invalid_field", stream="SIGNALS") == 1,
               what="the bad event dead-lettered")
    service.kill()
    assert checkpointed(f"sqlite:///{tmp_path / 'data' / 'tipstream.db'}", "SIGNALS") == 0, "no checkpoint holds it"

    service = ServiceProcess(tmp_path / "data", env).start()
    wait_until(lambda: service.get("/readyz").status_code == 200, what="caught up")
    assert service.metric("tipstream_stream_position", stream="SIGNALS") == 2, "both read again"
    assert service.metric("tipstream_dlq_total", reason="invalid_field", stream="SIGNALS") == 0
    assert (await js.stream_info("DLQ")).state.messages == 1
    assert service.stop(), service.log()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_kill_9_during_a_registration_leaves_no_evaluation_running(tmp_path: Path, nats_server) -> None:
    """The evaluation process was told to die with the service only once it had imported the
    service's modules; killed before that, the service left it blocked for good on sending its
    result (a model of 3,000 users)."""
    import httpx

    from app import db
    from tests.integration.test_score_registry import AUTH, TOKEN, rewarded_rows

    env = {"NATS_URL": nats_server.url, "TIPSTREAM_ADMIN_TOKEN": TOKEN}
    service = ServiceProcess(tmp_path / "data", env).start()
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'tipstream.db'}")
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, rewarded_rows(3_000), ["decision_id"])
    engine.dispose()
    assert service.process is not None
    before = set(_children(service.process.pid))
    # The answer does not matter, the evaluation process does.
    with httpx.Client(base_url=service.base_url) as http, pytest.raises(httpx.TimeoutException):
        http.post("/admin/models", headers=AUTH, json={"version": "v2", "kind": "fm"}, timeout=0.3)
    evaluators = wait_until(lambda: set(_children(service.process.pid)) - before, 10, "an evaluation process")
    service.kill()
    wait_until(lambda: not any(map(_running, evaluators)), 20, "the evaluation process's end")


async def test_user_features_rows_a_kill_9_left_behind_are_written_after_the_restart(
    nats_server, nc, tmp_path: Path
) -> None:
    """The offline writer knows the users saved since its last pass in memory only: after a kill -9
    their rows stayed older than their state (or missing) until their next event."""
    events = list(Population(users=5, seed=12).history(days=2, start_ms=START))
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'tipstream.db'}"
    env = {"NATS_URL": nats_server.url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2",
           "TIPSTREAM_OFFLINE_FEATURES_EVERY_S": "3600"}
    service = ServiceProcess(data, env).start()
    await publish_events(nc.jetstream(), events)
    last = (await nc.jetstream().stream_info("SIGNALS")).state.last_seq
    wait_until(lambda: checkpointed(url, "SIGNALS") == last, what="every event checkpointed")
    service.kill()

    def rows() -> set[str]:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                return set(conn.execute(sa.text("select user_id from user_features")).scalars())
        finally:
            engine.dispose()

    assert rows() == set(), "no pass ran before the kill"
    users = {event["user_id"] for _, event in events}
    service = ServiceProcess(data, {**env, "TIPSTREAM_OFFLINE_FEATURES_EVERY_S": "0.5"}).start()
    wait_until(lambda: rows() == users, timeout=15, what="a user_features row for every user")
    assert service.stop()


async def test_dead_letters_a_start_sent_again_hide_none_of_their_batch_stored_before_from_the_next_start(
    nats_server, nc, tmp_path: Path
) -> None:
    """A batch stored in part, with a hole (a reconnect between its copies: here written as ingest leaves
    it), then a crash: the start sends the hole again, and is killed before a checkpoint. Before, the hole
    went as a batch of its own (`2/1`): the next start took everything up to it as stored and nothing
    after, so 3 and 4, stored before, went to the DLQ a second time."""
    js = nc.jetstream()
    env = {"NATS_URL": nats_server.url, "TIPSTREAM_DUPLICATE_WINDOW_S": "1",
           "TIPSTREAM_CHECKPOINT_EVERY_S": "3600", "TIPSTREAM_CHECKPOINT_EVERY_EVENTS": "1000000"}
    await streams_as_the_service_makes_them(js, 1)
    bad = {"type": "app.opened", "user_id": "u-1", "ts": "yesterday", "data": {}}
    for n in range(1, 5):
        await js.publish("signals.app.opened", orjson.dumps({**bad, "id": f"e-{n}"}))
    for seq in (1, 3, 4):  # 2 never stored
        await js.publish("dlq.signals.app.opened", b"{}", headers={
            "Tipstream-Original-Stream": "SIGNALS", "Tipstream-Original-Seq": str(seq),
            "Tipstream-Original-Subject": "signals.app.opened", "Tipstream-Dlq-Batch": "1/4"})
    for sent_again in (1, 0):
        service = ServiceProcess(tmp_path / "data", env).start()
        wait_until(lambda s=service: s.metric("tipstream_stream_position", stream="SIGNALS") == 4, what="read")
        assert service.metric("tipstream_dlq_total", reason="invalid_field", stream="SIGNALS") == sent_again
        service.kill()
    stored = [(await js.get_msg("DLQ", seq)).headers["Tipstream-Original-Seq"] for seq in range(1, 5)]
    assert sorted(stored) == ["1", "2", "3", "4"]
    assert (await js.stream_info("DLQ")).state.messages == 4


async def read_all(js: Any, stream: str, count: int) -> list[Any]:
    """The first `count` messages of `stream`, read once (no acks)."""
    sub = await js.pull_subscribe("", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE))
    messages: list[Any] = []
    while len(messages) < count:
        messages += await sub.fetch(min(count - len(messages), 1_000), timeout=5)
    await sub.unsubscribe()
    return messages


async def test_a_flood_of_bad_events_through_a_nats_outage_and_a_kill_9_reaches_the_dlq_once_each(
    nats_server, nc, tmp_path: Path
) -> None:
    """Half of 10,000 events bad, on two streams: NATS stopped mid-flood, with batches of dead letters in
    flight, and the service killed while it is away; then both started again. Every bad event is in the
    DLQ once (by its stream and sequence), and the streams are read to their ends."""
    js = nc.jetstream(publish_async_max_pending=4_000)
    env = {"NATS_URL": nats_server.url, "TIPSTREAM_DUPLICATE_WINDOW_S": "1",  # hides no second DLQ copy
           "TIPSTREAM_CHECKPOINT_EVERY_S": "0.5", "TIPSTREAM_CHECKPOINT_EVERY_EVENTS": "3000"}
    await streams_as_the_service_makes_them(js, 1)
    flood = []
    for i in range(10_000):
        subject, kind, data = [("signals.app.opened", "app.opened", {}), ("signals.task.created", "task.created",
                               {"task_id": f"t-{i}"}), ("feedback.tip.reacted", "tip.reacted",
                               {"tip_id": "t", "reaction": "acted"})][i % 3]
        flood.append((subject, {"id": f"e-{i}", "type": kind, "user_id": f"u-{i % 97}", "v": 1, "data": data,
                                "ts": "soon" if i % 4 < 2 else "2026-11-26T08:00:00+01:00"}))
    await publish_events(js, flood)
    total = {name: (await js.stream_info(name)).state.last_seq for name in ("SIGNALS", "FEEDBACK")}
    bad = {(name, msg.metadata.sequence.stream) for name in total
           for msg in await read_all(js, name, total[name]) if b'"soon"' in msg.data}
    assert len(bad) == 5_000
    await nc.close()

    service = ServiceProcess(tmp_path / "data", env).start()
    wait_until(lambda: service.metric("tipstream_dlq_total", reason="invalid_field", stream="SIGNALS") > 500,
               what="dead letters going out")
    nats_server.stop()
    service.kill()
    nats_server.start()
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    held = (await js.stream_info("DLQ")).state.messages
    assert 0 < held < len(bad), "NATS stopped mid-flood"

    service = ServiceProcess(tmp_path / "data", env).start()
    wait_until(lambda: all(service.metric("tipstream_stream_position", stream=s) == n for s, n in total.items()),
               timeout=60, what="caught up")
    assert service.stop(), service.log()
    stored = Counter((copy.headers[DLQ_STREAM], int(copy.headers[DLQ_SEQ]))
                     for copy in await read_all(js, "DLQ", (await js.stream_info("DLQ")).state.messages))
    assert set(stored) == bad
    assert stored.most_common(1)[0][1] == 1, "none stored twice"
    await client.close()


def _reaction(event_id: str, user: str, decision_id: str, tip_id: str, reaction: str) -> tuple[str, dict[str, Any]]:
    return ("feedback.tip.reacted", {"id": event_id, "type": "tip.reacted", "user_id": user, "v": 1,
                                     "ts": "2026-11-26T09:00:00+01:00",
                                     "data": {"tip_id": tip_id, "decision_id": decision_id, "reaction": reaction}})


@pytest.mark.postgres
async def test_a_kill_9_during_a_checkpoint_learns_each_reward_once(nats_server, nc, postgres_url: str,
                                                                     tmp_path: Path) -> None:
    """Killed while a checkpoint's transaction is open, the learner's snapshot, credits and `tip_scores` rows
    written in it and only its positions to come (held here by a lock on their rows): the database rolls it
    all back (the writer process dies with the service), and the restart learns the rewards since the last
    snapshot again, each once, and the reactions sent again none."""
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": postgres_url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2",
           "TIPSTREAM_MODEL_SNAPSHOT_EVERY_S": "0", "TIPSTREAM_CHECKPOINT_WRITER": "process"}
    service = ServiceProcess(tmp_path / "data", env).start()
    js = nc.jetstream()
    users = [f"u-{n}" for n in range(4)]
    candidates = [{"tip_id": "tip-a", "category": "focus"}, {"tip_id": "tip-b", "category": "breaks"}]
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
        decisions = {user: (await http.post("/score", json={"user_id": user, "candidates": candidates})).json()[
            "decision_id"] for user in users}

    def counted(outcome: str) -> float:
        return service.metric("tipstream_feedback_total", outcome=outcome)

    await publish_events(js, [_reaction(f"a-{u}", u, decisions[u], "tip-a", "acted") for u in users])
    wait_until(lambda: counted("credited") == 4 and service.metric("tipstream_checkpoint_position", stream="FEEDBACK")
               == 4, what="the first rewards checkpointed")
    engine = sa.create_engine(postgres_url)
    lock = engine.connect()
    lock.begin()
    lock.execute(sa.text("select * from stream_positions for update"))
    try:
        await publish_events(js, [_reaction(f"b-{u}", u, decisions[u], "tip-b", "disliked") for u in users]
                             + [_reaction(f"a2-{u}", u, decisions[u], "tip-a", "liked") for u in users[:2]])
        wait_until(lambda: counted("credited") == 8 and counted("duplicate") == 2, what="the second rewards")

        def checkpoint_waits_for_the_positions() -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(sa.text("select count(*) from pg_stat_activity where wait_event_type = "
                                                 "'Lock' and query ilike '%stream_positions%'")).scalar())

        wait_until(checkpoint_waits_for_the_positions, what="a checkpoint waiting for the positions' rows")
        service.kill()
    finally:
        lock.rollback()
        lock.close()

    service = ServiceProcess(tmp_path / "data", env).start()
    last = (await js.stream_info("FEEDBACK")).state.last_seq
    wait_until(lambda: service.get("/readyz").status_code == 200
               and service.metric("tipstream_stream_position", stream="FEEDBACK") == last, what="caught up")
    assert (counted("credited"), counted("duplicate")) == (4, 2), "the second rewards learned again, once"
    await publish_events(js, [_reaction(f"c-{u}-{t}", u, decisions[u], t, "acted") for u in users for t in ("tip-a", "tip-b")])
    wait_until(lambda: counted("duplicate") == 10, what="the reactions sent again")
    assert service.get("/models/v1").json()["n_learned"] == 8
    assert service.stop(), service.log()
    with engine.connect() as conn:
        rewards = dict(conn.execute(sa.text("select decision_id, rewards from tip_scores")).all())
    engine.dispose()
    assert rewards == {decisions[u]: {"tip-a": 1.0, "tip-b": 0.0} for u in users}

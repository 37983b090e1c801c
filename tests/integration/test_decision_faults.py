"""The decision log and the learner under faults: rewards learned once, rows that keep them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from pathlib import Path

import nats
import orjson
import pytest
import sqlalchemy as sa

from app import decision_spool
from tests.conftest import NatsServer, account_url, eventually, limited_account_server, wait_stopped
from tests.e2e.test_learning import BODY, NOW, count, feedback, publish


def tip_scores(url: str) -> dict[str, object]:
    """decision id -> its rewards, as written."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select decision_id, rewards from tip_scores")).all()
    finally:
        engine.dispose()
    return {d: orjson.loads(r) if isinstance(r, str) else r for d, r in rows}


@pytest.mark.parametrize("landed", [False, True])
async def test_a_decision_spooled_at_a_stop_keeps_the_reward_it_was_credited(
        start_service, nc, tmp_path, monkeypatch, landed: bool) -> None:
    """Feedback can be credited before JetStream acknowledges its decision (the join cache holds it
    from the answer on). When the stop then spools the decision, the next start must rejoin it with
    the credit the learner's snapshot kept: its row carries the reward, and a re-sent reaction is
    not learned a second time. `landed`: the decision had reached the stream after all (its
    acknowledgement lost), so the start also reads it back from DECISIONS."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # JetStream refuses the decision: a stop waits out any bound
    settings = {"checkpoint_every_s": 0.1}
    running = await start_service(**settings)
    js = nc.jetstream()
    # JetStream refuses every decision (no stream takes `decisions.>`): it stays unpublished. Not deleted: ingest
    # makes a stream deleted under it again (its consumer gone with it), and the decision was published.
    info = await js.stream_info("DECISIONS")
    await js.update_stream(dataclasses.replace(info.config, subjects=["decisions-refused.>"]))
    async with running.http() as http:
        decision = (await http.post("/score", json=BODY)).json()["decision_id"]
    await publish(js, feedback("f-1", decision, "tip-focus-1", "acted"))
    await eventually(lambda: running.service.learner.credited == 1)
    learned = running.service.lineup.champion.n_learned
    await running.stop()
    spool = tmp_path / "data" / decision_spool.SPOOL_NAME
    assert spool.exists(), "the stop kept the unpublished decision"
    await js.delete_stream("DECISIONS")
    if landed:  # put in the stream as the refused publish would have
        [(subject, _, payload)] = decision_spool.read(spool)
        await js.add_stream(name="DECISIONS", subjects=["decisions.>"])
        await js.publish(subject, payload, headers={"Nats-Msg-Id": decision})

    again = await start_service(**settings)  # the start creates DECISIONS again
    service = again.service
    await eventually(lambda: service.publisher.published == 1, timeout=20)
    url = service.settings.sqlalchemy_url
    await eventually(lambda: decision in tip_scores(url), timeout=10)
    assert tip_scores(url)[decision] == {"tip-focus-1": 1.0}, "the row keeps the reward learned before the stop"
    duplicates = count("duplicate")
    await publish(js, feedback("f-1-again", decision, "tip-focus-1", "acted"))
    await eventually(lambda: service.store.positions.get("FEEDBACK") == 2)
    assert service.lineup.champion.n_learned == learned, "the reaction was learned twice"
    assert count("duplicate") == duplicates + 1


def foreign(decision_id: str, **changes: object) -> dict[str, object]:
    """A decision as another publisher writes it to DECISIONS, with `changes`."""
    return {"id": decision_id, "type": "decision.scored", "v": 1, "ts": NOW, "user_id": "u-1", "model_version": "v1",
            "policy": "greedy", "features": {"user_id": "u-1", "hour_of_day": 9},
            "ranked": [{"tip_id": "tip-focus-1", "category": "focus", "score": 0.5, "propensity": 1.0}], **changes}


def dead_lettered(stream: str = "DECISIONS", kind: str | None = None) -> float:
    from app.metrics import METRICS

    return sum(s.value for metric in METRICS.dlq.collect() for s in metric.samples
               if s.name.endswith("_total") and s.labels["stream"] == stream and kind in (None, s.labels["reason"]))


MALFORMED = {  # each one a field the learner or a tip_scores row needs
    "no-tip-id": {"ranked": [{"score": 0.5, "propensity": 1.0}]},
    "no-candidate": {"ranked": []},
    "no-user": {"user_id": None},
    "no-ts": {"ts": "yesterday"},
    "score-text": {"ranked": [{"tip_id": "tip-focus-1", "score": "high", "propensity": 1.0}]},
    "tip-id-too-long": {"ranked": [{"tip_id": "t" * 200, "score": 0.5, "propensity": 1.0}]},
    "kind-too-long": {"type": "decision." + "x" * 40},
    "nul-in-user": {"user_id": "u-\u0000"},
    "features-list": {"ranked": [{"tip_id": "tip-focus-1", "features": [1], "score": 0.5, "propensity": 1.0}]},
    # No model input: every card's progressive validation failed on it once its row held the reward.
    "feature-value-list": {"features": {"user_id": "u-1", "labels": ["work"]}},
    "candidate-feature-object": {"ranked": [{"tip_id": "tip-focus-1", "features": {"size": {"w": 3}}, "score": 0.5,
                                             "propensity": 1.0}]},
    # The learner joined feedback to the first listing, a registration's training took the last.
    "tip-twice": {"ranked": [{"tip_id": "tip-focus-1", "category": c, "score": 0.5, "propensity": 0.5}
                             for c in ("focus", "breaks")]},
    # Read by every card's policy value (evaluate): a list or a shadow without its first tip failed it.
    "greedy-list": {"greedy": ["tip-focus-1"]},
    "shadow-text": {"shadow": "v2"},
    # An instant before year 1 in UTC: its row's created_at overflowed, the decision went to the DLQ as a bug of
    # ours (processing_failed) while the join cache kept it, and feedback crediting it went there too.
    "ts-before-year-1-in-utc": {"ts": "0001-01-01T00:00:00+23:59"},
    "ts-after-year-9999-in-utc": {"ts": "9999-12-31T23:59:59-23:59"},
    # Features of another user's: u-1's reaction trained ana's own weights, and forgetting ana left the message
    # (u-1's) in DECISIONS for a rebuild to learn again.
    "features-of-another-user": {"features": {"user_id": "ana", "hour_of_day": 9}},
    "candidate-feature-read-as-a-user": {"ranked": [{"tip_id": "tip-focus-1", "features": {"user_id_ana": 1.0},
                                                     "score": 0.5, "propensity": 1.0}]},
    # Another contract's decision, whose fields may mean otherwise: joined as v1, its reactions were learned.
    "newer-version": {"v": 2},
    "version-true": {"v": True},
}


async def test_a_malformed_decision_from_another_publisher_goes_to_the_dlq(start_service, nc, database_url) -> None:
    """Decisions are read back from DECISIONS, also those others publish. One lacking what a row or
    a join needs used to be joined anyway: feedback naming it failed in the learner and held FEEDBACK
    at that event for good, and a value its `tip_scores` column cannot hold failed every checkpoint."""
    running = await start_service(database_url=database_url, checkpoint_every_s=0.1)
    service, js = running.service, nc.jetstream()
    before = dead_lettered()
    failed = [dead_lettered(stream, "processing_failed") for stream in ("DECISIONS", "FEEDBACK")]
    for name, changes in MALFORMED.items():
        event = foreign(f"d-bad-{name}", **changes)
        await js.publish("decisions.score", orjson.dumps(event), headers={"Nats-Msg-Id": event["id"]})
        await publish(js, feedback(f"f-{name}", event["id"], "tip-focus-1", "acted"))
    await js.publish("decisions.score", orjson.dumps(foreign("d-good")), headers={"Nats-Msg-Id": "d-good"})
    await publish(js, feedback("f-good", "d-good", "tip-focus-1", "acted"))

    await eventually(lambda: service.learner.credited == 1, timeout=10)
    # Counted once the DLQ acknowledges each, which the FEEDBACK ingest's credit does not wait for.
    await eventually(lambda: dead_lettered() == before + len(MALFORMED), timeout=10)
    assert service.store.positions["FEEDBACK"] == len(MALFORMED) + 1
    # Each refused by the check, naming its field: none a bug of ours, and no feedback naming one dead-lettered.
    assert [dead_lettered(stream, "processing_failed") for stream in ("DECISIONS", "FEEDBACK")] == failed
    last = (await js.stream_info("DECISIONS")).state.last_seq
    await eventually(lambda: (service.checkpointer._saved_positions or {}).get("DECISIONS", 0) >= last, timeout=10)
    assert "d-good" in tip_scores(service.settings.sqlalchemy_url)


async def test_a_decision_whose_id_says_it_was_served_long_after_it_was_stored_goes_to_the_dlq(
        start_service, nc) -> None:
    """An id in our form tells when /score served the decision. Another publisher's, its clock years ahead (or the
    id made up), was taken as the newest served: a request to forget a user was acted on as of year 2527, and every
    decision served to that user until then was forgotten with them, their reactions unlearned."""
    from app.decision_ids import decision_time_ms
    from streams.jetstream import DLQ_KIND, DLQ_REASON

    running = await start_service(checkpoint_every_s=0.1)
    service, js = running.service, nc.jetstream()
    ahead, hour_ahead = "d-0fffffffffff" + "1" * 16, f"d-{int(time.time() * 1000) + 3_600_000:012x}" + "2" * 16
    for decision_id in (ahead, hour_ahead):
        await js.publish("decisions.score", orjson.dumps(foreign(decision_id)), headers={"Nats-Msg-Id": decision_id})
        await publish(js, feedback(f"f-{decision_id}", decision_id, "tip-focus-1", "acted"))
    await eventually(lambda: service.store.positions.get("FEEDBACK") == 2
                     and service.store.positions.get("DECISIONS") == 2, timeout=10)
    await eventually(lambda: dead_lettered(kind="future_ts") == 1 and service.learner.credited == 1, timeout=10)
    [copy] = await (await js.pull_subscribe("dlq.>", stream="DLQ")).fetch(1, timeout=5)
    assert copy.headers[DLQ_KIND] == "future_ts" and ahead in copy.headers[DLQ_REASON], copy.headers
    # An hour ahead is a clock's skew (TIPSTREAM_MAX_FUTURE_S, a day): joined and learned, and a forget acted on
    # as of then; the reaction to the other waits for a decision that never comes.
    assert service.learner.credited == 1 and service.learner.decisions_until_ms == decision_time_ms(hour_ahead)
    assert service.eraser._acted_on_at().timestamp() * 1000 == decision_time_ms(hour_ahead)


async def test_a_decision_from_another_publisher_with_null_optional_texts_gets_its_row(
        start_service, nc, database_url) -> None:
    """`policy`, `shadow_version` and `prompt_version` may be null (absent), as the DECISIONS check takes them: a
    null policy went into the row as NULL, which its column refuses, and every later checkpoint failed."""
    running = await start_service(database_url=database_url, checkpoint_every_s=0.1)
    service, js = running.service, nc.jetstream()
    event = foreign("d-nulls", policy=None, shadow_version=None, prompt_version=None)
    await js.publish("decisions.score", orjson.dumps(event), headers={"Nats-Msg-Id": event["id"]})
    last = (await js.stream_info("DECISIONS")).state.last_seq
    await eventually(lambda: (service.checkpointer._saved_positions or {}).get("DECISIONS", 0) >= last, timeout=10)
    assert service.checkpointer.last_error is None
    engine = sa.create_engine(service.settings.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("select policy, shadow_version, prompt_version from tip_scores "
                                       "where decision_id = 'd-nulls'")).one()
    finally:
        engine.dispose()
    assert tuple(row) == ("", None, None)


async def reconnected(service: object, nats_server: object) -> float:
    """Start NATS again and wait until the service is connected; the time it was."""
    nats_server.start()  # type: ignore[attr-defined]
    await eventually(lambda: service.nc.is_connected, timeout=10)  # type: ignore[attr-defined]
    return time.monotonic()


async def test_decisions_queued_while_nats_was_away_are_published_as_soon_as_it_is_back(
        start_service, nats_server) -> None:
    """The publisher looked for the connection again after waits that doubled up to 5 s: after an
    outage of a few seconds, the decisions served meanwhile stayed in memory (exposed to a crash,
    filling the queue towards 503s) for seconds after NATS was back."""
    running = await start_service()
    service = running.service
    async with running.http() as http:
        assert (await http.post("/score", json=BODY)).status_code == 200
        await eventually(lambda: service.publisher.published == 1)
        nats_server.stop()
        await eventually(lambda: not service.nc.is_connected)
        for _ in range(5):
            assert (await http.post("/score", json=BODY)).status_code == 200
        outage_ends = time.monotonic() + 3.3  # the waits had reached 1.6 s, the next was 3.2
        await eventually(lambda: time.monotonic() > outage_ends, timeout=5, interval=0.1)
    back = await reconnected(service, nats_server)
    await eventually(lambda: service.publisher.published == 6, timeout=10)
    assert time.monotonic() - back < 1.0, "published within a second of NATS being back"


async def test_decisions_in_flight_when_nats_went_away_are_sent_again_once_it_is_back(
        start_service, nats_server) -> None:
    """A decision written to a connection that then died gets no acknowledgement: on the new
    connection it is sent again at once, not after the 5 s acknowledgement timeout."""
    running = await start_service()
    service = running.service
    await eventually(lambda: service.decision_tail.following)
    nats_server.process.send_signal(signal.SIGSTOP)  # the server takes the decision and never answers
    try:
        wait_stopped(nats_server.process.pid)  # every thread: it may answer until then
        async with running.http() as http:
            assert (await http.post("/score", json=BODY)).status_code == 200
        await eventually(lambda: len(service.publisher.inflight) == 1)
    finally:
        nats_server.process.kill()
        nats_server.process.wait(10)
    back = await reconnected(service, nats_server)
    await eventually(lambda: service.publisher.published == 1, timeout=10)
    assert time.monotonic() - back < 1.0, "sent again on the new connection at once"


async def test_decisions_deleted_while_followed_is_made_again_and_takes_the_decisions(start_service, nc) -> None:
    """Caught up, the DECISIONS ingest stops reading (decision_tail.py): its stream deleted then (`nats stream
    rm`, to empty it), no consumer's pull told ingest, the tail's look at the stream failed quietly at each
    tick, and JetStream refused every decision until a restart: /score answered 503 once the queue filled. The
    tail reads again, which makes the streams again, as for any stream gone under ingest."""
    running = await start_service()
    service = running.service
    await eventually(lambda: service.decision_tail.following)
    await nc.jetstream().delete_stream("DECISIONS")
    async with running.http() as http:
        assert (await http.post("/score", json=BODY)).status_code == 200
    await eventually(lambda: service.publisher.published == 1, timeout=10)
    assert (await nc.jetstream().stream_info("DECISIONS")).state.messages == 1


def storage_capped_server(where: Path, cap: str) -> tuple[NatsServer, str]:
    """A nats-server whose JetStream file storage is capped by its own `max_file_store` ("server") or by
    its one account's `max_file` ("account"), and the URL to reach it."""
    if cap == "account":
        server = limited_account_server(where, "max_file: 300KB")
        return server, account_url(server)
    where.mkdir(parents=True, exist_ok=True)
    (where / "capped.conf").write_text("jetstream { max_file_store: 300KB }\n")
    server = NatsServer(where, args=("-c", str(where / "capped.conf")))
    return server, server.url


async def fill_to_the_last_byte(url: str) -> None:
    """JetStream's storage filled, by a stream beside tipstream's: to the last bytes, as a decision or a DLQ
    copy fits in what larger messages leave."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.add_stream(name="FILL", subjects=["fill.>"])
        for size in (50_000, 1_000, 10):
            with pytest.raises(nats.js.errors.APIError):
                for _ in range(1_000):
                    await js.publish("fill.x", b"x" * size)
    finally:
        await client.close()


async def first_refusal(caplog: pytest.LogCaptureFixture) -> str:
    """The first warning of a decision JetStream refused (`tipstream.decisions`, captured from WARNING)."""

    def refused() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("JetStream refused decision")]

    return (await eventually(refused, timeout=5))[0]


@pytest.mark.parametrize("cap", ["server", "account"])
async def test_a_decision_refused_for_storage_full_names_the_limits_to_free_or_raise(
        start_service, tmp_path, monkeypatch, caplog, cap: str) -> None:
    """The fix was told only for err_code 10047, which nats-server answers to a stream's creation: a
    publish past the server's max_file_store gets 10023 and one past the account's max_file 10002, so
    the log said only JetStream's words, not which limits (docs/operations.md, "Disk")."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # JetStream refuses the decision: a stop waits out any bound
    server, url = storage_capped_server(tmp_path / "capped", cap)
    server.start()
    try:
        running = await start_service(nats_url=url)
        await fill_to_the_last_byte(url)
        caplog.set_level(logging.WARNING, logger="tipstream.decisions")
        async with running.http() as http:
            assert (await http.post("/score", json=BODY)).status_code == 200
        told = await first_refusal(caplog)
        assert "max_file_store" in told and "TIPSTREAM_STREAM_MAX_BYTES" in told, told
        await running.stop()
    finally:
        server.stop()


async def test_a_bad_event_whose_dlq_copy_is_refused_for_storage_full_names_the_limits(
        start_service, tmp_path, caplog) -> None:
    """SIGNALS waits at a bad event until the DLQ takes its copy; refused for JetStream's storage full, the
    log said JetStream's words only, not which limits to free or raise (docs/operations.md, "Disk")."""
    server, url = storage_capped_server(tmp_path / "capped", "server")
    server.start()
    try:
        running = await start_service(nats_url=url)  # its streams made
        await running.stop()
        client = await nats.connect(url)
        try:
            await client.jetstream().publish("signals.task.created", b"not json")
        finally:
            await client.close()
        await fill_to_the_last_byte(url)
        caplog.set_level(logging.WARNING, logger="tipstream.ingest")
        again = await start_service(nats_url=url)

        def refused() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.getMessage().startswith("could not publish to the DLQ")]

        told = (await eventually(refused, timeout=5))[0]
        assert "insufficient resources" in told and "max_file_store" in told, told
        await again.stop()
    finally:
        server.stop()


async def test_a_damaged_spool_publishes_what_it_can_read_and_keeps_the_rest_aside(start_service, tmp_path, caplog) -> None:
    """A line of the spool that could not be read (the file damaged, or edited by hand) failed every start with
    a traceback, so the service stayed down until the file was removed, and with it every decision in it."""
    from app.decision_ids import new_decision_id

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    good = [new_decision_id() for _ in range(2)]
    line = {d: orjson.dumps({"subject": "decisions.score", "id": d, "event": orjson.dumps(foreign(d)).decode()})
            for d in good}
    other = new_decision_id()
    damaged = [b'{"subject": "decisions.score", "id": "d-cut', b"\xff\xfe not text",
               orjson.dumps({"subject": "decisions.score", "id": other, "event": "{}"}),  # no decision
               line[good[0]].replace(b"decisions.score", b"decisions score"),  # HPUB's next field
               orjson.dumps({"subject": "decisions.score", "id": other, "event": orjson.dumps(foreign(good[0])).decode()})]
    spool = data / decision_spool.SPOOL_NAME
    spool.write_bytes(b"\n".join([line[good[0]], *damaged[:2], line[good[1]], *damaged[2:]]) + b"\n")
    caplog.set_level(logging.ERROR, logger="tipstream")
    running = await start_service()
    service = running.service
    await eventually(lambda: service.publisher.published == 2, timeout=10)
    assert all(d in service.learner.joins.cache for d in good)
    await eventually(lambda: not spool.exists())
    [aside] = data.glob(decision_spool.SPOOL_NAME + ".unreadable-*")
    assert aside.read_bytes() == b"\n".join(damaged) + b"\n" and aside.stat().st_mode & 0o777 == 0o600
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream" and r.levelno == logging.ERROR]
    assert any(m.startswith(f"5 lines of {spool} are no decision spooled") and str(aside) in m for m in told), told


async def test_a_spool_that_cannot_be_read_ends_the_start_naming_it(nats_server, tmp_path) -> None:
    """Not readable, the spool is not given up (its decisions would be lost): the start ends, saying what to do."""
    from app.bootstrap import Service
    from app.settings import Settings
    from app.start_errors import StartupError

    spool = tmp_path / "data" / decision_spool.SPOOL_NAME
    spool.mkdir(parents=True)  # read as a file: an OSError, as one not this user's to read would be
    service = Service(Settings(data_dir=tmp_path / "data", nats_url=nats_server.url))
    with pytest.raises(StartupError) as refused:
        await service.start()
    await service.stop()
    assert str(refused.value).startswith(f"Cannot read {spool} (Is a directory): it holds the decisions served "
                                         "before the last stop"), str(refused.value)
    assert spool.is_dir()


async def test_a_decision_larger_than_the_servers_max_payload_is_refused_not_sent(start_service, tmp_path) -> None:
    """The publisher writes its own HPUB commands, which nats-py's `publish` checks against the server's
    max_payload and these did not: a decision larger (a /score of many candidates, the server's max_payload
    lowered) was written, the server closed the connection for it ('Maximum Payload Violation'), nats-py closed
    it for good, and the service stopped, spooled the decision, and sent it again at every start: it could not
    stay up. Refused (413, nothing served, no Retry-After: no wait mends it), saying which limits."""
    where = tmp_path / "small"
    where.mkdir()
    (where / "small.conf").write_text("max_payload: 16KB\n")
    server = NatsServer(where, args=("-c", str(where / "small.conf")))
    server.start()
    try:
        running = await start_service(nats_url=server.url)
        service = running.service
        large = {**BODY, "candidates": [{"tip_id": f"tip-{i}", "category": "focus", "features": {"text": "x" * 120}}
                                        for i in range(100)]}
        async with running.http() as http:
            refused = await http.post("/score", json=large)
            assert refused.status_code == 413 and "retry-after" not in refused.headers, refused.text
            assert "max_payload" in refused.json()["error"] and refused.json()["field"] == "candidates", refused.text
            assert (await http.post("/score", json=BODY)).status_code == 200
        await eventually(lambda: service.publisher.published == 1, timeout=10)
        assert service.nc.is_connected and service.fatal is None
        await running.stop()
    finally:
        server.stop()


async def test_a_spooled_decision_larger_than_the_servers_max_payload_is_kept_not_sent(
        start_service, tmp_path, caplog) -> None:
    """Spooled by a stop (the server's max_payload lowered since, or another server), such a decision closed the
    connection at each start, held the decisions behind it, and sent again after each reconnect, for good."""
    from app.decision_ids import new_decision_id

    where = tmp_path / "small"
    where.mkdir()
    (where / "small.conf").write_text("max_payload: 16KB\n")
    server = NatsServer(where, args=("-c", str(where / "small.conf")))
    server.start()
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    large, small = new_decision_id(), new_decision_id()
    candidates = [{"tip_id": f"tip-{i}", "category": "focus", "features": {"text": "x" * 200}, "score": 0.5,
                   "propensity": 0.01} for i in range(100)]
    spool = data / decision_spool.SPOOL_NAME
    decision_spool.save(spool, [("decisions.score", large, orjson.dumps(foreign(large, ranked=candidates))),
                                ("decisions.score", small, orjson.dumps(foreign(small)))])
    caplog.set_level(logging.ERROR, logger="tipstream.decisions")
    try:
        running = await start_service(nats_url=server.url)
        service = running.service
        await eventually(lambda: service.publisher.published == 1, timeout=10)
        assert service.nc.is_connected and [d for _, d, _ in service.publisher.unpublished()] == [large]
        assert service.publisher.waiting == 1, "tipstream_decision_queue counts it"
        told = [r.getMessage() for r in caplog.records if r.name == "tipstream.decisions"]
        assert any(m.startswith(f"decision {large} is ") and "max_payload, 16,384 bytes" in m for m in told), told
        await running.stop()
        assert [d for _, d, _ in decision_spool.read(spool)] == [large], "kept for a server that takes it"
    finally:
        server.stop()


async def test_decisions_made_again_between_two_ticks_of_the_tail_are_read(start_service, nc) -> None:
    """Deleted and added again at once (to empty it), DECISIONS numbered from 1 under the followed position:
    another publisher's decision there was not read, and the reaction to it waited, then expired."""
    from app.decision_ids import new_decision_id

    running = await start_service()
    service, js = running.service, nc.jetstream()
    async with running.http() as http:
        for _ in range(3):
            assert (await http.post("/score", json=BODY)).status_code == 200
    await eventually(lambda: service.publisher.published == 3 and service.decision_tail.following
                     and service.store.positions.get("DECISIONS") == 3)
    config = (await js.stream_info("DECISIONS")).config
    await js.delete_stream("DECISIONS")
    await js.add_stream(config)
    other = new_decision_id()
    await js.publish("decisions.score", orjson.dumps(foreign(other)), headers={"Nats-Msg-Id": other})
    await eventually(lambda: other in service.learner.joins.cache, timeout=10)
    await eventually(lambda: service.decision_tail.following and service.store.positions.get("DECISIONS") == 1)


async def first_refusal_after_an_edit(start_service, nc, monkeypatch, caplog: pytest.LogCaptureFixture,
                                      **edit: object) -> str:
    """DECISIONS edited outside tipstream (`nats stream edit`: `edit`, its config's fields) under a running service,
    two decisions served: the warning of the first refused, the service stopped."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # JetStream refuses the decision: a stop waits out any bound
    running = await start_service()
    js = nc.jetstream()
    config = (await js.stream_info("DECISIONS")).config
    await js.update_stream(dataclasses.replace(config, **edit))
    caplog.set_level(logging.WARNING, logger="tipstream.decisions")
    async with running.http() as http:
        for _ in range(2):
            assert (await http.post("/score", json=BODY)).status_code == 200
    told = await first_refusal(caplog)
    await running.stop()
    return told


async def test_a_decision_refused_by_a_full_stream_that_discards_new_messages_names_the_fix(
        start_service, nc, monkeypatch, caplog) -> None:
    """DECISIONS set outside tipstream to refuse messages past its limits (`--discard new`) refused every decision
    once full, for as long as its oldest stayed, and the log said only JetStream's words ('maximum messages
    exceeded'): /score turned 503 with nothing naming the stream's setting that made it."""
    from nats.js.api import DiscardPolicy

    told = await first_refusal_after_an_edit(start_service, nc, monkeypatch, caplog, discard=DiscardPolicy.NEW,
                                             max_msgs=1)
    assert "maximum messages exceeded" in told and "--discard old" in told, told


async def test_a_decision_larger_than_decisions_max_msg_size_is_held_aside_and_the_others_flow(
        start_service, nc, monkeypatch, caplog) -> None:
    """DECISIONS' max_msg_size set below a decision (an operator's `nats stream edit`): JetStream refuses that one
    every time (err_code 10054). It went back to the front of the queue at each refusal, for good, with a wait
    added to the rounds of every decision behind it and a warning naming no setting. A refusal no wait mends is
    held aside (spooled at the stop) with the setting and its fix, and the decisions behind it are published."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # a decision held aside: a stop waits out any bound
    running = await start_service()
    service, js = running.service, nc.jetstream()
    config = (await js.stream_info("DECISIONS")).config
    await js.update_stream(dataclasses.replace(config, max_msg_size=8_192))
    caplog.set_level(logging.WARNING, logger="tipstream.decisions")
    large = {**BODY, "candidates": [{"tip_id": f"tip-{i}", "category": "focus", "features": {"text": "x" * 120}}
                                    for i in range(100)]}
    async with running.http() as http:
        refused = (await http.post("/score", json=large)).json()["decision_id"]
        for _ in range(20):
            assert (await http.post("/score", json=BODY)).status_code == 200
    await eventually(lambda: service.publisher.published == 20, timeout=10)
    await eventually(lambda: [d for _, d, _ in service.publisher.held] == [refused], timeout=5)
    retried = service.publisher.retried
    async with running.http() as http:  # no longer sent: nothing behind it waits for its refusals
        for _ in range(5):
            assert (await http.post("/score", json=BODY)).status_code == 200
    await eventually(lambda: service.publisher.published == 25, timeout=10)
    assert service.publisher.retried == retried and service.publisher.waiting == 1
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream.decisions" and r.levelno == logging.ERROR]
    assert any(refused in m and "max_msg_size" in m and "nats stream edit DECISIONS --max-msg-size" in m
               for m in told), told
    await running.stop()


async def test_decisions_left_unanswered_by_a_full_disk_make_the_stream_s_first_sequence_told_as_never_stored(
        start_service, full_disk_nats_server, caplog) -> None:
    """The soak's NATS_URL server with its store's disk full: the first decision's failed write was given DECISIONS'
    sequence 1 and stored nothing; once the server had room and was restarted, the service read on from 2 saying of
    1 'those before are gone (past its retention, or erased with a user forgotten)', as if a decision was lost, where
    it had sent it again and it was stored at 2."""
    server = full_disk_nats_server
    running = await start_service(nats_url=server.url)
    publisher = running.service.publisher
    publisher.ack_timeout_s = 0.5  # the decision sent again within half a second, not 5
    server.fill()
    caplog.set_level(logging.INFO)
    async with running.http() as http:
        assert (await http.post("/score", json=BODY)).status_code == 200
    await eventually(lambda: "JetStream acknowledged none of the decisions" in caplog.text and b"no space left on "
                     b"device" in (server.store / "server.log").read_bytes())
    server.free()
    server.stop()
    server.start()
    await eventually(lambda: publisher.published == 1, timeout=20)

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream DECISIONS keeps")]

    await eventually(told)
    assert told()[0].startswith("stream DECISIONS keeps sequences 2 on; those before were most likely never stored: "
                                "nats-server gives a write to an empty stream that fails (its store's disk full) a "
                                "sequence and stores nothing, and JetStream acknowledged no decision with NATS connected (last at "), told()
    assert told()[0].endswith("Else they are gone (past its retention, erased with a user forgotten, or purged)")
    client = await nats.connect(server.url)
    try:
        state = (await client.jetstream().stream_info("DECISIONS")).state
        assert (state.first_seq, state.messages) == (2, 1), state  # sent again, stored once
    finally:
        await client.close()
    await running.stop()


async def test_a_queue_full_of_decisions_a_full_stream_refuses_answers_503_naming_the_stream_s_setting(
        start_service, nc, monkeypatch, caplog) -> None:
    """DECISIONS at its limits with its discard policy 'new' (an operator's `nats stream edit`) refused every
    decision until the queue was full; the 503 then said 'is NATS reachable? Retry shortly.', NATS being there, as
    its clients and their operator read it, while the log's warning named the stream's setting and its fix. And the
    stop's line on the decision it spooled asked '(is NATS away?)'."""
    from nats.js.api import DiscardPolicy

    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # JetStream refuses the decision: a stop waits out any bound
    running = await start_service(decision_queue_max=1, decision_enqueue_timeout_s=0.1)
    service, js = running.service, nc.jetstream()
    config = (await js.stream_info("DECISIONS")).config
    async with running.http() as http:
        assert (await http.post("/score", json=BODY)).status_code == 200
        await eventually(lambda: service.publisher.published == 1)
        await js.update_stream(dataclasses.replace(config, discard=DiscardPolicy.NEW, max_msgs=1))
        assert (await http.post("/score", json=BODY)).status_code == 200  # queued, then refused
        await eventually(lambda: service.publisher.retried >= 1)
        answer = await http.post("/score", json=BODY)
    assert answer.status_code == 503, answer.text
    told = answer.json()["error"]
    assert "maximum messages exceeded" in told and "--discard old" in told, told
    assert "NATS reachable" not in told, told
    caplog.set_level(logging.WARNING, logger="tipstream")
    await running.stop()
    [told] = [r.getMessage() for r in caplog.records if "not acknowledged by JetStream yet" in r.getMessage()]
    assert told.startswith("1 decision served is not acknowledged by JetStream yet: JetStream refuses them "
                           "(maximum messages exceeded)"), told
    assert "--discard old" in told and "NATS away" not in told, told


async def test_a_queue_full_of_decisions_a_hung_server_leaves_unanswered_answers_503_saying_so(
        start_service, nats_server) -> None:
    """A server that takes the decisions and answers none (stopped, or its store's disk full): once the queue was
    full, the 503 asked 'is NATS reachable?', the connection being up, while the log said JetStream acknowledged
    none and what to look at."""
    running = await start_service(decision_queue_max=1, decision_enqueue_timeout_s=0.1)
    service = running.service
    publisher = service.publisher
    publisher.ack_timeout_s = 0.5  # the decision sent again within half a second, not 5
    await eventually(lambda: service.decision_tail.following)
    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        wait_stopped(nats_server.process.pid)
        async with running.http() as http:
            assert (await http.post("/score", json=BODY)).status_code == 200
            await eventually(lambda: publisher.store_failed_told() is not None, timeout=5)
            answer = await http.post("/score", json=BODY)
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    assert answer.status_code == 503, answer.text
    told = answer.json()["error"]
    assert "acknowledged none" in told and "hang" in told and "NATS reachable" not in told, told
    await eventually(lambda: publisher.published == 1, timeout=10)
    await running.stop()


async def test_a_max_payload_lowered_under_a_decision_by_a_reload_stops_the_service_naming_the_reload(
        start_service, tmp_path, monkeypatch) -> None:
    """A reload of the server's configuration that lowers max_payload tells no connection: the next decision over
    the new limit, under the one the greeting told, makes the server close the connection for good, and the service
    stops (exit code 1) for its supervisor to start it with a new connection. The line said 'if the server refused
    its credentials, fix NATS_URL first', naming neither the limit nor what the next start does with it."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # the connection closed: a stop waits out any bound
    config = tmp_path / "reloaded" / "limits.conf"
    config.parent.mkdir()
    jetstream = f'jetstream {{ store_dir: "{tmp_path / "reloaded"}" }}\n'  # in the file, as a reload reads it
    config.write_text(jetstream)
    server = NatsServer(tmp_path / "reloaded", args=("-c", str(config)), jetstream_flags=False)
    server.start()
    try:
        running = await start_service(nats_url=server.url)
        service = running.service
        told: list[str] = []
        service.on_fatal = told.append
        config.write_text("max_payload: 512\n" + jetstream)
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)

        async def lowered() -> bool:
            client = await nats.connect(server.url)
            try:
                return client.max_payload == 512
            finally:
                await client.close()

        await eventually(lowered, timeout=10)
        async with running.http() as http:
            assert (await http.post("/score", json=BODY)).status_code == 200  # sent: over 512 bytes
        await eventually(lambda: told, timeout=10)
        assert "maximum payload violation" in told[0] and "max_payload" in told[0] and "reload" in told[0], told
        assert "413" in told[0] and "credentials" not in told[0], told
        await running.stop()
        assert len(decision_spool.read(tmp_path / "data" / decision_spool.SPOOL_NAME)) == 1, "kept for the next start"
    finally:
        server.stop()


async def stored_decision_ids(js) -> list[str]:
    """The ids of every decision DECISIONS holds, in its order (a decision stored twice: twice)."""
    state = (await js.stream_info("DECISIONS")).state
    ids = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        ids.append(orjson.loads((await js.get_msg("DECISIONS", seq)).data)["id"])
    return ids


async def served_to_a_hung_server(running, nats_server: NatsServer, count: int) -> list[str]:
    """The server stopped (SIGSTOP, every thread), then `count` /score answers: their decision ids. The caller
    resumes the server (SIGCONT), whatever happens."""
    assert nats_server.process is not None
    nats_server.process.send_signal(signal.SIGSTOP)
    wait_stopped(nats_server.process.pid)
    async with running.http() as http:
        answers = [await http.post("/score", json=BODY) for _ in range(count)]
    assert [a.status_code for a in answers] == [200] * count, [a.text for a in answers]
    return [a.json()["decision_id"] for a in answers]


async def test_decisions_sent_again_through_a_hang_are_stored_once_each(start_service, nats_server, nc) -> None:
    """A server that hangs (SIGSTOP) takes the decisions and answers none: each is sent again at every
    acknowledgement timeout, the copies piling up on the same connection. Resumed, the server reads them all at
    once, and its duplicate window keeps one of each; one `tip_scores` row each."""
    running = await start_service(checkpoint_every_s=0.1)
    service = running.service
    publisher = service.publisher
    publisher.ack_timeout_s = 0.3
    await eventually(lambda: service.decision_tail.following)
    try:
        served = await served_to_a_hung_server(running, nats_server, 5)
        await eventually(lambda: publisher.retried >= 15, timeout=10)  # each sent again at least 3 times
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    await eventually(lambda: publisher.published == 5 and publisher.waiting == 0, timeout=10)
    assert sorted(await stored_decision_ids(nc.jetstream())) == sorted(served)
    url = service.settings.sqlalchemy_url
    await eventually(lambda: sorted(tip_scores(url)) == sorted(served), timeout=10)
    await running.stop()


async def test_a_stop_while_the_server_hangs_spools_what_it_then_stores_and_the_next_start_adds_no_copy(
        start_service, nats_server, nc, tmp_path, monkeypatch) -> None:
    """Stopped while the server hung, the service spools the decisions in flight; the server, resumed, stores them
    from its socket (they were written), and the next start publishes the spool again: JetStream's duplicate window
    drops each copy, the spool goes, and each decision is in DECISIONS once, with one `tip_scores` row."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.2)  # the server answers nothing: a stop waits out any bound
    running = await start_service()
    await eventually(lambda: running.service.decision_tail.following)
    try:
        served = await served_to_a_hung_server(running, nats_server, 3)
        await eventually(lambda: len(running.service.publisher.inflight) == 3)
        await running.stop()
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    spool = tmp_path / "data" / decision_spool.SPOOL_NAME
    assert [d for _, d, _ in decision_spool.read(spool)] == served
    js = nc.jetstream()
    await eventually(lambda: js.stream_info("DECISIONS"), timeout=10)  # the resumed server answers
    again = await start_service(checkpoint_every_s=0.1)
    service = again.service
    await eventually(lambda: service.publisher.published == 3 and not spool.exists(), timeout=10)
    assert sorted(await stored_decision_ids(js)) == sorted(served), "stored once each"
    url = service.settings.sqlalchemy_url
    await eventually(lambda: sorted(tip_scores(url)) == sorted(served), timeout=10)
    await again.stop()


async def test_nats_back_while_a_stop_waits_for_the_queue_publishes_it_and_spools_nothing(
        start_service, nats_server, nc, tmp_path) -> None:
    """NATS back within the stop's wait for the queue (STOP_FLUSH_S, 5 s): the decisions served in the outage are
    published then, once each, and no spool is left for the next start to send again."""
    running = await start_service(checkpoint_every_s=0.1)
    service = running.service
    await eventually(lambda: service.decision_tail.following)
    nats_server.stop()
    await eventually(lambda: not service.nc.is_connected)
    async with running.http() as http:
        served = [(await http.post("/score", json=BODY)).json()["decision_id"] for _ in range(3)]
    stopping = asyncio.create_task(running.stop())
    await eventually(lambda: service._stopping)
    nats_server.start()
    await stopping
    assert service.publisher.published == 3
    assert not (tmp_path / "data" / decision_spool.SPOOL_NAME).exists()
    assert sorted(await stored_decision_ids(nc.jetstream())) == sorted(served)
    assert sorted(tip_scores(service.settings.sqlalchemy_url)) == sorted(served), "written by the last checkpoint"


async def test_a_late_acknowledgement_of_a_decision_sent_again_takes_it_out_of_what_a_stop_spools(nats_server) -> None:
    """A hung server's acknowledgements come once it resumes, for decisions the publisher had given up waiting for
    (sent again after `ack_timeout_s`, back in the queue). They were dropped as answers to no send: a stop then
    (its drain reads the acknowledgements that come) spooled those decisions, stored as they were, and the next
    start sent them again, stored twice when it came after the duplicate window (a stop of a hung server's
    service: 291 of 320 spooled decisions had been stored). Such an acknowledgement publishes its decision."""
    from app.decision_publisher import DecisionPublisher
    from streams import jetstream as jsx
    from streams import pull

    nc = await pull.connect(nats_server.url)
    try:
        await jsx.ensure_streams(nc.jetstream(), max_age_days=1, max_bytes=-1, duplicate_window_s=120,
                                 dlq_max_age_days=1)
        stored: list[int] = []
        publisher = DecisionPublisher(lambda: nc, queue_max=10, batch=4, window=10, ack_timeout_s=0.3,
                                      on_stored=stored.append)
        await publisher.start()
        task = asyncio.create_task(publisher.run())
        nats_server.process.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(nats_server.process.pid)
            for i in range(3):
                assert publisher.offer("decisions.score", f"d-{i}", b'{"id": "d-%d"}' % i)
            await eventually(lambda: len(publisher.inflight) == 3)
            task.cancel()  # as a stop ends the publisher's task
            # What the task did before the stop: each given up on, back in the queue, not sent again yet.
            assert publisher._expire(time.monotonic() + 1)
            assert [d for _, d, _ in publisher.unpublished()] == ["d-0", "d-1", "d-2"]
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        await eventually(lambda: publisher.unpublished() == [], timeout=10)  # what the stop spools after its drain
        assert publisher.published == 3 and publisher.waiting == 0 and publisher.bytes == 0
        assert sorted(stored) == [1, 2, 3]
    finally:
        await nc.close()



async def test_a_decision_no_stream_takes_since_decisions_subjects_were_edited_names_that_fix(
        start_service, nc, monkeypatch, caplog) -> None:
    """DECISIONS edited to take other subjects (`nats stream edit`): every decision is answered '503 no responders',
    for good, as nothing of tipstream's puts the subjects back while it runs. The warning named a cluster electing
    a leader or a stream deleted (which ingest makes again), not the edit that did it and its fix."""
    told = await first_refusal_after_an_edit(start_service, nc, monkeypatch, caplog,
                                             subjects=["decisions-elsewhere.>"])
    assert "503 no responders" in told and "--subjects 'decisions.>'" in told, told

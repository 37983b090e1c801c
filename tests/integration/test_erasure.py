"""Forgetting a user (`POST /admin/users/{id}/forget`): their state, rows, the learner's hold of them
and their messages in every stream go; every other user's stay as they were. Real nats-server, real
HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from app.erasure import Eraser
from models.reward import TipModel
from streams.jetstream import publish_events
from streams.scrub import ScrubError
from tests.conftest import eventually, wait_stopped

TOKEN = "erasure-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = "2026-11-26T09:00:00+01:00"
USERS = ("u-1", "u-10", "u-2")  # u-1 is forgotten; u-10 has its id as a prefix
CANDIDATES = [{"tip_id": "tip-focus-1", "category": "focus"}, {"tip_id": "tip-breaks-1", "category": "breaks"}]


def signals(user: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f"signals.{kind}", {"id": f"{user}-e{i}", "type": kind, "user_id": user, "ts": f"2026-11-26T0{8 - i}:00:00+01:00",
             "data": data}) for i, (kind, data) in enumerate([
                 ("task.created", {"task_id": "t-1"}), ("task.completed", {"task_id": "t-1"}), ("app.opened", {})])]


def reaction(user: str, decision_id: str) -> tuple[str, dict[str, Any]]:
    return "feedback.tip.reacted", {"id": f"{user}-r", "type": "tip.reacted", "user_id": user, "ts": NOW,
                                    "data": {"tip_id": "tip-focus-1", "decision_id": decision_id, "reaction": "acted"}}


async def stored(js: Any, stream: str) -> dict[int, bytes]:
    """Every message the stream holds, by sequence."""
    info = await js.stream_info(stream)
    held = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            held[seq] = (await js.get_msg(stream, seq)).data
        except NotFoundError:
            continue
    return held


def owner(data: bytes) -> str | None:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return body.get("user_id") if isinstance(body, dict) else None


def rows(url: str, table: str) -> dict[str, int]:
    """Rows of `table` per user."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(sa.text(f"select user_id, count(*) from {table} group by user_id")).all())
    finally:
        engine.dispose()


async def forget(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    answer = await http.post(f"/admin/users/{user}/forget", json={"actor": "dpo@example"}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    return answer.json()


async def status(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    return (await http.get(f"/admin/users/{user}/forget", headers=AUTH)).json()


async def scored(http: httpx.AsyncClient, users: tuple[str, ...]) -> None:
    for user in users:
        answer = await http.post("/score", json={"user_id": user, "explore": False, "context": {"now": NOW},
                                                 "candidates": CANDIDATES})
        assert answer.status_code == 200, answer.text


async def reached(http: httpx.AsyncClient, user: str, statuses: tuple[str, ...], timeout: float) -> None:
    async def there() -> bool:
        return (await status(http, user))["status"] in statuses

    await eventually(there, timeout=timeout)


async def traffic(running: Any, js: Any, http: httpx.AsyncClient) -> None:
    """Each user's signals, a /score and a reaction to it; a bad event of u-1's in the DLQ."""
    service = running.service
    await publish_events(js, [event for user in USERS for event in signals(user)])
    await js.publish("signals.task.created", orjson.dumps({"id": "u-1-bad", "type": "task.created", "user_id": "u-1",
                                                            "ts": NOW, "data": {}}))
    credited = service.learner.credited
    for user in USERS:
        answer = (await http.post("/score", json={"user_id": user, "explore": False, "context": {"now": NOW},
                                                  "candidates": CANDIDATES})).json()
        await publish_events(js, [reaction(user, answer["decision_id"])])
    await eventually(lambda: service.learner.credited == credited + len(USERS), timeout=15)


async def started_knowing_two(start_service: Any, nc: Any, settings: dict[str, Any]) -> Any:
    """The service (`settings` its own), u-1 and u-2 known."""
    running = await start_service(**{"admin_token": TOKEN, "checkpoint_every_s": 0.2, **settings})
    await publish_events(nc.jetstream(), signals("u-1") + signals("u-2"))
    await eventually(lambda: {"u-1", "u-2"} <= set(running.service.store.users))
    return running


async def started_with_nats_away(start_service: Any, nc: Any, settings: dict[str, Any]) -> tuple[Any, Any]:
    """The service, u-1 and u-2 known, its decisions' publisher cut off as while NATS is away (the queue holds
    what /score served); and the connection, to give back."""
    running = await started_knowing_two(start_service, nc, settings)
    service = running.service
    connection, service.publisher._nc = service.publisher._nc, lambda: None
    return running, connection


async def test_a_forgotten_user_is_gone_from_state_rows_models_and_streams(start_service, nc, database_url) -> None:
    url = database_url
    settings = {"database_url": url, "admin_token": TOKEN, "checkpoint_every_s": 0.2,
                "offline_features_every_s": 0.2}
    running = await start_service(**settings)
    service, js = running.service, nc.jetstream()
    async with running.http() as http:
        await traffic(running, js, http)
        await eventually(lambda: set(rows(url, "user_features")) == set(USERS)
                         and set(rows(url, "tip_scores")) == set(USERS), timeout=15)
        # A version that no longer learns, trained over the log: its saved bytes hold u-1 too.
        assert (await http.post("/admin/models", json={"version": "v3"}, headers=AUTH)).status_code == 200
        assert (await http.post("/admin/models/v3/retire", json={}, headers=AUTH)).status_code == 200
        others = {user: service.store.users[user].to_bytes() for user in USERS[1:]}
        x = {"user_id": "u-10", "category": "focus", "tip_id": "tip-focus-1"}
        u10_score = service.lineup.champion.predict_one(x)
        before = {stream: await stored(js, stream) for stream in ("SIGNALS", "FEEDBACK", "DECISIONS", "DLQ")}
        assert all(any(owner(data) == "u-1" for data in held.values()) for held in before.values())

        assert (await http.post("/admin/users/u-1/forget", json={})).status_code == 401
        requested = await forget(http, "u-1")
        assert requested["status"] == "requested" and requested["requested_by"] == "dpo@example"

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
        report = (await status(http, "u-1"))["report"]
        assert report["state"] is True and report["messages_signals"] == 4 and report["messages_dlq"] == 1
        assert report["messages_feedback"] == 1 and report["messages_decisions"] == 1 and report["retired_models"] == 1

        assert "u-1" not in service.store.users
        assert (await http.get("/users/u-1/features")).json()["known"] is False
        for user, blob in others.items():
            assert service.store.users[user].to_bytes() == blob
        for table in ("user_state", "user_features", "tip_scores"):
            assert set(rows(url, table)) == {"u-10", "u-2"}, table
        assert service.lineup.champion.forget_user("u-1") == 0, "nothing of theirs left to forget"
        assert service.lineup.champion.predict_one(x) == u10_score
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            retired = conn.execute(sa.text("select model from model_versions where version = 'v3'")).scalar()
        engine.dispose()
        assert TipModel.from_bytes(bytes(retired)).forget_user("u-1") == 0
        for stream, held in before.items():
            after = await stored(js, stream)
            assert {seq: data for seq, data in held.items() if owner(data) != "u-1"} == after, stream

    await running.stop()
    # A restart brings nothing of theirs back: the checkpoint and the learner's snapshot hold none.
    again = await start_service(**settings)
    await eventually(lambda: again.service.warm, timeout=15)
    assert "u-1" not in again.service.store.users and set(again.service.store.users) == {"u-10", "u-2"}
    assert again.service.lineup.champion.forget_user("u-1") == 0
    # Their next event is a new user's first.
    await publish_events(js, [("signals.app.opened", {"id": "u-1-back", "type": "app.opened", "user_id": "u-1", "ts": NOW,
                                                      "data": {}})])
    await eventually(lambda: "u-1" in again.service.store.users)
    assert again.service.store.users["u-1"].events_kept == 1


async def test_a_request_outlives_a_crash_at_each_step(start_service, nc, tmp_path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 'erasure.db'}"
    settings = {"database_url": url, "admin_token": TOKEN, "checkpoint_every_s": 0.2}
    running = await start_service(**settings)
    js = nc.jetstream()
    async with running.http() as http:
        await traffic(running, js, http)
    await running.stop()

    # Saved while the service was down: taken up at the start.
    Eraser(sa.create_engine(url), None, None, checkpoint=None, lock=None).request("u-1", "dpo")  # type: ignore[arg-type]
    # And the service stops after step 3, before any message is deleted.
    from app import erasure

    stopped = []

    async def stop_before_deleting(self: Eraser, rows: list[dict[str, Any]]) -> None:
        stopped.extend(row["user_id"] for row in rows)

    monkeypatch.setattr(erasure.Eraser, "_delete_messages", stop_before_deleting)
    second = await start_service(**settings)
    await eventually(lambda: "u-1" in stopped, timeout=15)
    assert "u-1" not in second.service.store.users
    assert set(rows(url, "user_state")) == {"u-10", "u-2"}
    await second.stop()
    assert any(owner(data) == "u-1" for data in (await stored(js, "SIGNALS")).values())

    monkeypatch.undo()
    third = await start_service(**settings)
    # Their decision, read back from DECISIONS at the start, is not held again while it waits to be deleted.
    assert not any(owner(entry.data) == "u-1" for entry in [*third.service.learner.joins.cache.values(),
                                                             *third.service.learner.joins.replayed.values()])
    async with third.http() as http:
        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
    for stream in ("SIGNALS", "FEEDBACK", "DECISIONS", "DLQ"):
        assert not any(owner(data) == "u-1" for data in (await stored(js, stream)).values()), stream
    assert "u-1" not in third.service.learner.erasing
    assert "u-1" not in third.service.store.users


async def test_a_user_asked_for_again_while_being_forgotten_keeps_the_whole_record(start_service, nc, database_url,
                                                                                      monkeypatch) -> None:
    """Asked for again on its way (state dropped, messages not yet deleted), a request starts over, as
    events of theirs may have come since. The new pass found their state gone and their messages deleted
    by the pass before it, and the request's record said `"state": false` and no message, of a user whose
    state and messages this request did delete."""
    go_on = asyncio.Event()
    deleting = Eraser._delete_messages

    async def held(self: Eraser, rows: list[dict[str, Any]]) -> None:
        await go_on.wait()
        await deleting(self, rows)

    monkeypatch.setattr(Eraser, "_delete_messages", held)
    running = await start_service(database_url=database_url, admin_token=TOKEN, checkpoint_every_s=0.2)
    async with running.http() as http:
        await traffic(running, nc.jetstream(), http)
        await forget(http, "u-1")

        async def dropped() -> bool:
            return (await status(http, "u-1"))["status"] == "dropped"

        await eventually(dropped, timeout=15)
        again = await forget(http, "u-1")
        assert again["status"] == "requested" and again["report"]["state"] is True and again["earlier"] == [], again
        go_on.set()

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
        report = (await status(http, "u-1"))["report"]
    assert report["state"] is True and report["messages_signals"] == 4 and report["messages_dlq"] == 1, report
    assert report["messages_feedback"] == 1 and report["messages_decisions"] == 1, report
    assert "u-1" not in running.service.store.users


async def test_a_user_asked_for_again_before_step_3_was_saved_keeps_the_first_pass_s_record(start_service, nc,
                                                                                             database_url) -> None:
    """Asked for again between steps 2 and 3 (their state dropped, its checkpoint not committed yet), the request
    moved on: step 3 found no request as it was to mark dropped, and what step 2 had done was left out of the
    record. The pass starting over found their state gone and held nothing of theirs: `"state": false`."""
    running = await start_service(database_url=database_url, admin_token=TOKEN, checkpoint_every_s=3600)
    eraser, go_on = running.service.eraser, asyncio.Event()
    checkpoint = eraser.checkpoint

    async def held() -> None:
        await go_on.wait()
        await checkpoint()

    eraser.checkpoint = held
    async with running.http() as http:
        await traffic(running, nc.jetstream(), http)
        await forget(http, "u-1")
        await eventually(lambda: any(entry["user_id"] == "u-1" for entry in eraser._dropped), timeout=15)
        first = next(entry["report"] for entry in eraser._dropped if entry["user_id"] == "u-1")
        assert first["state"] is True and first["decisions_held"] > 0, first
        await forget(http, "u-1")
        go_on.set()
        await reached(http, "u-1", ("done",), timeout=30)
        report = (await status(http, "u-1"))["report"]
    assert report["state"] is True and report["decisions_held"] == first["decisions_held"], report
    assert report["messages_signals"] == 4 and report["messages_decisions"] == 1, report
    assert "u-1" not in running.service.store.users


async def test_a_request_whose_bounds_could_not_be_read_after_step_2_is_taken_again_when_nats_answers(
        start_service, nc, database_url) -> None:
    """The streams' ends are read before step 2 (NATS away: nothing dropped) and again after it, as what JetStream
    stored meanwhile was theirs too. That second look failing (NATS gone in between) kept the first one's: a
    copy of their event dead-lettered in between, past it, stayed in the DLQ for good."""
    running = await start_service(database_url=database_url, admin_token=TOKEN, checkpoint_every_s=0.2)
    eraser, js = running.service.eraser, nc.jetstream()
    ends, looks = eraser._ends, []

    async def nats_gone_after_the_first_look(*streams: Any) -> dict[str, int]:
        if streams:  # SIGNALS' and FEEDBACK's, before step 2
            return await ends(*streams)
        looks.append(len(looks))
        if len(looks) == 2:
            raise NatsTimeoutError
        read = await ends()
        if len(looks) == 1:
            await js.publish("dlq.signals.app.opened", orjson.dumps({"id": "u-1-late", "type": "app.opened",
                                                                     "user_id": "u-1", "ts": NOW}))
        return read

    eraser._ends = nats_gone_after_the_first_look
    async with running.http() as http:
        await traffic(running, js, http)
        await forget(http, "u-1")
        await reached(http, "u-1", ("done",), timeout=30)
        report = (await status(http, "u-1"))["report"]
    assert not any(owner(data) == "u-1" for data in (await stored(js, "DLQ")).values())
    assert report["state"] is True and report["messages_dlq"] == 2, report


async def test_a_nats_server_that_hangs_while_a_stream_s_end_is_read_is_named(start_service, nats_server) -> None:
    """A forget during a stall of the server (SIGSTOP'd, in a soak) logged "did not go through (TimeoutError: nats:
    timeout)": neither what went unanswered nor why."""
    running = await start_service(nats_jetstream_timeout_s=0.5)
    eraser = running.service.eraser
    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        wait_stopped(nats_server.process.pid)
        with pytest.raises(ScrubError, match="no answer from JetStream about stream DECISIONS: the NATS server hangs"):
            await eraser._ends()
    finally:
        nats_server.process.send_signal(signal.SIGCONT)

    async def answered() -> bool:  # the server, resumed, may take longer than the 0.5 s to answer the first
        with contextlib.suppress(ScrubError):
            return set(await eraser._ends()) == {"DECISIONS", "DLQ"}
        return False

    await eventually(answered)


async def test_the_cli_forgets_a_user_through_the_service(start_service, nc, tmp_path, monkeypatch, capsys) -> None:
    from app.cli import main

    running = await start_service(admin_token=TOKEN, checkpoint_every_s=0.2)
    await publish_events(nc.jetstream(), signals("org/42"))  # a '/' in the id: quoted whole in the path
    await eventually(lambda: "org/42" in running.service.store.users)
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)
    url = ["--url", running.base_url]
    assert await asyncio.to_thread(main, ["users", "forget", "org/42", "--wait", "--actor", "dpo", *url]) == 0
    out = capsys.readouterr().out
    assert "org/42: requested (asked " in out and "org/42: done" in out and "messages_signals 3" in out
    assert "org/42" not in running.service.store.users
    assert await asyncio.to_thread(main, ["users", "forget-status", "org/42", *url]) == 0
    assert "org/42: done" in capsys.readouterr().out
    # Back with an event since, and forgotten again: the first request's record is kept beside the new one.
    first = running.service.eraser.status("org/42")
    await publish_events(nc.jetstream(), [("signals.app.opened", {"id": "org/42-back", "type": "app.opened",
                                                                  "user_id": "org/42", "ts": NOW})])
    await eventually(lambda: "org/42" in running.service.store.users)
    assert await asyncio.to_thread(main, ["users", "forget", "org/42", "--wait", *url]) == 0
    out = capsys.readouterr().out
    assert "messages_signals 1" in out and f"forgotten before: done {first['done_at']}" in out
    again = running.service.eraser.status("org/42")
    assert [earlier["report"] for earlier in again["earlier"]] == [first["report"]]
    assert again["earlier"][0]["requested_by"] == "dpo" and again["requested_at"] > first["requested_at"]
    assert "nothing was held of this id" not in out
    # A mistyped id is done too, with nothing to do: the operator is told, not left to read a row of zeros.
    assert await asyncio.to_thread(main, ["users", "forget", "org/24", "--wait", *url]) == 0
    out = capsys.readouterr().out
    assert "org/24: done" in out and "state False" in out and "nothing was held of this id" in out, out
    # Without --wait, the answer is "requested" (the work goes on in the service): it said nothing of how to
    # learn when it is done.
    assert await asyncio.to_thread(main, ["users", "forget", "org/25", *url]) == 0
    out = capsys.readouterr().out
    assert "org/25: requested" in out and "`tipstream users forget-status org/25` says when it is done" in out, out
    assert await asyncio.to_thread(main, ["users", "forget-status", "nobody", *url]) == 1
    assert "refused (404): no request to forget user 'nobody'" in (err := capsys.readouterr().err)
    assert "(`tipstream users forget nobody`)" in err  # the command that makes one, not only the HTTP way
    # The service's refusal, written as sent, acted on the terminal: its shell-quoted id kept the ESC raw.
    assert await asyncio.to_thread(main, ["users", "forget-status", "no\x1b[2Jbody", *url]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "tipstream users forget 'no\\x1b[2Jbody'" in err, err
    monkeypatch.delenv("TIPSTREAM_ADMIN_TOKEN")
    assert await asyncio.to_thread(main, ["users", "forget", "u-2", *url]) == 2
    assert "Set TIPSTREAM_ADMIN_TOKEN to the server's admin token to forget a user." in capsys.readouterr().err


async def test_a_user_whose_id_holds_a_replacement_character_is_forgotten(start_service, nc) -> None:
    """U+FFFD is a character an event's user_id may hold. The path's "%FF" (not UTF-8) is decoded as
    one too, and forget refused every id holding one as not UTF-8: such a user could never be forgotten."""
    running = await start_service(admin_token=TOKEN, checkpoint_every_s=0.2)
    user = "ana\ufffd"
    await publish_events(nc.jetstream(), signals(user))
    await eventually(lambda: user in running.service.store.users)
    async with running.http() as http:
        assert (await forget(http, "ana%EF%BF%BD"))["user_id"] == user
        await eventually(lambda: running.service.eraser.status(user)["status"] == "done", timeout=15)
        assert (await status(http, "ana%EF%BF%BD"))["report"]["messages_signals"] == 3
        for undecodable in ("ana%FF", "ana%ED%A0%80"):  # the bytes of no character: no user's id
            refused = await http.post(f"/admin/users/{undecodable}/forget", json={}, headers=AUTH)
            assert refused.status_code == 422 and refused.json()["field"] == "user_id", refused.text
            assert (await http.get(f"/admin/users/{undecodable}/forget", headers=AUTH)).status_code == 422
    assert user not in running.service.store.users


async def test_an_export_holds_a_users_data_until_they_are_forgotten(start_service, nc, nats_server, tmp_path,
                                                                   monkeypatch, capsys) -> None:
    """`tipstream users export` (the right of access) reads what forgetting deletes: their events and
    decisions in the streams, their rows, their own model weights; another user's stay out."""
    from app.cli import main

    url = f"sqlite:///{tmp_path / 'export.db'}"
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2,
                                  offline_features_every_s=0.2)
    async with running.http() as http:
        await traffic(running, nc.jetstream(), http)
        await eventually(lambda: "u-1" in rows(url, "user_features") and "u-1" in rows(url, "tip_scores"), timeout=15)
        await eventually(lambda: running.service.learner.snapshots.models_saved_seq == running.service.learner._learn_seq,
                         timeout=15)
        monkeypatch.setenv("DATABASE_URL", url)
        out = tmp_path / "u-1.json"
        out.write_text("an earlier export\n")
        out.chmod(0o644)  # one that was there before keeps no mode of its own
        args = ["users", "export", "u-1", "--nats-url", nats_server.url, "--out", str(out)]
        assert await asyncio.to_thread(main, args) == 0
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        found = orjson.loads(out.read_bytes())
        streams = found["streams"]
        assert [m["message"]["id"] for m in streams["SIGNALS"]] == ["u-1-e0", "u-1-e1", "u-1-e2", "u-1-bad"]
        assert [m["message"]["id"] for m in streams["FEEDBACK"]] == ["u-1-r"]
        assert [m["message"]["user_id"] for m in streams["DECISIONS"]] == ["u-1"]
        assert [m["message"]["id"] for m in streams["DLQ"]] == ["u-1-bad"]
        assert found["user_features"]["user_id"] == "u-1" and "tasks_created_7d" in found["user_features"]["features"]
        assert sorted(found["user_state"]["events"]) == ["app.opened", "task.completed", "task.created", "tip.reacted"]
        assert [row["decision_id"] for row in found["tip_scores"]] == [streams["DECISIONS"][0]["message"]["id"]]
        assert "user_id_u-1" in found["model_weights"]["v1"] and not any(
            "u-10" in name for weights in found["model_weights"].values() for name in weights)
        assert "u-1: messages SIGNALS 4, FEEDBACK 1, DECISIONS 1, DLQ 1; tip_scores 1" in capsys.readouterr().err
        database = tmp_path / "export.db"

        def on_disk() -> int:  # their decision as its row held it, in the SQLite file or its WAL
            files = (database, database.with_name("export.db-wal"))
            return sum(f.read_bytes().count(b'"user_id":"u-1"') for f in files if f.exists())

        assert on_disk() > 0
        await forget(http, "u-1")

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
        await eventually(lambda: running.service.learner.snapshots.models_saved_seq == running.service.learner._learn_seq,
                         timeout=15)
        assert await asyncio.to_thread(main, args) == 0
        after = orjson.loads(out.read_bytes())
        assert after["streams"] == {"SIGNALS": [], "FEEDBACK": [], "DECISIONS": [], "DLQ": []}
        assert after["user_features"] is None and after["tip_scores"] == [] and after["model_weights"] == {}
        assert after["user_state"] is None
        assert after["erasure"]["status"] == "done" and after["erasures_earlier"] == []
        # Deleted rows stayed in the file's free space and in the WAL's older frames, readable with `strings`.
        assert on_disk() == 0


async def test_a_decision_still_on_its_way_to_jetstream_when_forgotten_is_deleted_too(start_service, nc,
                                                                                       database_url) -> None:
    """/score queues its decision and answers; JetStream may store it after the request was acted on
    (NATS slow or away a moment): it was made with their state before the request, so it goes too,
    and gets no `tip_scores` row when its acknowledgement comes."""
    url = database_url
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2)
    service, js = running.service, nc.jetstream()
    publisher = service.publisher
    await publish_events(js, signals("u-1") + signals("u-2"))
    await eventually(lambda: {"u-1", "u-2"} <= set(service.store.users))
    connection = publisher._nc
    publisher._nc = lambda: None  # as while NATS is away: the queue holds what /score served
    async with running.http() as http:
        for user in ("u-1", "u-2"):
            answer = await http.post("/score", json={"user_id": user, "explore": False, "context": {"now": NOW},
                                                     "candidates": CANDIDATES})
            assert answer.status_code == 200, answer.text
        assert publisher.waiting == 2
        await forget(http, "u-1")

        async def dropped() -> bool:
            return (await status(http, "u-1"))["status"] in ("dropped", "done")

        await eventually(dropped, timeout=15)
        publisher._nc = connection
        await eventually(lambda: publisher.waiting == 0, timeout=15)

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
    held = await stored(js, "DECISIONS")
    assert sorted(owner(data) for data in held.values()) == ["u-2"]
    await eventually(lambda: set(rows(url, "tip_scores")) == {"u-2"}, timeout=15)


async def test_a_version_registered_while_a_user_is_forgotten_keeps_nothing_of_theirs(start_service, nc, database_url,
                                                                                     monkeypatch) -> None:
    """A registration trains over `tip_scores` in a process of its own, for seconds: the rows it read
    may be a user's forgotten meanwhile, whose features the versions learning then dropped. The new
    version joins them after: it must drop them too."""
    from app.lineup import Lineup

    url = database_url
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2)
    service, js = running.service, nc.jetstream()
    trained, go_on = asyncio.Event(), asyncio.Event()
    evaluated = Lineup._evaluated

    async def held(self: Lineup, params: dict[str, Any], version: str | None = None) -> Any:
        result = await evaluated(self, params, version)
        if version is None:  # a registration's, not a card's refresh
            trained.set()
            await go_on.wait()
        return result

    monkeypatch.setattr(Lineup, "_evaluated", held)
    async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as http:
        await traffic(running, js, http)
        await eventually(lambda: set(rows(url, "tip_scores")) == set(USERS), timeout=15)
        registering = asyncio.ensure_future(http.post("/admin/models", json={"version": "v3"}, headers=AUTH))
        await asyncio.wait_for(trained.wait(), 60)
        await forget(http, "u-1")

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
        go_on.set()
        assert (await registering).status_code == 200
    v3 = service.lineup.models["v3"]
    assert "v3" in {version for version, _ in service.lineup.learning}
    assert v3.forget_user("u-10") > 0, "it learned the others"
    assert v3.forget_user("u-1") == 0, "nothing of theirs left to forget"
    await service.checkpointer.checkpoint()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        saved = conn.execute(sa.text("select model from model_versions where version = 'v3'")).scalar()
    engine.dispose()
    assert TipModel.from_bytes(bytes(saved)).forget_user("u-1") == 0


async def test_a_user_features_row_being_written_when_forgotten_is_not_left_behind(start_service, nc, database_url,
                                                                                  monkeypatch) -> None:
    """A `user_features` pass computes its rows, then writes them in a worker thread, a batch per
    transaction: a row of the user's computed before the request must not land after their row was deleted."""
    import threading

    from app.offline import OfflineFeatureWriter

    url = database_url
    entered, release = threading.Event(), threading.Event()
    write = OfflineFeatureWriter._write

    def held(self: OfflineFeatureWriter, batch: list[dict[str, Any]]) -> None:
        if any(row["user_id"] == "u-1" for row in batch):
            entered.set()
            release.wait(30)
        write(self, batch)

    monkeypatch.setattr(OfflineFeatureWriter, "_write", held)
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2,
                                  offline_features_every_s=0.2)
    service, js = running.service, nc.jetstream()
    rows_written, waiting_for_rows = service.offline.written, []

    async def noted_written() -> None:
        waiting_for_rows.append(True)
        await rows_written()

    monkeypatch.setattr(service.offline, "written", noted_written)
    await publish_events(js, signals("u-1") + signals("u-2"))
    assert await asyncio.to_thread(entered.wait, 15)
    async with running.http() as http:
        await forget(http, "u-1")
        await eventually(lambda: "u-1" in service.offline.forgotten, timeout=15)  # step 2 done
        written = service.offline.rows_written
        # Step 3 at once (its own checkpoint, or this one): it must not commit before the row is written,
        # so that it deletes it. Left to, it did, and the row came after. Told by the checkpoint waiting
        # for the rows, not by a pause it may or may not commit within.
        checkpoint = asyncio.ensure_future(service.checkpointer.checkpoint())
        await eventually(lambda: waiting_for_rows or checkpoint.done(), timeout=15)
        assert not checkpoint.done(), "step 3 committed before the rows it deletes were written"
        release.set()
        await checkpoint

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
    await eventually(lambda: service.offline.rows_written > written, timeout=15)
    assert set(rows(url, "user_features")) == {"u-2"}


async def test_a_request_after_a_rebuild_from_a_log_whose_last_messages_were_erased_is_done(start_service, nc,
                                                                                            tmp_path) -> None:
    """A forgotten user's messages were the last SIGNALS held: the stream's last sequence stays theirs, which
    a rebuild from the log (an empty database) never reads. Each request waited for ingest to read that far."""
    settings = {"database_url": f"sqlite:///{tmp_path / 'first.db'}", "admin_token": TOKEN, "checkpoint_every_s": 0.2}
    running = await start_service(**settings)
    js = nc.jetstream()
    await publish_events(js, signals("u-2") + signals("u-1"))
    await eventually(lambda: "u-1" in running.service.store.users)
    async with running.http() as http:
        await forget(http, "u-1")

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
    await running.stop()

    rebuilt = await start_service(**{**settings, "database_url": f"sqlite:///{tmp_path / 'rebuilt.db'}"})
    await eventually(lambda: rebuilt.service.ready, timeout=15)
    assert set(rebuilt.service.store.users) == {"u-2"}
    async with rebuilt.http() as http:
        await forget(http, "u-2")

        async def done_too() -> bool:
            return (await status(http, "u-2"))["status"] == "done"

        await eventually(done_too, timeout=30)


async def spooled_while_forgotten(start_service: Any, nc: Any, settings: dict[str, Any], served: tuple[str, ...]) -> Any:
    """A run that serves `served` with NATS away, forgets u-1, and stops: its decisions spooled. Its JetStream."""
    running = await start_service(**settings)
    service, js = running.service, nc.jetstream()
    await publish_events(js, signals("u-1") + signals("u-2"))
    await eventually(lambda: {"u-1", "u-2"} <= set(service.store.users))
    service.publisher._nc = lambda: None  # as while NATS is away
    async with running.http() as http:
        await scored(http, served)
        await forget(http, "u-1")
        await reached(http, "u-1", ("dropped", "done"), timeout=15)
    await running.stop()
    return js


async def test_a_decision_spooled_at_a_stop_while_its_user_is_forgotten_is_deleted_at_the_next_start(
        start_service, nc, database_url, monkeypatch) -> None:
    """The stop spools what JetStream has not acknowledged; the next start publishes it first. One of a
    user being forgotten, served before the request, is not held again, gets no `tip_scores` row, and goes
    from DECISIONS with the rest of theirs."""
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)
    url = database_url
    settings = {"database_url": url, "admin_token": TOKEN, "checkpoint_every_s": 0.2}
    js = await spooled_while_forgotten(start_service, nc, settings, ("u-1", "u-2"))

    again = await start_service(**settings)
    async with again.http() as http:
        await reached(http, "u-1", ("done",), timeout=30)
    await eventually(lambda: again.service.publisher.waiting == 0, timeout=15)
    assert sorted(owner(data) for data in (await stored(js, "DECISIONS")).values()) == ["u-2"]
    assert not any(owner(entry.data) == "u-1" for entry in [*again.service.learner.joins.cache.values(),
                                                             *again.service.learner.joins.replayed.values()])
    await again.service.checkpointer.checkpoint()
    assert set(rows(url, "tip_scores")) == {"u-2"}


async def test_a_spool_that_cannot_be_written_again_without_a_forgotten_users_decisions_is_published_all_the_same(
        start_service, nc, database_url, monkeypatch, tmp_path, caplog) -> None:
    """The start writes the spool again without the decisions of users forgotten since; on a full disk that
    write gave up the space held for the spool and cut the decisions the start was about to publish to what it
    held: those cut were neither published nor kept, and nothing said so (or the start failed, none held)."""
    import logging
    import os

    import pytest

    from app import bootstrap
    from app.decision_spool import SPOOL_NAME

    if not os.access("/dev/full", os.W_OK):
        pytest.skip("/dev/full is not this user's to write here")
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)
    settings = {"database_url": database_url, "admin_token": TOKEN, "checkpoint_every_s": 0.2}
    js = await spooled_while_forgotten(start_service, nc, settings, ("u-1", "u-2", "u-2"))
    spool = tmp_path / "data" / SPOOL_NAME
    assert spool.exists()
    spool.with_suffix(".tmp").symlink_to("/dev/full")  # the disk full: the kernel's ENOSPC for the rewrite
    caplog.set_level(logging.WARNING, logger="tipstream")
    # Room held for a decision or so, not for both of u-2's.
    again = await start_service(**settings, spool_reserve_mb=1500 / (1 << 20))
    await eventually(lambda: again.service.publisher.published == 2, timeout=15)
    await eventually(lambda: not spool.exists(), timeout=5)
    assert sorted(owner(data) for data in (await stored(js, "DECISIONS")).values()) == ["u-2", "u-2"]
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream" and "forgotten since" in r.getMessage()]
    assert any("could not be taken out of" in m for m in told), told


async def test_tip_scores_rows_go_by_when_their_decision_was_served_not_by_its_context_now(start_service, nc,
                                                                                           database_url) -> None:
    """A `tip_scores` row's `created_at` is its decision's `ts`: the caller's `context.now` when given, which
    may be days ahead (a tip ranked for tomorrow's reminder) or behind. Judged by it, a decision served
    before the request, for a `now` two days ahead, kept its row (their features as served, once rewarded)
    after the request was done; and one served once they came back, for a `now` gone by, lost its row while
    its message stayed in DECISIONS."""
    url = database_url
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2)
    service, js = running.service, nc.jetstream()
    await publish_events(js, signals("u-1") + signals("u-2"))
    await eventually(lambda: {"u-1", "u-2"} <= set(service.store.users))
    ahead = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    scrubbing, go_on = asyncio.Event(), asyncio.Event()
    scrub = service.eraser.scrub

    async def held(*args: Any) -> Any:
        scrubbing.set()
        await go_on.wait()
        return await scrub(*args)

    service.eraser.scrub = held
    async with running.http() as http:
        async def scored(now: str) -> str:
            answer = await http.post("/score", json={"user_id": "u-1", "explore": False, "context": {"now": now},
                                                     "candidates": CANDIDATES})
            assert answer.status_code == 200, answer.text
            return answer.json()["decision_id"]

        before = await scored(ahead)
        await publish_events(js, [reaction("u-1", before)])
        await eventually(lambda: rows(url, "tip_scores").get("u-1") == 1, timeout=15)
        await forget(http, "u-1")
        await asyncio.wait_for(scrubbing.wait(), 15)  # step 3 committed, their messages next
        back = await scored(NOW)  # the user came back: a new decision, for a `now` before the request

        def rows_of_u1() -> set[str]:
            engine = sa.create_engine(url)
            try:
                with engine.connect() as conn:
                    return set(conn.execute(sa.text("select decision_id from tip_scores where user_id = 'u-1'"))
                               .scalars())
            finally:
                engine.dispose()

        await eventually(lambda: back in rows_of_u1(), timeout=15)
        go_on.set()

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
    await service.checkpointer.checkpoint()
    assert rows_of_u1() == {back}


async def test_a_decision_served_while_the_join_cache_is_looked_over_is_forgotten_too(start_service, nc,
                                                                                      database_url) -> None:
    """The join cache is looked over for the user's decisions in turns, /score answering between: a decision
    served then was made with the state about to be dropped, but after the time the request was acted on was
    read. It stayed held, a reaction to it to be learned with their features as served, and kept its
    `tip_scores` row once its message was deleted."""
    url = database_url
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2)
    service, js = running.service, nc.jetstream()
    await publish_events(js, signals("u-1") + signals("u-2"))
    await eventually(lambda: {"u-1", "u-2"} <= set(service.store.users))
    looking, go_on = asyncio.Event(), asyncio.Event()
    joins = service.learner.joins
    decisions_of = joins.decisions_of

    async def held(*args: Any) -> list[str]:
        looking.set()
        await go_on.wait()
        return await decisions_of(*args)

    joins.decisions_of = held
    async with running.http() as http:
        await forget(http, "u-1")
        await asyncio.wait_for(looking.wait(), 15)
        answer = await http.post("/score", json={"user_id": "u-1", "explore": False, "context": {"now": NOW},
                                                 "candidates": CANDIDATES})
        assert answer.status_code == 200, answer.text
        during = answer.json()
        assert during["features"]["tasks_created_7d"] == 1, "served with the state the request drops"
        go_on.set()

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
    await service.checkpointer.checkpoint()
    assert joins.get(during["decision_id"]) is None
    assert set(rows(url, "tip_scores")) == set()
    assert not any(owner(data) == "u-1" for data in (await stored(js, "DECISIONS")).values())


async def test_an_export_holds_the_events_their_state_keeps_once_the_streams_let_them_go(start_service, nc,
                                                                                         tmp_path) -> None:
    """A user's state (`user_state`) keeps their last 31 days of events, as times, hours and reactions, for as
    long as they are not forgotten: kept after the streams let the events go (their retention, or
    TIPSTREAM_STREAM_MAX_BYTES), it was held of them and left out of what the export said was held."""
    from app.db import make_engine
    from app.export import export_user

    url = f"sqlite:///{tmp_path / 'export.db'}"
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2)
    js = nc.jetstream()
    await publish_events(js, signals("u-1") + signals("u-2") + [reaction("u-1", "d-never-served")])
    await eventually(lambda: set(rows(url, "user_state")) == {"u-1", "u-2"}, timeout=15)
    await running.stop()
    for stream in ("SIGNALS", "FEEDBACK"):
        await js.purge_stream(stream)  # as their retention would
    engine = make_engine(url)
    try:
        found = await export_user(js, engine, "u-1")
    finally:
        engine.dispose()
    assert found["streams"]["SIGNALS"] == [] and found["streams"]["FEEDBACK"] == []
    state = found["user_state"]
    assert state["utc_offset"] == "+01:00"
    events = state["events"]
    assert sorted(events) == ["app.opened", "task.completed", "task.created", "tip.reacted"]
    assert [event["at"] for event in events["task.completed"]] == ["2026-11-26T07:00:00.000+01:00"]
    assert events["task.completed"][0]["local_hour"] == 7 and events["tip.reacted"][0]["reaction"] == "acted"
    assert events["task.created"][0]["due"] is None


async def test_a_decision_waiting_for_room_in_the_log_while_its_user_is_forgotten_is_not_served(
        start_service, nc, database_url) -> None:
    """With the decision log's queue full (JetStream slow), /score waits for room with its decision made. A
    forget acted on meanwhile found it neither held nor on its way to JetStream: queued after, it was served,
    held for a reaction with the dropped state's features, and stored in DECISIONS past what the forget
    deleted, its `tip_scores` row written back by the next start's re-read."""
    url = database_url
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2,
                                  decision_enqueue_timeout_s=120)
    service, js = running.service, nc.jetstream()
    await publish_events(js, signals("u-1") + signals("u-2"))
    await eventually(lambda: {"u-1", "u-2"} <= set(service.store.users))
    publisher = service.publisher
    offer, full, waiting = publisher.offer, [True], asyncio.Event()

    def offer_while_not_full(subject: str, decision_id: str, payload: bytes) -> bool:
        if full[0]:
            publisher._room.clear()  # as a full queue leaves it: /score waits for it to be set
            waiting.set()
            return False
        return offer(subject, decision_id, payload)

    publisher.offer = offer_while_not_full
    async with running.http() as http:
        scoring = asyncio.create_task(http.post("/score", json={
            "user_id": "u-1", "explore": False, "context": {"now": NOW}, "candidates": CANDIDATES}))
        await asyncio.wait_for(waiting.wait(), 15)
        await forget(http, "u-1")

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=30)
        full[0] = False
        publisher._room.set()
        answer = await asyncio.wait_for(scoring, 15)
        assert answer.status_code == 503, answer.text
        assert "'u-1' was forgotten" in answer.json()["error"] and answer.headers["retry-after"] == "1"
        again = await http.post("/score", json={"user_id": "u-1", "explore": False, "context": {"now": NOW},
                                                "candidates": CANDIDATES})
        assert again.status_code == 200 and again.json()["features"]["tasks_created_7d"] == 0, again.text
    assert await publisher.flush(15)
    await service.checkpointer.checkpoint()
    decided = [orjson.loads(data) for data in (await stored(js, "DECISIONS")).values()]
    assert [body["id"] for body in decided if body.get("user_id") == "u-1"] == [again.json()["decision_id"]]
    assert rows(url, "tip_scores") == {"u-1": 1}


async def test_a_decision_held_aside_for_a_limit_while_its_user_is_forgotten_is_let_go_and_the_forget_is_done(
        start_service, nc, database_url) -> None:
    """A decision JetStream refuses for good (larger than DECISIONS' max_msg_size, an operator's `nats stream
    edit`) is held aside, sent again every 30 s, until the limit is raised. Its user forgotten, the request waited
    for it as for any decision on its way to JetStream: for good, its user's messages never deleted. Held, it was
    never stored: it is let go (not published, nothing to delete), the forget goes on to done, and the others'
    decisions are published as before."""
    running = await started_knowing_two(start_service, nc, {"database_url": database_url})
    service, js = running.service, nc.jetstream()
    publisher = service.publisher
    config = (await js.stream_info("DECISIONS")).config
    await js.update_stream(dataclasses.replace(config, max_msg_size=8_192))
    large = [{"tip_id": f"tip-{i}", "category": "focus", "features": {"text": "x" * 120}} for i in range(100)]
    async with running.http() as http:
        answer = await http.post("/score", json={"user_id": "u-1", "explore": False, "context": {"now": NOW},
                                                 "candidates": large})
        assert answer.status_code == 200, answer.text
        refused = answer.json()["decision_id"]
        await scored(http, ("u-2",))
        await eventually(lambda: [d for _, d, _ in publisher.held] == [refused], timeout=10)
        await forget(http, "u-1")

        async def done() -> bool:
            return (await status(http, "u-1"))["status"] == "done"

        await eventually(done, timeout=20)
        assert publisher.held == [] and publisher.waiting == 0, "let go, not published"
        await scored(http, ("u-2",))
    await eventually(lambda: publisher.published == 2, timeout=10)
    assert sorted(owner(data) for data in (await stored(js, "DECISIONS")).values()) == ["u-2", "u-2"]
    await running.stop()


async def test_a_decision_stored_after_its_user_was_dropped_is_deleted_after_a_stop_during_the_scan(
        start_service, nc, database_url) -> None:
    """A decision on its way to JetStream at step 2 moves DECISIONS' bound past it once stored. A stop during
    the scan that follows (minutes over millions of messages) resumed from the bound saved at step 3, which
    leaves it out: the message stayed in DECISIONS for good, and a rebuild from the log held it again."""
    settings = {"database_url": database_url, "admin_token": TOKEN, "checkpoint_every_s": 0.2}
    running, connection = await started_with_nats_away(start_service, nc, settings)
    service, js, publisher = running.service, nc.jetstream(), running.service.publisher
    scanning = asyncio.Event()

    async def a_long_scan(*args: Any, **kwargs: Any) -> Any:
        scanning.set()
        await asyncio.Event().wait()  # the service stops meanwhile

    service.eraser.scrub = a_long_scan
    async with running.http() as http:
        await scored(http, ("u-1", "u-2"))
        await forget(http, "u-1")
        await reached(http, "u-1", ("dropped",), timeout=15)
        publisher._nc = connection
        await eventually(scanning.is_set, timeout=15)
    assert any(owner(data) == "u-1" for data in (await stored(js, "DECISIONS")).values())
    await running.stop()

    second = await start_service(**settings)
    async with second.http() as http:
        await reached(http, "u-1", ("done",), timeout=30)
    assert sorted(owner(data) for data in (await stored(js, "DECISIONS")).values()) == ["u-2"]


async def test_a_decision_stored_whose_acknowledgement_a_crash_lost_is_deleted_at_the_next_start(
        start_service, nc, database_url, monkeypatch) -> None:
    """A decision on its way to JetStream at step 2, stored, its acknowledgement lost with the process (killed
    before step 4): the ids waited for were held in memory only, and the next start scrubbed DECISIONS through
    the bound saved at step 3, before it. It stayed in DECISIONS for good, and a rebuild held it again."""
    from app import bootstrap

    settings = {"database_url": database_url, "admin_token": TOKEN, "checkpoint_every_s": 0.2}
    stopped = asyncio.Event()
    # The queue emptied by hand below never tells the publisher idle: the stop's flush waited out its 5 s.
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)

    async def killed_before_deleting(self: Eraser, rows: list[dict[str, Any]]) -> None:
        stopped.set()

    monkeypatch.setattr(Eraser, "_delete_messages", killed_before_deleting)
    running, _ = await started_with_nats_away(start_service, nc, settings)
    js, publisher = nc.jetstream(), running.service.publisher
    async with running.http() as http:
        await scored(http, ("u-1", "u-2"))
        await forget(http, "u-1")
        await reached(http, "u-1", ("dropped",), timeout=15)
    await eventually(stopped.is_set, timeout=15)
    # Stored, as the publish reached the server; the process went before its acknowledgement came, and so did
    # its queue (a crash spools nothing).
    for subject, decision_id, payload in publisher.unpublished():
        await js.publish(subject, payload, headers={"Nats-Msg-Id": decision_id})
    publisher.queue.clear()
    await running.stop()
    assert sorted(owner(data) for data in (await stored(js, "DECISIONS")).values()) == ["u-1", "u-2"]

    monkeypatch.undo()
    second = await start_service(**settings)
    async with second.http() as http:
        await reached(http, "u-1", ("done",), timeout=30)
        assert (await status(http, "u-1"))["report"]["messages_decisions"] == 1
    assert sorted(owner(data) for data in (await stored(js, "DECISIONS")).values()) == ["u-2"]


async def test_a_decision_served_after_the_request_was_acted_on_stays_in_decisions_with_its_row(start_service, nc,
                                                                                   database_url) -> None:
    """Their decisions on their way to JetStream at step 2 go from DECISIONS once stored; one served after step
    2 (the user came back) stays, as its `tip_scores` row does: the bound moved past all of theirs took it from
    the log, its row left naming a decision no restart or rebuild read back."""
    url = database_url
    running, connection = await started_with_nats_away(start_service, nc, {"database_url": url})
    service, js, publisher = running.service, nc.jetstream(), running.service.publisher
    async with running.http() as http:
        await scored(http, ("u-1", "u-2"))
        await forget(http, "u-1")
        await reached(http, "u-1", ("dropped",), timeout=15)
        after = (await http.post("/score", json={"user_id": "u-1", "explore": False, "context": {"now": NOW},
                                                 "candidates": CANDIDATES})).json()["decision_id"]
        publisher._nc = connection
        await reached(http, "u-1", ("done",), timeout=30)
        # The ids it deleted past the bound stay the service's: the status says a sequence a stream, as documented.
        told = (await status(http, "u-1"))["bounds"]
        assert set(told) == {"SIGNALS", "FEEDBACK", "DECISIONS", "DLQ"} and all(type(v) is int for v in told.values())
    await service.checkpointer.checkpoint()
    held = await stored(js, "DECISIONS")
    assert sorted((owner(data), orjson.loads(data)["id"] == after) for data in held.values()) == [
        ("u-1", True), ("u-2", False)]
    assert rows(url, "tip_scores") == {"u-1": 1, "u-2": 1}


async def test_where_a_request_stands_while_the_database_is_away_is_a_503(start_service, nc, monkeypatch) -> None:
    """`GET /admin/users/{id}/forget` reads the database; away, it was a bare 500 ("Internal Server
    Error", a traceback in the log), where a change in the same state is a 503 with Retry-After."""
    import sqlalchemy.exc

    running = await start_service(admin_token=TOKEN)

    def database_away(*args: Any, **kwargs: Any) -> None:
        raise sqlalchemy.exc.OperationalError("SELECT erasures", {}, ConnectionRefusedError("refused"))

    monkeypatch.setattr(running.service.eraser, "status", database_away)
    async with running.http() as http:
        answer = await http.get("/admin/users/u-1/forget", headers=AUTH)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.text
    assert "the database is away" in answer.json()["error"]


async def test_a_damaged_saved_model_of_a_retired_version_keeps_the_forget_dropped_naming_the_version_and_the_fix(
        start_service, nc, database_url, caplog, monkeypatch, capsys) -> None:
    """The last step rewrites the saved model of each version that no longer learns (retired) without the user's own
    weights. One that cannot be decoded (cut short) failed it with an UnpicklingError, logged as an outage ("did not
    go through ...; trying again in 1 s") naming neither the version nor a fix, and retried for good, each time after
    a scan of every stream. Now the log says which version's model and how to mend it, once; the request stays
    'dropped' (not done: the user's weights are still in that model), and is not taken again until the next start,
    which the fixes (a restore, a rebuild) need. `forget-status` says so (`stuck`), and `forget --wait`, which
    waited for good, ends with it."""
    import logging

    from app.cli import main

    caplog.set_level(logging.INFO, logger="tipstream")
    url = database_url
    running = await start_service(database_url=url, admin_token=TOKEN, checkpoint_every_s=0.2)
    service, js = running.service, nc.jetstream()
    async with running.http() as http:
        await traffic(running, js, http)
        assert (await http.post("/admin/models", json={"version": "v3"}, headers=AUTH)).status_code == 200
        assert (await http.post("/admin/models/v3/retire", json={}, headers=AUTH)).status_code == 200
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                blob = bytes(conn.execute(sa.text("select model from model_versions where version = 'v3'")).scalar())
                conn.execute(sa.text("update model_versions set model = :m where version = 'v3'"), {"m": blob[:-40]})
        finally:
            engine.dispose()
        scans = []
        scrub = service.eraser.scrub

        async def counted(*args: Any) -> Any:
            scans.append(args[1])
            return await scrub(*args)

        service.eraser.scrub = counted
        await forget(http, "u-1")

        def told() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "tipstream.erasure" and r.levelname == "ERROR"]

        await eventually(told, timeout=30)
        [said] = told()
        assert said.startswith("forgetting 'u-1' cannot be finished: The saved model of version 'v3' cannot be read "
                               "(UnpicklingError: "), said
        assert "(docs/operations.md, 'Backups and restores')" in said and "'Rebuilding from the log'" in said, said
        assert "\n" not in said and "trying again" not in said, said
        answer = await status(http, "u-1")
        assert answer["status"] == "dropped" and answer["done_at"] is None, answer
        assert answer["stuck"] == f"{said.split(' cannot be finished: ', 1)[1].split(', then start', 1)[0]}, then " \
                                  "start tipstream again", answer
        assert "u-1" not in service.store.users, "what steps 2 and 3 did stays done"
        # Woken again (a checkpoint, another request), it does not scan every stream again for the same failure.
        taken = len(scans)
        service.eraser.wake()
        await service.eraser.work()
        assert len(scans) == taken and len(told()) == 1
        assert (await status(http, "u-1"))["status"] == "dropped"
        # Asked for meanwhile, another user's request is dropped, and waits for the same start.
        monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)
        monkeypatch.setattr("app.users_cli.WAIT_EVERY_S", 0.05)
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["users", "forget", "u-2", "--wait", "--url", running.base_url]) == 1
        err = capsys.readouterr().err
        assert "u-2: dropped (asked " in err and "\n  stuck: The saved model of version 'v3' cannot be read (" in err, err
        assert "u-2" not in service.store.users and len(told()) == 1 and len(scans) == taken
    assert not any("did not go through" in r.getMessage() for r in caplog.records if r.name == "tipstream.erasure")


def saved_request(url: str, status: str, bounds: str, report: str) -> None:
    """u-1's `erasures` row, asked for (and its state dropped; done too if `status` says so) a minute ago, its `bounds`
    and `report` this text, as a hand's UPDATE or a disk fault leaves them."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            at = datetime.now(UTC) - timedelta(minutes=1)
            conn.execute(sa.text("insert into erasures (user_id, status, requested_at, requested_by, dropped_at, "
                                 "bounds, report, done_at) values ('u-1', :status, :at, 'dpo', :at, :bounds, :report, "
                                 ":done)"), {"status": status, "at": at, "bounds": bounds, "report": report,
                                             "done": at if status == "done" else None})
    finally:
        engine.dispose()


async def test_a_damaged_request_is_set_aside_named_and_mended_by_asking_again(start_service, nc, database_url, caplog,
                                                                               monkeypatch, capsys) -> None:
    """A request's `bounds` (what step 4 deletes by) damaged: cut short on SQLite; on PostgreSQL, which keeps only
    JSON in the column, overwritten with another value. Read with every other request, it failed them all, retried
    for good as if the database were away ("did not go through ... trying again"), naming no user. Now the others go
    on; the log says once whose request and which column, with the fixes (not a rebuild: it could bring back their
    events); `forget-status` says so (`stuck`); and asking for it again replaces the row and forgets the user."""
    import logging

    from app.cli import main

    caplog.set_level(logging.INFO, logger="tipstream")
    running = await started_knowing_two(start_service, nc, {"database_url": database_url})
    service = running.service
    damaged = '"overwritten"' if database_url.startswith("postgresql") else '{"SIGNALS": 3, "FEED'
    saved_request(database_url, "dropped", damaged, '{"state": true}')

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "tipstream.erasure" and r.levelname == "ERROR"]

    async with running.http() as http:
        await forget(http, "u-2")
        await reached(http, "u-2", ("done",), timeout=30)
        [said] = told()
        assert said.startswith("The request to forget user 'u-1' cannot be read: its bounds (erasures.bounds; "), said
        assert "Request the forget again (`tipstream users forget u-1`)" in said and \
            "restore that row from a backup (docs/operations.md, 'Backups and restores')" in said and \
            "not a rebuild from the log" in said and said.endswith("The other requests go on."), said
        answer = await status(http, "u-1")
        assert answer["status"] == "dropped" and answer["bounds"] is None, answer
        assert answer["stuck"] == said.removesuffix(". The other requests go on."), answer
        # Woken again, it is not said again.
        service.eraser.wake()
        await service.eraser.work()
        assert len(told()) == 1
        monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)
        monkeypatch.setattr("app.users_cli.WAIT_EVERY_S", 0.05)
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["users", "forget-status", "u-1", "--url", running.base_url]) == 0
        assert "\n  stuck: The request to forget user 'u-1' cannot be read: its bounds" in capsys.readouterr().out
        # An export shows the row, saying what is damaged, where it failed with a traceback.
        from app.export import from_database

        engine = sa.create_engine(database_url)
        try:
            exported = (await asyncio.to_thread(from_database, engine, "u-1"))["erasure"]
        finally:
            engine.dispose()
        assert exported["bounds"] == damaged.strip('"') and exported["damaged"].startswith("its bounds (erasures.bounds; "), \
            exported
        # Asked for again: the row is replaced, and the user taken through every step, their messages deleted.
        assert await asyncio.to_thread(main, ["users", "forget", "u-1", "--wait", "--url", running.base_url]) == 0
        answer = await status(http, "u-1")
        assert answer["status"] == "done" and "stuck" not in answer and answer["report"]["state"] is True, answer
        assert not [seq for seq, data in (await stored(nc.jetstream(), "SIGNALS")).items() if owner(data) == "u-1"]
        assert "u-1" not in service.store.users and len(told()) == 1
    assert not any("did not go through" in r.getMessage() for r in caplog.records if r.name == "tipstream.erasure")



async def test_an_export_shows_a_damaged_row_of_theirs_as_the_text_it_holds(database_url) -> None:
    """`tipstream users export` reads their `tip_scores` and `user_features` rows. On SQLite, one whose JSON was cut
    short (a disk fault, a hand's UPDATE) failed the export in a JSONDecodeError traceback, after every stream had
    been read; the row is theirs all the same, so it is exported as the text it holds. So are their `erasures` and
    `erasures_earlier` rows' damaged columns, with the `damaged` note, where they were exported as null."""
    from app import db, migrate
    from app.decisions import tip_score_row
    from app.export import from_database

    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    decision = {"id": "d-1", "ts": NOW, "user_id": "u-1", "model_version": "v1", "features": {"hour_of_day": 9},
                "ranked": [{"tip_id": "a", "score": 0.5, "propensity": 0.9}]}
    unrewarded = {**decision, "id": "d-2"}
    cut = "'{\"a\": 1'" if engine.dialect.name == "sqlite" else "'\"overwritten\"'"  # PostgreSQL keeps only JSON
    shown = "{\"a\": 1" if engine.dialect.name == "sqlite" else "overwritten"
    try:
        with engine.begin() as conn:
            db.upsert(conn, db.tip_scores, [
                tip_score_row(decision, orjson.dumps(decision), {"a": 1.0}, 1_795_694_400_000),
                tip_score_row(unrewarded, orjson.dumps(unrewarded), None, None)], ["decision_id"])
            conn.execute(sa.insert(db.user_features).values(user_id="u-1", as_of=datetime.now(UTC), features={},
                                                            updated_at=datetime.now(UTC), fallbacks=[]))
            conn.execute(sa.text(f"update tip_scores set rewards = {cut} where decision_id = 'd-1'"))
            conn.execute(sa.text(f"update user_features set features = {cut}"))
            conn.execute(sa.text(f"insert into erasures_earlier (user_id, requested_at, requested_by, dropped_at, "
                                 f"bounds, report, done_at) values ('u-1', :at, 'dpo', :at, {cut}, null, :at)"),
                         {"at": datetime.now(UTC) - timedelta(days=1)})
        saved_request(database_url, "done", '{"SIGNALS": 3}', cut.strip("'"))
        found = await asyncio.to_thread(from_database, engine, "u-1")
    finally:
        engine.dispose()
    # The unrewarded row's rewards (JSON null) stay null, as they were exported before.
    assert {row["decision_id"]: row["rewards"] for row in found["tip_scores"]} == {"d-1": shown, "d-2": None}
    assert found["user_features"]["features"] == shown and found["user_features"]["fallbacks"] == [], found
    assert [row["decision"]["id"] for row in found["tip_scores"] if row["rewards"] is not None] == ["d-1"]
    erasure, [earlier] = found["erasure"], found["erasures_earlier"]
    assert erasure["report"] == shown and erasure["bounds"] == {"SIGNALS": 3}, erasure
    assert erasure["damaged"].startswith("its report (erasures.report; "), erasure
    assert earlier["bounds"] == shown and earlier["report"] is None, earlier
    assert earlier["damaged"].startswith("its bounds (erasures_earlier.bounds; "), earlier


async def test_a_done_request_whose_report_is_damaged_says_so_and_keeps_its_text_when_asked_for_again(
        start_service, nc, database_url, monkeypatch, capsys) -> None:
    """A request done whose `report` the database holds damaged (cut short on SQLite; on PostgreSQL, which keeps only
    JSON in the column, overwritten with another value) was shown with `report` null and no word of why; asked for
    again, the record moved to `erasures_earlier` without it, the text it held dropped without a word. Now the status
    says which column cannot be read (`damaged`), here and in `earlier`, and the row moves with its text as it is."""
    from app.cli import main

    running = await started_knowing_two(start_service, nc, {"database_url": database_url})
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)

    async def told() -> str:
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["users", "forget-status", "u-1", "--url", running.base_url]) == 0
        return capsys.readouterr().out

    damaged = '"overwritten"' if database_url.startswith("postgresql") else '{"state": true, "SIGN'
    saved_request(database_url, "done", '{"SIGNALS": 3}', damaged)
    engine = sa.create_engine(database_url)
    try:
        async with running.http() as http:
            answer = await status(http, "u-1")
            assert answer["status"] == "done" and answer["report"] is None and "stuck" not in answer, answer
            assert answer["damaged"].startswith("its report (erasures.report; "), answer
            assert "shown as null" in answer["damaged"] and "'Backups and restores'" in answer["damaged"], answer
            assert "\n  damaged: its report (erasures.report; " in await told()
            await forget(http, "u-1")
            await reached(http, "u-1", ("done",), timeout=30)
            answer = await status(http, "u-1")
        assert "damaged" not in answer and answer["report"]["state"] is True, answer
        [before] = answer["earlier"]
        assert before["report"] is None and before["bounds"] == {"SIGNALS": 3}, before
        assert before["damaged"].startswith("its report (erasures_earlier.report; "), before
        assert "\n    damaged: its report (erasures_earlier.report; " in await told()
        with engine.connect() as conn:
            kept = conn.execute(sa.text("select cast(report as text) from erasures_earlier where user_id = 'u-1'"))
            assert kept.scalar_one() == damaged, "the damaged text moves as it is"
    finally:
        engine.dispose()

"""GET /users/{id}/features over real HTTP, and the offline `user_features` table."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa

from app import offline
from tests.conftest import eventually


def event(i: int, kind: str, ts: str, **data: Any) -> dict[str, Any]:
    return {"id": f"f-{i}", "type": kind, "user_id": "ana", "ts": ts, "data": data}


EVENTS = [
    event(1, "task.created", "2026-11-20T09:00:00+01:00", task_id="a", due="2026-11-21T09:00:00+01:00"),
    event(2, "task.created", "2026-11-24T09:00:00+01:00", task_id="b"),
    event(3, "task.completed", "2026-11-24T11:00:00+01:00", task_id="b"),
    event(4, "tip.shown", "2026-11-25T20:00:00+01:00", tip_id="tip-focus-1"),
    event(5, "app.opened", "2026-11-25T21:00:00+01:00"),
]
REACTION = {"id": "f-6", "type": "tip.reacted", "user_id": "ana", "ts": "2026-11-25T20:05:00+01:00",
            "data": {"tip_id": "tip-focus-1", "reaction": "acted"}}


async def test_features_with_age_freshness_and_fallbacks(start_service, nc, tmp_path) -> None:
    # A user's offline row follows the checkpoint that saves them (every 5 s by default).
    running = await start_service(offline_features_every_s=0.2, checkpoint_every_s=0.2)
    js = nc.jetstream()
    for item in EVENTS:
        await js.publish(f"signals.{item['type']}", orjson.dumps(item))
    await js.publish("feedback.tip.reacted", orjson.dumps(REACTION))
    await eventually(lambda: running.service.store.applied == 6)

    async with running.http() as http:
        body = (await http.get("/users/ana/features", params={"at": "2026-11-25T21:00:00+01:00"})).json()
        features = body["features"]
        assert body["known"] is True
        assert features["tasks_created_7d"] == {"value": 2, "age_s": 36 * 3600.0, "fresh": True, "fallback": False}
        assert features["completion_rate_7d"]["value"] == (1 + 1) / (2 + 2)
        assert features["preferred_hour"]["value"] == 11 and not features["preferred_hour"]["fallback"]
        assert features["tip_volume_24h"]["value"] == 1
        assert features["tip_positive_rate_30d"]["value"] == (1 + 1) / (1 + 2)
        assert features["seconds_since_active"]["value"] == 0.0
        assert features["open_tasks"]["value"] == 1 and features["overdue_tasks"]["value"] == 1
        assert features["mean_hours_to_complete_28d"]["value"] == 2.0

        later = (await http.get("/users/ana/features", params={"at": "2026-12-30T00:00:00Z"})).json()["features"]
        assert later["tasks_created_7d"]["value"] == 0 and later["tasks_created_7d"]["fresh"] is False
        assert later["preferred_hour"] == {"value": 9, "age_s": later["preferred_hour"]["age_s"], "fresh": False,
                                           "fallback": True}

        stranger = (await http.get("/users/nobody/features")).json()
        assert stranger["known"] is False
        assert all(f["fallback"] and not f["fresh"] for f in stranger["features"].values())

        bad = await http.get("/users/ana/features", params={"at": "yesterday"})
        assert bad.status_code == 422 and bad.json()["field"] == "at"
        naive = await http.get("/users/ana/features", params={"at": "2026-11-25T21:00:00"})
        assert naive.status_code == 422 and "offset" in naive.json()["error"]
        for unix in ("1795694400", "0.5"):  # pydantic read these as Unix time in UTC
            number = await http.get("/users/ana/features", params={"at": unix})
            assert number.status_code == 422 and number.json()["field"] == "at", number.text
        for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-02:00"):  # offsets given: out of range in UTC
            outside = await http.get("/users/ana/features", params={"at": edge})
            assert outside.status_code == 422 and "between 0001-01-01 and 9999-12-31 in UTC" in outside.json()["error"]
        mistyped = await http.get("/users/ana/features", params={"as_of": "2026-11-25T21:00:00+01:00"})
        assert mistyped.status_code == 422 and mistyped.json()["field"] == "as_of", mistyped.text  # was now's answer
        for twice in ("at=yesterday&at=2026-11-25T21:00:00Z", "at=2026-11-25T21:00:00Z&at=2026-11-26T21:00:00Z"):
            repeated = await http.get(f"/users/ana/features?{twice}")  # the last was taken: the first, ignored
            assert repeated.status_code == 422 and repeated.json()["field"] == "at", repeated.text
        unencoded = await http.get("/users/ana/features?at=2026-11-25T21:00:00+01:00")  # '+' unescaped: a space
        assert unencoded.status_code == 422 and "write it %2B" in unencoded.json()["error"]
        for wrong in ("x" * 129, "a%00b"):  # no event could have made such a user
            refused = await http.get(f"/users/{wrong}/features")
            assert refused.status_code == 422 and refused.json()["field"] == "user_id", refused.text
        assert (await http.get(f"/users/{'x' * 128}/features")).json()["known"] is False

    engine = running.service.engine

    def offline_row() -> Any:
        with engine.connect() as conn:
            return conn.execute(sa.text("select features from user_features where user_id = 'ana'")).first()

    row = await eventually(offline_row)
    stored = row[0] if isinstance(row[0], dict) else orjson.loads(row[0])
    assert stored["tasks_created_7d"] == 2 and stored["preferred_hour"] == 11


async def test_a_stop_writes_the_user_features_rows_its_last_checkpoint_saved(start_service, nc, tmp_path) -> None:
    """The offline writer knew the users saved since its last pass in memory only: a stop before the
    next pass left their rows older than their state (in a drill, every demo user's, by minutes), and
    a user who sent nothing more kept that row for good."""
    running = await start_service(offline_features_every_s=3600, checkpoint_every_s=0.1)
    js = nc.jetstream()
    for item in EVENTS:
        await js.publish(f"signals.{item['type']}", orjson.dumps(item))
    await eventually(lambda: running.service.store.applied == 5)
    await running.stop()

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'tipstream.db'}")
    with engine.connect() as conn:
        row = conn.execute(sa.text("select features from user_features where user_id = 'ana'")).first()
    engine.dispose()
    assert row is not None
    stored = row[0] if isinstance(row[0], dict) else orjson.loads(row[0])
    assert stored["tasks_created_7d"] == 2 and stored["app_opens_7d"] == 1


async def test_a_stop_writes_user_features_rows_within_its_bound_and_the_next_start_the_rest(
        start_service, nc, tmp_path, monkeypatch, caplog) -> None:
    """After a rebuild or a catch-up every user is saved since the last pass: the stop waited for a whole
    pass (5.3 s of a 5.7 s stop at 60,000 users), up to 30 s, and then wrote none of it. Now a batch at a
    time within a short bound, the rest written by the next start, which finds them behind their state."""
    monkeypatch.setattr(offline, "LAST_PASS_S", 0.0)  # spent after the first batch
    monkeypatch.setattr(offline, "LAST_PASS_BATCH", 2)
    settings = {"offline_features_every_s": 3600, "checkpoint_every_s": 0.1}
    running = await start_service(**settings)
    js = nc.jetstream()
    users = [f"u{i}" for i in range(5)]
    for i, user in enumerate(users):
        await js.publish("signals.app.opened", orjson.dumps(
            {"id": f"o-{i}", "type": "app.opened", "user_id": user, "ts": "2026-11-25T21:00:00+01:00", "data": {}}))
    await eventually(lambda: running.service.store.applied == 5)
    with caplog.at_level(logging.INFO, logger="tipstream"):
        await running.stop()
    assert "user_features rows of 2 users written" in caplog.text and "the next start writes those of the other 3" \
        in caplog.text

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'tipstream.db'}")

    def rows() -> list[str]:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("select user_id from user_features order by user_id")).scalars())

    try:
        assert len(rows()) == 2 and set(rows()) < set(users)  # any two: a batch is in key order, not the pass
        await start_service(**{**settings, "offline_features_every_s": 0.1})
        await eventually(lambda: rows() == users)
    finally:
        engine.dispose()


async def test_a_stop_during_a_catch_up_leaves_user_features_rows_to_the_next_start(
        start_service, nc, tmp_path, caplog) -> None:
    """Stopped half way through a rebuild, the service spent up to 5 s (30 s before) writing rows of states the
    rest of the catch-up changes again; the next start writes them in any case."""
    running = await start_service(offline_features_every_s=3600, checkpoint_every_s=0.1)
    js = nc.jetstream()
    for item in EVENTS:
        await js.publish(f"signals.{item['type']}", orjson.dumps(item))
    await eventually(lambda: running.service.store.applied == 5)
    [signals] = [ingest for ingest in running.service.ingests if ingest.spec.name == "SIGNALS"]
    signals.caught_up = False  # as when the stop comes before SIGNALS has caught up
    with caplog.at_level(logging.INFO, logger="tipstream"):
        await running.stop()
    assert "stopping during the catch-up of SIGNALS: the user_features rows of 1 users are left" in caplog.text

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'tipstream.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select count(*) from user_features")).scalar() == 0
            assert conn.execute(sa.text("select count(*) from user_state")).scalar() == 1  # the checkpoint is written
    finally:
        engine.dispose()


async def test_openapi_document_describes_every_route(start_service) -> None:
    running = await start_service()
    async with running.http() as http:
        document = (await http.get("/openapi.json")).json()
    paths = document["paths"]
    assert {"/healthz", "/readyz", "/metrics", "/users/{user_id}/features", "/score"} <= set(paths)
    assert paths["/readyz"]["get"]["responses"]["503"]["description"] == "still catching up, or NATS is away"


async def test_a_past_at_flags_windows_reaching_before_what_the_fold_holds(start_service, nc) -> None:
    running = await start_service()
    js = nc.jetstream()
    for d in range(60):  # a tip shown and its reaction a day for 60 days: the fold keeps the last 31
        await js.publish("signals.tip.shown", orjson.dumps({
            "id": f"s-{d}", "type": "tip.shown", "user_id": "bo", "ts": _day(d), "data": {"tip_id": "t"}}))
        await js.publish("feedback.tip.reacted", orjson.dumps({
            "id": f"p-{d}", "type": "tip.reacted", "user_id": "bo", "ts": _day(d), "data": {"tip_id": "t", "reaction": "acted" if d < 45 else "dismissed"}}))
    await eventually(lambda: running.service.store.applied == 120)

    async with running.http() as http:
        async def at(days_back: int) -> dict[str, Any]:
            return (await http.get("/users/bo/features", params={"at": _day(59 - days_back)})).json()["features"]

        newest = await at(0)
        assert newest["tip_positive_rate_30d"] == {"value": (15 + 1) / (30 + 2), "age_s": 0.0, "fresh": True,
                                                   "fallback": False}
        for days_back in (10, 20):
            past = await at(days_back)
            assert past["tip_positive_rate_30d"] == {"value": 0.5, "age_s": 0.0, "fresh": False, "fallback": True}
            assert past["tip_dismiss_rate_30d"]["fallback"] is True
        assert (await at(10))["tip_volume_24h"]["fallback"] is False  # a 1-day window 10 days back: whole


def _day(d: int) -> str:
    return (datetime(2026, 9, 1, 12, tzinfo=UTC) + timedelta(days=d)).isoformat()


async def test_any_user_id_an_event_may_hold_is_served_like_any_other(start_service, nc) -> None:
    """Events take any 1-128 characters as a user id. The path's `{user_id}` stopped at a '/' (percent-encoded
    or not, the path is decoded before routing), then, matched with `.*`, at a "\n": such users' features
    were a bare 404. And the path is percent-decoded with errors replaced: "%FF%FE" answered for the user
    "\ufffd\ufffd", an id an event may well hold, as if the caller had asked for it (a fuzz campaign)."""
    running = await start_service()
    users = ("org/42", "line\nbreak", "\ufffd\ufffd")
    for n, user in enumerate(users):
        opened = {"id": f"odd-{n}", "type": "app.opened", "user_id": user, "ts": "2026-11-25T21:00:00+01:00"}
        await nc.jetstream().publish("signals.app.opened", orjson.dumps(opened))
    await eventually(lambda: running.service.store.applied == len(users))
    paths = {"org/42": ("/users/org%2F42/features", "/users/org/42/features"),
             "line\nbreak": ("/users/line%0Abreak/features",),
             "\ufffd\ufffd": ("/users/%EF%BF%BD%EF%BF%BD/features",)}
    async with running.http() as http:
        for user, asked in paths.items():
            for path in asked:
                answer = await http.get(path, params={"at": "2026-11-25T22:00:00+01:00"})
                assert answer.status_code == 200, (path, answer.text)
                body = answer.json()
                assert body["user_id"] == user and body["known"] is True, path
                assert body["features"]["app_opens_7d"]["value"] == 1, path
        for bad in ("", "%0A" * 129):  # empty, too long
            answer = await http.get(f"/users/{bad}/features")
            assert answer.status_code == 422 and answer.json()["field"] == "user_id", (bad, answer.text)
        for raw in ("%FF%FE", "%ED%A0%80", "ok%C3"):  # not UTF-8, an encoded surrogate, a sequence cut short
            answer = await http.get(f"/users/{raw}/features")
            assert answer.status_code == 422 and answer.json()["field"] == "user_id", (raw, answer.text)
            assert "UTF-8" in answer.json()["error"]
        document = (await http.get("/openapi.json")).json()
    assert "/users/{user_id}/features" in document["paths"], "the document names the parameter, not its convertor"


async def test_an_answer_at_a_past_instant_is_the_one_given_then_whatever_came_after(start_service, nc) -> None:
    """A kind the fold held no event of was unknown (the fallback, flagged) at any `?at=` only until one came: the
    user's first task, at 16:00, turned the answer for 10:00 into a known 0, so a training set read back at past
    instants held values the service had flagged as not the user's at those instants, and /score, for a backfill's
    `context.now` then, took the server's 0 over the caller's value."""
    running = await start_service()
    js = nc.jetstream()
    opened = {"id": "p-1", "type": "app.opened", "user_id": "cy", "ts": "2026-11-20T09:00:00+01:00", "data": {}}
    await js.publish("signals.app.opened", orjson.dumps(opened))
    await eventually(lambda: running.service.store.applied == 1)
    async with running.http() as http:
        async def at_ten() -> dict[str, Any]:
            answer = await http.get("/users/cy/features", params={"at": "2026-11-20T10:00:00+01:00"})
            return answer.json()["features"]

        then = await at_ten()
        later = [("signals.task.created", "task.created", {"task_id": "t"}),
                 ("signals.task.completed", "task.completed", {"task_id": "t"}),
                 ("signals.tip.shown", "tip.shown", {"tip_id": "tip-1"}),
                 ("feedback.tip.reacted", "tip.reacted", {"tip_id": "tip-1", "reaction": "acted"})]
        for n, (subject, kind, data) in enumerate(later):  # the same UTC day: what the fold holds starts as before
            await js.publish(subject, orjson.dumps({"id": f"p-{n + 2}", "type": kind, "user_id": "cy",
                                                    "ts": "2026-11-20T16:00:00+01:00", "data": data}))
        await eventually(lambda: running.service.store.applied == 1 + len(later))
        assert then["tasks_created_7d"]["fallback"] and then["tip_positive_rate_30d"]["fallback"]
        assert await at_ten() == then
        backfill = await http.post("/score", json={"user_id": "cy", "candidates": [{"tip_id": "tip-1"}],
                                                   "context": {"now": "2026-11-20T10:00:00+01:00"},
                                                   "profile_features": {"tasks_created_7d": 3}})
        assert backfill.json()["caller_features"] == ["tasks_created_7d"], backfill.text  # the caller's, as then

"""Score -> feedback through JetStream -> the next score moves; redelivery changes nothing; restarts resume.

Real nats-server, real HTTP (uvicorn), SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from app import silence_learning
from app.learning_metrics import FEEDBACK, SILENCES
from tests.conftest import eventually

NOW = "2026-11-26T09:00:00+01:00"
BODY = {"user_id": "u-1", "explore": False, "context": {"now": NOW},
        "candidates": [{"tip_id": "tip-focus-1", "category": "focus"}, {"tip_id": "tip-breaks-1", "category": "breaks"}]}


def feedback(event_id: str, decision_id: str | None, tip_id: str, reaction: str, user: str = "u-1") -> dict[str, Any]:
    data = {"tip_id": tip_id, "reaction": reaction}
    if decision_id is not None:
        data["decision_id"] = decision_id
    return {"id": event_id, "type": "tip.reacted", "user_id": user, "ts": NOW, "v": 1, "data": data}


async def publish(js: Any, event: dict[str, Any], msg_id: bool = True) -> None:
    headers = {"Nats-Msg-Id": event["id"]} if msg_id else None
    await js.publish("feedback.tip.reacted", orjson.dumps(event), headers=headers)


def another_publishers_decision(decision_id: str) -> dict[str, Any]:
    """A decision of u-1 as another publisher logs it, its id without the time ours have."""
    return {
        "id": decision_id, "type": "decision.scored", "v": 1, "ts": NOW, "user_id": "u-1",
        "model_version": "v1", "shadow_version": None, "prompt_version": None, "policy": "greedy",
        "explore": False, "features_at": NOW, "features": {"user_id": "u-1", "hour_of_day": 9},
        "caller_features": [], "ranked": [{"tip_id": "tip-focus-1", "category": "focus", "score": 0.5,
                                           "propensity": 1.0, "model_score": 0.5}], "shadow": None,
    }


def scores(body: dict[str, Any]) -> dict[str, float]:
    return {r["tip_id"]: r["score"] for r in body["ranked"]}


def count(outcome: str) -> float:
    return FEEDBACK.labels(outcome).value


async def test_feedback_moves_the_next_score_and_redelivery_changes_nothing(start_service, nc, database_url) -> None:
    running = await start_service(database_url=database_url, checkpoint_every_s=0.2)
    service = running.service
    js = nc.jetstream()
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        first = (await http.post("/score", json=BODY)).json()
        before = scores(first)
        decision = first["decision_id"]

        await publish(js, feedback("f-1", decision, "tip-focus-1", "acted"))
        await publish(js, feedback("f-2", decision, "tip-breaks-1", "disliked"))
        await eventually(lambda: service.learner.credited == 2)
        after = scores((await http.post("/score", json=BODY)).json())
        assert after["tip-focus-1"] > before["tip-focus-1"], "an acted tip scores higher"
        assert after["tip-breaks-1"] < before["tip-breaks-1"], "a disliked tip scores lower"
        learned = service.lineup.champion.n_learned

        # A redelivery (the same event stored twice: no Nats-Msg-Id), and the same reaction
        # re-sent under a new event id: neither is learned again.
        duplicates = count("duplicate")
        await publish(js, feedback("f-1", decision, "tip-focus-1", "acted"), msg_id=False)
        await publish(js, feedback("f-1-again", decision, "tip-focus-1", "acted"))
        await eventually(lambda: service.store.positions.get("FEEDBACK") == 4)
        assert count("duplicate") == duplicates + 2
        assert service.learner.credited == 2 and service.lineup.champion.n_learned == learned
        assert service.lineup.prior.count("tip-focus-1") == 1.0

    # Every decision is logged: two /score answers, two tip_scores rows; the first has its rewards,
    # and, being rewarded, the decision event (which evaluation reads); the other has neither.
    engine = sa.create_engine(database_url)
    try:
        def rows() -> dict[str, Any]:
            with engine.connect() as conn:
                return {r[0]: r for r in conn.execute(
                    sa.text("select decision_id, rewards, reward, decision from tip_scores"))}

        await eventually(lambda: len(rows()) == 2 and rows()[decision][1] is not None, timeout=15)
        def json_value(column: Any) -> Any:  # JSON text on SQLite, decoded on PostgreSQL
            return orjson.loads(column) if isinstance(column, str) else column

        assert json_value(rows()[decision][1]) == {"tip-focus-1": 1.0, "tip-breaks-1": 0.0}
        assert orjson.loads(rows()[decision][3])["id"] == decision
        [unrewarded] = [r for d, r in rows().items() if d != decision]
        assert json_value(unrewarded[1]) is None and unrewarded[3] is None
    finally:
        engine.dispose()


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_restart_resumes_learning_where_it_stopped(start_service, nc, database_url, writer: str) -> None:
    """The loop hands the checkpoint a frozen copy of each model; the writer thread serialises
    it, or the thread feeding the writer process does."""
    settings = {"database_url": database_url, "model_snapshot_every_s": 0, "checkpoint_every_s": 0.2,
                "checkpoint_writer": writer}
    running = await start_service(**settings)
    js = nc.jetstream()
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        first = (await http.post("/score", json=BODY)).json()
    decision = first["decision_id"]
    await publish(js, feedback("f-1", decision, "tip-focus-1", "acted"))
    await eventually(lambda: running.service.learner.credited == 1)
    await eventually(lambda: running.service.learner.snapshots.unconfirmed == [] and not running.service.learner._changed)
    learned = running.service.lineup.champion.n_learned
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        served_before = scores((await http.post("/score", json=BODY)).json())
    await running.stop()

    again = await start_service(**settings)
    service = again.service
    assert service.lineup.champion.n_learned == learned, "the model snapshot came back"
    await eventually(lambda: service.ready)
    async with httpx.AsyncClient(base_url=again.base_url) as http:
        assert scores((await http.post("/score", json=BODY)).json()) == served_before

    # The join cache was rebuilt from DECISIONS: feedback for the old decision still joins,
    # and what was credited before the restart stays credited.
    duplicates = count("duplicate")
    await publish(js, feedback("f-1-again", decision, "tip-focus-1", "acted"))
    await publish(js, feedback("f-2", decision, "tip-breaks-1", "dismissed"))
    await eventually(lambda: service.learner.credited == 1)
    assert count("duplicate") == duplicates + 1
    assert service.lineup.champion.n_learned == learned + 1


async def test_feedback_without_or_before_its_decision_is_counted_kept_and_joined_late(start_service, nc) -> None:
    running = await start_service(learner_pending_max_age_s=60)
    service = running.service
    js = nc.jetstream()
    no_decision, waiting = count("no_decision"), count("waiting")
    await publish(js, feedback("f-0", None, "tip-focus-1", "liked"))
    # Feedback naming a decision that has not arrived (published by another instance, say).
    await publish(js, feedback("f-1", "d-elsewhere-1", "tip-focus-1", "acted"))
    await eventually(lambda: count("waiting") == waiting + 1)
    assert count("no_decision") == no_decision + 1
    assert service.store.users["u-1"].count("tip.reacted") == 2, "the fold keeps both for the user's features"

    decision = another_publishers_decision("d-elsewhere-1")
    await js.publish("decisions.score", orjson.dumps(decision), headers={"Nats-Msg-Id": decision["id"]})
    await eventually(lambda: service.learner.credited == 1)
    assert not service.learner.waiting.by_decision


async def test_feedback_after_the_last_model_snapshot_is_replayed_on_restart(start_service, nc) -> None:
    # Models are saved at most hourly here: the second reward is only in the stream when the
    # service stops, and the restart re-reads FEEDBACK from the snapshot's position to learn it.
    # A clean stop saves the models last (test_score_registry); a crash after the last
    # checkpoint does not, which this stop imitates.
    settings = {"model_snapshot_every_s": 3600, "checkpoint_every_s": 0.1}
    running = await start_service(**settings)
    js = nc.jetstream()
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        decision = (await http.post("/score", json=BODY)).json()["decision_id"]
    learner = running.service.learner
    await publish(js, feedback("f-1", decision, "tip-focus-1", "acted"))
    await eventually(lambda: learner.credited == 1)
    # The first snapshot is the first checkpoint's with anything read: a checkpoint between the decision's read and
    # the reaction's (a loaded run) took it without the reward, and the next was an hour later. One is asked for.
    learner.snapshot_at_next_checkpoint()
    await eventually(lambda: learner.snapshots.positions[0] == 1 and not learner._changed
                     and not learner.snapshots.unconfirmed)
    # A checkpoint after the reward's read may have taken it before the ask, which then stood and took the next
    # reward's too (a loaded run): the hour between snapshots counts from here.
    learner.snapshots.last = learner.timer()
    await publish(js, feedback("f-2", decision, "tip-breaks-1", "disliked"))
    await eventually(lambda: learner.credited == 2)
    learned = running.service.lineup.champion.n_learned
    learner.snapshot_at_next_checkpoint = lambda: None  # type: ignore[method-assign]
    await running.stop()
    engine = sa.create_engine(running.service.settings.sqlalchemy_url)
    with engine.connect() as conn:
        saved = orjson.loads(conn.execute(sa.text("select state from learner_state where name = 'learner'")).scalar())
        checkpointed = conn.execute(sa.text("select seq from stream_positions where stream = 'FEEDBACK'")).scalar()
    engine.dispose()
    assert (saved["positions"]["FEEDBACK"], checkpointed) == (1, 2), "the model snapshot predates the second reward"

    again = await start_service(**settings)
    await eventually(lambda: again.service.learner.credited == 1)
    assert again.service.lineup.champion.n_learned == learned
    assert again.service.lineup.prior.count("tip-breaks-1") == 1.0


async def test_feedback_that_came_while_the_service_was_stopped_is_learned_in_order_and_whole(
    start_service, nc
) -> None:
    """At a start, DECISIONS is read back (the join cache) while FEEDBACK is read from the learner's
    snapshot. FEEDBACK was read first: every reaction waited for its decision, was learned in
    DECISIONS' order, and those past `TIPSTREAM_LEARNER_PENDING_MAX` waiting were pushed out and
    never learned (2,000 reactions after an outage, the default bound 100,000 lowered to 100: 1,900
    lost). FEEDBACK now follows DECISIONS until it has been read back."""
    settings = {"learner_pending_max": 20, "checkpoint_every_s": 0.2}
    running = await start_service(**settings)
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        decisions = [(await http.post("/score", json={**BODY, "user_id": f"u-{i % 10}"})).json()["decision_id"]
                     for i in range(150)]
    await eventually(lambda: running.service.publisher.published == len(decisions))
    await running.stop()

    js = nc.jetstream()
    for index, decision in enumerate(decisions):  # the service is stopped: this waits in FEEDBACK
        await publish(js, feedback(f"f-{index}", decision, "tip-focus-1", "acted", user=f"u-{index % 10}"))
    unknown = count("unknown_decision")
    again = await start_service(**settings)
    service = again.service
    await eventually(lambda: service.ready and service.store.positions.get("FEEDBACK") == len(decisions), timeout=20)
    assert count("unknown_decision") == unknown
    assert service.learner.credited == len(decisions) == service.lineup.champion.n_learned


# SQLite only: the learner's part is under test; PostgreSQL's rows and credits are the other tests'
# (each silence waits seconds of the clock).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_decision_nobody_answers_learns_the_silence_reward_once_across_a_restart(
        start_service, nc, database_url, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(silence_learning, "SILENCE_READ_ALLOWANCE_MS", 200)  # feedback here is read within ms
    # Nothing here reacts within the wait: each of the three is waited out whole.
    settings = {"database_url": database_url, "checkpoint_every_s": 0.2, "model_snapshot_every_s": 0,
                "silence_reward": 0.0, "silence_after_s": 0.5}
    running = await start_service(**settings)
    service = running.service
    silenced = SILENCES.labels("credited").value
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        first = (await http.post("/score", json=BODY)).json()
        served = first["ranked"][0]["tip_id"]
        await eventually(lambda: SILENCES.labels("credited").value == silenced + 1, timeout=20)
        assert service.lineup.champion.n_learned == 1
        second = (await http.post("/score", json=BODY)).json()
    assert scores(second)[served] < scores(first)[served], "the tip nobody answered scores lower"
    await eventually(lambda: SILENCES.labels("credited").value == silenced + 2, timeout=20)

    # Answered after the wait: late, not learned.
    late, credited = count("late"), service.learner.credited
    await publish(nc.jetstream(), feedback("f-late", first["decision_id"], served, "acted"))
    await eventually(lambda: count("late") == late + 1)
    assert service.learner.credited == credited and service.lineup.champion.n_learned == 2
    await eventually(lambda: service.learner.snapshots.unconfirmed == [] and not service.learner._changed)
    await running.stop()

    # The two decisions re-read from DECISIONS come back with their silence credited: a decision
    # made after the start has its silence learned, and theirs are not learned again.
    again = await start_service(**settings)
    await eventually(lambda: again.service.ready)
    assert again.service.lineup.champion.n_learned == 2
    async with httpx.AsyncClient(base_url=again.base_url) as http:
        third = (await http.post("/score", json=BODY)).json()["decision_id"]
    # Theirs were due long before: re-learned, they would have been by the time the third's is.
    await eventually(lambda: again.service.learner.joins.get(third).credits is not None, timeout=20)
    assert again.service.lineup.champion.n_learned == 3 and SILENCES.labels("credited").value == silenced + 3
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            reward = conn.execute(sa.text("select reward from tip_scores where decision_id = :d"),
                                  {"d": first["decision_id"]}).scalar_one()
        assert reward == 0.0
    finally:
        engine.dispose()


@pytest.mark.postgres
async def test_a_reaction_stored_within_the_wait_and_read_late_answers_the_decision(
        start_service, nc, postgres_url, monkeypatch: pytest.MonkeyPatch) -> None:
    """FEEDBACK's ingest held up (here: the database away, so ingest pauses for checkpoints) while a
    reaction stored within the wait waits unread: the clock must not take it for silence. A replay of
    the log reads the reaction before the silence is due and learns it; live must too."""
    from tests.conftest import reset_postgres
    from tests.integration.test_database_away import set_connections

    # Feedback here is read within ms; the clock set past the wait below is far past either allowance.
    monkeypatch.setattr(silence_learning, "SILENCE_READ_ALLOWANCE_MS", 200)
    reset_postgres(postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    # The wait is long enough for the steps below to store the reaction within it on a loaded machine
    # (0.4 s here; with a 2 s wait, the bound of 1.5 s before the reaction was the test's to fail).
    wait_s = 4.0
    settings = {"database_url": postgres_url, "checkpoint_every_s": 0.2, "model_snapshot_every_s": 0,
                "silence_reward": 0.0, "silence_after_s": wait_s, "max_uncheckpointed_events": 2}
    running = await start_service(**settings)
    service = running.service
    js = nc.jetstream()
    silenced, answered = SILENCES.labels("credited").value, SILENCES.labels("answered").value
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        decision = (await http.post("/score", json=BODY)).json()
    served = time.time()
    await eventually(lambda: service.checkpointer.uncheckpointed == 0 and service.learner.snapshots.unconfirmed == [])
    await eventually(lambda: not service.learner.replaying)  # the clock's path is open, but for the ingest held up
    late = count("late")
    set_connections(database, False)
    try:
        # Events the database's absence leaves uncheckpointed: FEEDBACK pauses after them.
        await publish(js, feedback("f-0", None, "tip-focus-1", "acted"))
        await publish(js, feedback("f-00", None, "tip-focus-1", "acted"))
        await eventually(lambda: service.store.positions.get("FEEDBACK") == 2)
        ingest = next(i for i in service.ingests if i.spec.name == "FEEDBACK")
        await eventually(lambda: ingest.puller is not None and ingest.puller.paused)
        assert time.time() - served < wait_s - 0.5, "this test needs the reaction stored within the wait"
        # The user acts on the tip a second after it was served: stored within the wait, not read yet.
        await publish(js, feedback("f-1", decision["decision_id"], decision["ranked"][0]["tip_id"], "acted"))
        # The learner's clock well past the wait and its allowance, and a look at it, as each
        # checkpoint takes (they fail meanwhile): the unread reaction must keep the silence back.
        service.learner.clock = lambda: time.time() + 60
        await service.learner.before_snapshot()
        service.learner.expire()
        assert service.store.positions.get("FEEDBACK") == 2, "the reaction is still unread"
        assert SILENCES.labels("credited").value == silenced
        service.learner.clock = time.time
    finally:
        set_connections(database, True)
    await eventually(lambda: service.store.positions.get("FEEDBACK") == 3, timeout=30)
    assert count("late") == late, "the reaction came within the wait"
    assert service.learner.joins.get(decision["decision_id"]).credits == {decision["ranked"][0]["tip_id"]: 1.0}
    # The wait is over by the learner's clock at the next checkpoint, rather than seconds from now by the wall's.
    service.learner.clock = lambda: time.time() + wait_s + 1
    await eventually(lambda: SILENCES.labels("answered").value == answered + 1, timeout=20)
    assert SILENCES.labels("credited").value == silenced


# A join cache of a few decisions, and JetStream's duplicate window at its least: a decision stored twice.
STORED_TWICE = {"checkpoint_every_s": 0.1, "learner_join_cache_mb": 0.004, "duplicate_window_s": 0.1}


async def stored_again(js: Any, data: bytes, decision_id: str) -> int:
    """Publish a decision again under its id once JetStream's duplicate window has passed, as a publisher sending
    again after an outage longer than the window does (ours for those in flight, `DecisionPublisher`); its
    sequence in DECISIONS."""
    async def stored() -> int | None:
        ack = await js.publish("decisions.score", data, headers={"Nats-Msg-Id": decision_id})
        return None if ack.duplicate else ack.seq

    return await eventually(stored)


def rewards_row(url: str, decision_id: str) -> Any:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("select rewards, reward from tip_scores where decision_id = :d"),
                                {"d": decision_id}).first()
    finally:
        engine.dispose()


async def let_go(running: Any, decision_id: str) -> None:
    """Serve decisions until the join cache has let `decision_id` go for its memory budget."""
    learner = running.service.learner
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        for _ in range(100):
            if learner.joins.get(decision_id) is None:
                return
            await http.post("/score", json=BODY)
    raise AssertionError(f"the join cache still holds {decision_id} after 100 decisions served")


async def test_a_decision_stored_twice_keeps_its_rewards_in_its_row_after_the_join_cache_let_it_go(
        start_service, nc, database_url) -> None:
    """The copy, read back after the cache let the first go, came without its credits: its row was written
    again without them, and lost its rewards."""
    running = await start_service(database_url=database_url, **STORED_TWICE)
    service = running.service
    js = nc.jetstream()
    await eventually(lambda: service.ready and not service.learner.replaying)
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        decision = (await http.post("/score", json=BODY)).json()["decision_id"]
    await publish(js, feedback("f-1", decision, "tip-focus-1", "acted"))
    await eventually(lambda: (row := rewards_row(database_url, decision)) is not None and row[1] == 1.0)
    await let_go(running, decision)

    seq = await stored_again(js, (await js.get_msg("DECISIONS", 1)).data, decision)
    await eventually(lambda: service.store.positions["DECISIONS"] >= seq)
    await eventually(lambda: service.decision_log.backlog == 0)  # its row written again, if it is to be
    assert rewards_row(database_url, decision)[1] == 1.0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_another_publisher_s_decision_stored_twice_is_credited_once(start_service, nc, database_url) -> None:
    """Held again without its credits, the copy of a decision the join cache had let go learned a reaction sent
    again a second time."""
    running = await start_service(database_url=database_url, **STORED_TWICE)
    service = running.service
    js = nc.jetstream()
    await eventually(lambda: service.ready and not service.learner.replaying)
    data = orjson.dumps(another_publishers_decision("d-elsewhere-1"))
    await js.publish("decisions.score", data, headers={"Nats-Msg-Id": "d-elsewhere-1"})
    await publish(js, feedback("f-1", "d-elsewhere-1", "tip-focus-1", "acted"))
    await eventually(lambda: service.learner.credited == 1)
    await let_go(running, "d-elsewhere-1")

    seq = await stored_again(js, data, "d-elsewhere-1")
    await eventually(lambda: service.store.positions["DECISIONS"] >= seq)
    duplicates = count("duplicate")
    await publish(js, feedback("f-1", "d-elsewhere-1", "tip-focus-1", "acted"), msg_id=False)  # delivered again
    await eventually(lambda: count("duplicate") == duplicates + 1)
    assert service.learner.credited == 1 and service.lineup.champion.n_learned == 1
    await eventually(lambda: service.decision_log.backlog == 0)
    assert rewards_row(database_url, "d-elsewhere-1")[1] == 1.0



@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_forgotten_user_s_decision_stored_again_after_a_restart_comes_back_without_their_credits(
        start_service, nc, database_url) -> None:
    """A start restores the join window's credits until each decision is read back: those of another publisher's
    decision the join cache had let go (the DECISIONS position saved is past it: not read back) waited there, keyed
    by the decision alone. Its user forgotten, then the decision stored again (its publisher sending again after
    JetStream's duplicate window), it came back with the forgotten user's credits: its row held their reward, and
    their reaction sent again was a duplicate, not a new user's."""
    token = "t" * 16
    settings = {**STORED_TWICE, "database_url": database_url, "admin_token": token}
    running = await start_service(**settings)
    js = nc.jetstream()
    await eventually(lambda: running.service.ready and not running.service.learner.replaying)
    data = orjson.dumps(another_publishers_decision("d-elsewhere-1"))
    await js.publish("decisions.score", data, headers={"Nats-Msg-Id": "d-elsewhere-1"})
    await publish(js, feedback("f-1", "d-elsewhere-1", "tip-focus-1", "acted"))
    await eventually(lambda: running.service.learner.credited == 1)
    await let_go(running, "d-elsewhere-1")
    await running.stop()

    again = await start_service(**settings)
    service, learner = again.service, again.service.learner
    await eventually(lambda: service.ready and not learner.replaying)
    assert "d-elsewhere-1" in learner._restored_credits, "not read back: its credits wait"
    async with again.http() as http:
        asked = await http.post("/admin/users/u-1/forget", json={"actor": "test"},
                                headers={"Authorization": f"Bearer {token}"})
        assert asked.status_code == 202, asked.text
    await eventually(lambda: service.eraser.status("u-1")["status"] == "done", timeout=30)

    seq = await stored_again(js, data, "d-elsewhere-1")
    await eventually(lambda: service.store.positions["DECISIONS"] >= seq)
    await eventually(lambda: service.decision_log.backlog == 0)
    assert rewards_row(database_url, "d-elsewhere-1")[1] is None, "its row holds no reward of theirs"
    credited, duplicates = learner.credited, count("duplicate")
    await publish(js, feedback("f-1", "d-elsewhere-1", "tip-focus-1", "acted"), msg_id=False)  # sent again
    await eventually(lambda: learner.credited > credited or count("duplicate") > duplicates)
    assert learner.credited == credited + 1, "the user come back: their reaction is new"

async def test_feedback_waiting_at_a_stop_joins_its_decision_published_while_stopped_once(start_service, nc) -> None:
    """The reaction waits in the learner's last snapshot; its decision, another publisher's, comes while the service
    is stopped: the start's read-back of DECISIONS credits it, once, and the start after learns nothing again."""
    settings = {"checkpoint_every_s": 0.1}
    running = await start_service(**settings)
    js = nc.jetstream()
    await publish(js, feedback("f-1", "d-elsewhere-1", "tip-focus-1", "acted"))
    await eventually(lambda: "d-elsewhere-1" in running.service.learner.waiting.by_decision)
    await running.stop()
    decision = another_publishers_decision("d-elsewhere-1")
    await js.publish("decisions.score", orjson.dumps(decision), headers={"Nats-Msg-Id": decision["id"]})

    unknown = count("unknown_decision")
    again = await start_service(**settings)
    await eventually(lambda: again.service.ready and again.service.learner.credited == 1)
    assert again.service.lineup.champion.n_learned == 1 and not again.service.learner.waiting.by_decision
    await again.stop()
    third = await start_service(**settings)
    await eventually(lambda: third.service.ready)
    assert third.service.lineup.champion.n_learned == 1 and third.service.learner.credited == 0
    assert count("unknown_decision") == unknown

"""The learner's credits saved as minutes of a log (`app.credit_log`): each snapshot writes what is new.

Before, every snapshot wrote every credit of the join window (437 ms of the event loop at 102,000
rewarded decisions, `bench/snapshot.py`). These check that a snapshot writes only the minutes
since the last one saved, and that a restart still finds every credit: re-sent feedback is a
duplicate, not learned twice.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from app import db, scoring
from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoints import Checkpointer
from app.credit_log import MINUTE_MS, CreditLog, split_row
from app.decisions import LoggedDecision
from streams.events import parse_event
from streams.read_up_to import ReadUpTo
from tests.unit.test_scoring_learner import NOW, World, delta, forget, outcomes


def checkpoint(world: World) -> None:
    checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                participants=[world.learner, world.log])
    world.store.advance("FEEDBACK", world.store.positions.get("FEEDBACK", 0) + 1)
    assert asyncio.run(checkpointer.checkpoint())


def rewarded(world: World, minutes_apart: float = 1.0) -> Any:
    """A decision logged and rewarded ("a" acted), `minutes_apart` after the clock's last; FEEDBACK
    read up to then."""
    world.clock.now += 60 * minutes_apart
    scored = world.score()
    world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    world.react(scored.decision_id, "a")
    world.learner.feedback_read.advance(int(world.clock.now * 1000), caught_up=True)  # as its ingest does
    return scored


def external_rewarded(world: World) -> LoggedDecision:
    """Another publisher's decision (no time in its id) of "u-1", read back from DECISIONS and rewarded ("a"
    acted), then a checkpoint."""
    body = orjson.loads(world.score(serve=False).payload) | {"id": "external-1"}
    logged = LoggedDecision("external-1", orjson.dumps(body))
    world.learner.add_logged(logged)
    world.store.advance("DECISIONS", 1)
    world.react("external-1", "a")
    world.learner.feedback_read.advance(int(world.clock.now * 1000), caught_up=True)
    checkpoint(world)
    return logged


def credit_rows(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """Each minute's row: its decisions' credits (their users apart: `saved_users`)."""
    table = db.learner_state
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.name, table.c.state).where(table.c.name.like("credits:%")))
        return {name: split_row(orjson.loads(bytes(state)))[0] for name, state in rows}


def saved_users(engine: sa.Engine) -> dict[str, list[str]]:
    """The users saved with the credits, by decision."""
    table = db.learner_state
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.state).where(table.c.name.like("credits:%"))).scalars()
        return {d: users for state in rows for d, users in split_row(orjson.loads(bytes(state)))[1].items()}


def decisions(row: bytes) -> set[str]:
    """The decisions a row written holds credits of."""
    return set(split_row(orjson.loads(row))[0])


def sent_again_once_done(world: World, copy: LoggedDecision) -> None:
    """The request to forget "u-1" done (the user may come back), `copy` of their decision stored again (its
    publisher sending again): a new decision of theirs, no reward in its row, their reaction credited anew."""
    del world.learner.erasing["u-1"]
    before = outcomes()
    assert world.learner.add_logged(copy)
    assert world.log.dirty[copy.id]["rewards"] is None
    world.react(copy.id, "a", event_id="again")
    assert delta(before) == {"credited": 1}, "a new decision of the user come back"


def sent_again(world: World, decisions: list[Any]) -> dict[str, float]:
    """After a restart: the decisions come back from DECISIONS and their feedback is sent again."""
    before = outcomes()
    for scored in decisions:
        world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
        world.learner.on_feedback(parse_event(orjson.dumps({
            "id": f"again-{scored.decision_id}", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
            "data": {"tip_id": "a", "decision_id": scored.decision_id, "reaction": "acted"}})))
    return delta(before)


def test_a_snapshot_writes_the_credits_since_the_last_one_saved_and_a_restart_finds_them_all(
        tmp_path: Path) -> None:
    world = World(tmp_path, window_s=86_400)
    history = [rewarded(world) for _ in range(40)]  # one a minute
    checkpoint(world)
    assert sum(len(row) for row in credit_rows(world.engine).values()) == 40
    latest = rewarded(world)
    snapshot = world.learner.snapshot()
    assert [decisions(data) for data in snapshot["credits"].values()] == [{latest.decision_id}]
    with world.engine.begin() as conn:
        world.learner.write(conn, snapshot)
    world.learner.saved(snapshot)
    checkpoint(world)
    learned = world.lineup.champion.n_learned

    again = World(tmp_path, window_s=86_400)
    again.clock.now = world.clock.now
    again.learner.restore(again.engine)
    assert sent_again(again, [*history, latest]) == {"duplicate": 41}
    assert again.lineup.champion.n_learned == learned == 41
    world.engine.dispose()
    again.engine.dispose()


def test_a_failed_snapshot_s_credits_are_written_by_the_next(tmp_path: Path) -> None:
    world = World(tmp_path)
    first = rewarded(world)
    assert world.learner.snapshot()["credits"]  # its transaction fails: never `saved`
    second = rewarded(world, minutes_apart=5)
    retried = world.learner.snapshot()
    assert {d for data in retried["credits"].values() for d in decisions(data)} == {
        first.decision_id, second.decision_id}
    with world.engine.begin() as conn:
        world.learner.write(conn, retried)
    world.learner.saved(retried)
    world.learner.snapshot(force=True)  # takes the confirmation: nothing of the failed one is left to write
    assert world.learner.snapshot(force=True)["credits"] == {}

    again = World(tmp_path)
    again.clock.now = world.clock.now
    again.learner.restore(again.engine)
    assert sent_again(again, [first, second]) == {"duplicate": 2}
    world.engine.dispose()
    again.engine.dispose()


def test_minutes_past_the_join_window_are_deleted(tmp_path: Path) -> None:
    world = World(tmp_path)  # a join window of an hour
    old = rewarded(world)
    checkpoint(world)
    [old_minute] = credit_rows(world.engine)
    world.clock.now += 2 * 3600
    new = rewarded(world)
    checkpoint(world)
    rows = credit_rows(world.engine)
    assert old_minute not in rows and [set(row) for row in rows.values()] == [{new.decision_id}]
    assert old.decision_id not in str(rows)
    world.engine.dispose()


def test_a_snapshot_from_before_the_credit_log_is_read_and_saved_as_rows(tmp_path: Path) -> None:
    """Snapshots before 2026-12-03 held every credit in the learner's own row."""
    world = World(tmp_path)
    scored = rewarded(world)
    checkpoint(world)
    table = db.learner_state
    with world.engine.begin() as conn:
        [credits] = [split_row(orjson.loads(bytes(s)))[0] for s in conn.execute(
            sa.select(table.c.state).where(table.c.name.like("credits:%"))).scalars()]
        state = orjson.loads(bytes(conn.execute(sa.select(table.c.state).where(table.c.name == "learner")).scalar_one()))
        conn.execute(sa.delete(table).where(table.c.name.like("credits:%")))
        conn.execute(sa.update(table).where(table.c.name == "learner").values(
            state=orjson.dumps(state | {"credits": credits})))

    again = World(tmp_path)
    again.clock.now = world.clock.now
    again.learner.restore(again.engine)
    assert sent_again(again, [scored]) == {"duplicate": 1}
    snapshot = again.learner.snapshot(force=True)
    assert [decisions(data) for data in snapshot["credits"].values()] == [{scored.decision_id}]
    world.engine.dispose()
    again.engine.dispose()


def test_failed_snapshots_in_a_row_keep_one_set_of_minutes_to_write_again() -> None:
    """A database outage fails every snapshot: each writes again all the failed ones wrote, so
    the newest set holds them all. Kept per generation, N failures held N ever larger copies
    (quadratic memory, and as much work for each snapshot)."""
    log = CreditLog()
    for minute in range(200):
        log.credit(f"d-{minute}", {"a": 1.0}, None, now_ms=minute * MINUTE_MS, users=("u-1",))
        written = log.changes(gen=minute + 1)  # its transaction fails: never confirmed
    assert len(written) == 200
    assert len(log._unconfirmed) == 200
    log.confirmed(200)
    assert log.changes(gen=201) == {} and list(log._open) == [199]


def test_a_decision_read_back_after_a_quiet_spell_keeps_its_credits_and_its_row_its_rewards(
        tmp_path: Path) -> None:
    """No feedback for longer than the join window, then a snapshot (a registration's, or a failed
    one retried). A start judges the window in FEEDBACK's time until it has caught up (`restore`,
    `add_logged`): the decision comes back from DECISIONS, so its minute must not be deleted."""
    world = World(tmp_path)  # a join window of an hour
    scored = rewarded(world, minutes_apart=0)
    checkpoint(world)
    world.clock.now += 3600 + 180  # quiet: no feedback, no decision
    snapshot = world.learner.snapshot(force=True)
    with world.engine.begin() as conn:
        world.learner.write(conn, snapshot)
    world.learner.saved(snapshot)
    assert credit_rows(world.engine)

    again = World(tmp_path)
    again.clock.now = world.clock.now
    again.learner.feedback_read = ReadUpTo()  # FEEDBACK is read again from the snapshot's position
    again.learner.restore(again.engine)
    assert sent_again(again, [scored]) == {"duplicate": 1}
    assert again.log.dirty[scored.decision_id]["rewards"] == {"a": 1.0}  # not erased by the re-read
    world.engine.dispose()
    again.engine.dispose()


def test_random_credits_checkpoints_failures_and_restarts_learn_each_reward_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decisions (some another publisher's) and feedback (some sent again, some without a decision)
    over streams, with checkpoints (some failing), registrations' snapshots, the clock moving (also
    back a little, and on past the window), clean stops and kill -9
    restarts that re-read both streams from the snapshot's positions: each (decision, tip) is
    learned once, its `tip_scores` row keeps every reward, and the rows stay within the window."""
    for seed in range(4):
        _random_run(tmp_path / str(seed), random.Random(seed), monkeypatch)


class _FailingStore(SqlCheckpointStore):
    def save(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database is away")


def _random_run(path: Path, rng: random.Random, monkeypatch: pytest.MonkeyPatch) -> None:
    path.mkdir()
    ids = itertools.count()
    world = World(path)  # a join window of an hour
    clock = world.clock
    # Decision ids carry the simulated clock's time, as served ones carry the real one.
    monkeypatch.setattr(scoring, "new_decision_id", lambda: f"d-{int(clock.now * 1000):012x}{next(ids):016x}")
    decisions: list[tuple[str, bytes]] = []  # DECISIONS, FEEDBACK: a position is how many were read
    feedback: list[tuple[bytes, int]] = []
    made: dict[str, float] = {}
    sent: dict[str, set[str]] = {}  # decision -> the tips whose feedback was sent (each learned once)

    def read_decision(w: World, seq: int) -> None:
        decision_id, payload = decisions[seq - 1]
        w.learner.add_logged(LoggedDecision(decision_id, payload))
        w.store.advance("DECISIONS", seq)

    def read_feedback(w: World, seq: int) -> None:
        data, stored_ms = feedback[seq - 1]
        w.learner.on_feedback(parse_event(data), True, stored_ms)
        w.store.advance("FEEDBACK", seq)
        w.learner.feedback_read.advance(stored_ms, caught_up=True)

    def checkpoint_now(w: World, fail: bool = False) -> None:
        store = (_FailingStore if fail else SqlCheckpointStore)(w.engine)
        checkpointer = Checkpointer(w.store, store, every_events=1, every_s=60, participants=[w.learner, w.log])
        try:
            asyncio.run(checkpointer.checkpoint())
        except RuntimeError:
            assert fail

    for _ in range(120):
        op = rng.random()
        if op < 0.25:
            scored = world.score(serve=False)
            decision_id, payload = scored.decision_id, scored.payload
            if rng.random() < 0.2:  # another publisher's: no time in its id
                decision_id = f"x-{len(decisions)}"
                payload = orjson.dumps(orjson.loads(payload) | {"id": decision_id})
            decisions.append((decision_id, payload))
            made[decision_id] = clock.now
            read_decision(world, len(decisions))
        elif op < 0.55:
            recent = [d for d, at in made.items() if clock.now - 1500 <= at <= clock.now]
            if rng.random() < 0.15:  # feedback without a decision: FEEDBACK's time moves on
                feedback.append((orjson.dumps({
                    "id": f"f-{len(feedback)}", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                    "data": {"tip_id": "a", "reaction": "acted"}}), int(clock.now * 1000)))
                read_feedback(world, len(feedback))
            elif recent:
                decision_id, tip = rng.choice(recent), rng.choice("ab")
                sent.setdefault(decision_id, set()).add(tip)
                feedback.append((orjson.dumps({
                    "id": f"f-{len(feedback)}", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                    "data": {"tip_id": tip, "decision_id": decision_id, "reaction": "acted"}}),
                    int(clock.now * 1000)))
                read_feedback(world, len(feedback))
        elif op < 0.7:
            clock.now += rng.choice([5, 30, 70, 400, 900, 3700, -20])  # 3700: quiet for longer than the window
        elif op < 0.85:
            checkpoint_now(world, fail=rng.random() < 0.3)
        elif op < 0.9:  # a registration's snapshot, in its own transaction (which may fail)
            snapshot = world.learner.snapshot(force=True)
            if rng.random() < 0.7:
                with world.engine.begin() as conn:
                    world.learner.write(conn, snapshot)
                world.learner.saved(snapshot)
        else:  # a clean stop, or kill -9; then a start re-reads both streams from the snapshot
            if rng.random() < 0.5:
                world.learner.snapshot_at_next_checkpoint()
                checkpoint_now(world)
            world.engine.dispose()
            world, now = World(path), clock.now
            world.clock = clock
            world.learner.clock = clock
            world.learner.feedback_read = ReadUpTo()
            resume = world.learner.restore(world.engine) or {}
            for stream, seq in resume.items():  # as the service's start does
                world.store.advance(stream, seq)
            for seq in range(resume.get("DECISIONS", 0) + 1, len(decisions) + 1):
                read_decision(world, seq)
            world.learner.caught_up()
            for seq in range(resume.get("FEEDBACK", 0) + 1, len(feedback) + 1):
                read_feedback(world, seq)
            assert clock.now == now

    world.learner.snapshot_at_next_checkpoint()
    checkpoint_now(world)
    pairs = sum(len(tips) for tips in sent.values())
    assert world.lineup.champion.n_learned == pairs
    with world.engine.connect() as conn:
        rows = dict(conn.execute(sa.select(db.tip_scores.c.decision_id, db.tip_scores.c.rewards)).all())
    assert {d: set(rows[d] or {}) for d in sent} == sent
    horizon_minute = (min(clock.now * 1000, world.learner.feedback_ms) - world.learner.window_ms) // MINUTE_MS
    assert all(int(name.split(":")[1]) >= horizon_minute - 1 for name in credit_rows(world.engine))
    world.engine.dispose()


def test_a_decision_of_another_publisher_held_past_the_window_is_not_read_back_without_its_credits(
        tmp_path: Path) -> None:
    """A decision id not ours carries no time: a start takes it back whatever its age. Held in the
    cache past the window (no decision came since to evict it), its credits' minute is deleted;
    the snapshot that deletes it must not leave it to be read back, else its row loses its rewards
    and a re-sent feedback is learned again."""
    world = World(tmp_path)  # a join window of an hour
    body = orjson.loads(world.score(serve=False).payload) | {"id": "external-1"}
    world.learner.add_logged(LoggedDecision("external-1", orjson.dumps(body)))
    world.store.advance("DECISIONS", 1)
    world.react("external-1", "a")
    world.learner.feedback_read.advance(int(world.clock.now * 1000), caught_up=True)
    checkpoint(world)
    world.clock.now += 3600 + 180
    world.react(None, "b")  # FEEDBACK goes on, without decisions
    world.learner.feedback_read.advance(int(world.clock.now * 1000), caught_up=True)
    checkpoint(world)
    assert credit_rows(world.engine) == {}

    again = World(tmp_path)
    again.clock.now = world.clock.now
    resume = again.learner.restore(again.engine)
    if resume is not None and resume["DECISIONS"] < 1:  # DECISIONS is read again from there
        again.learner.add_logged(LoggedDecision("external-1", orjson.dumps(body)))
    before = outcomes()
    again.react("external-1", "a", event_id="again")
    assert "credited" not in delta(before)
    assert "external-1" not in again.log.dirty  # its row keeps its rewards
    world.engine.dispose()
    again.engine.dispose()


def test_a_decision_of_another_publisher_read_back_keeps_its_credits_as_long_as_it_is_held(
        tmp_path: Path) -> None:
    """Read back at a start, a decision whose id carries no time is held for a window from then
    (`add_logged`): its credits, given long before, must stay saved as long, not leave with the
    minute they were given in."""
    world = World(tmp_path)  # a join window of an hour
    logged = external_rewarded(world)

    def start_again(minutes_later: float) -> World:
        again = World(tmp_path)
        again.clock.now = world.clock.now + 60 * minutes_later
        resume = again.learner.restore(again.engine)
        assert resume is not None and resume["DECISIONS"] == 0  # held: DECISIONS is read again from the start
        for stream, seq in resume.items():
            again.store.advance(stream, seq)
        again.learner.add_logged(logged)
        again.store.advance("DECISIONS", 1)
        again.learner.caught_up()
        return again

    again = start_again(minutes_later=50)
    again.clock.now += 20 * 60
    again.react(None, "b")  # FEEDBACK goes on, without decisions
    again.learner.feedback_read.advance(int(again.clock.now * 1000), caught_up=True)
    checkpoint(again)  # deletes the minute the credit was given in
    assert "external-1" in again.learner.joins.cache

    last = start_again(minutes_later=71)
    assert last.log.dirty["external-1"]["rewards"] == {"a": 1.0}  # its row keeps its rewards
    before = outcomes()
    last.react("external-1", "a", event_id="again")
    assert delta(before) == {"duplicate": 1}
    for w in (world, again, last):
        w.engine.dispose()


def test_the_learner_s_own_row_still_has_an_empty_credits_map_for_a_rolled_back_release(tmp_path: Path) -> None:
    """Releases before the credit log read `state["credits"]` unconditionally at start: rolled
    back to, they would not start at all. They find it empty (and re-sent feedback of the window
    may be learned again), the credits being in their minutes' rows."""
    world = World(tmp_path)
    rewarded(world)
    snapshot = world.learner.snapshot()
    assert orjson.loads(snapshot["state"])["credits"] == {} and snapshot["credits"]
    world.engine.dispose()


def test_a_start_does_not_write_again_the_rows_of_decisions_its_checkpoint_had_read(tmp_path: Path) -> None:
    """A start reads the join window back from DECISIONS (27,000 decisions after 45 minutes of
    `--demo 100`). Each one's `tip_scores` row was marked again and held until one checkpoint wrote
    them all: +90 MB resident after the restart of the soak. Those the checkpoint had read up to
    have their rows, with their rewards; only the decisions past its position get theirs."""
    world = World(tmp_path, window_s=86_400)
    decisions = [rewarded(world, minutes_apart=0) for _ in range(3)]
    checkpoint(world)

    again = World(tmp_path, window_s=86_400)
    again.clock.now = world.clock.now
    again.learner.restore(again.engine)
    again.learner.rows_written_upto = 2  # the checkpoint had read DECISIONS up to the second
    stored_ns = int(world.clock.now * 1e9)
    for seq, scored in enumerate(decisions, start=1):
        reply = f"$JS.ACK.DECISIONS.learner.1.{seq}.{seq}.{stored_ns}.{3 - seq}".encode()
        assert again.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload), reply)
    assert list(again.log.dirty) == [decisions[2].decision_id]
    assert sent_again(again, decisions) == {"duplicate": 3}  # the credits are held all the same
    with again.engine.connect() as conn:
        rows = conn.execute(sa.select(db.tip_scores.c.decision_id, db.tip_scores.c.reward)).all()
    assert sorted(rows) == sorted((scored.decision_id, 1.0) for scored in decisions)
    world.engine.dispose()
    again.engine.dispose()


def test_a_forgotten_users_credits_leave_the_saved_rows_and_memory(tmp_path: Path) -> None:
    """What a user's reactions credited (a decision id, the tips, the rewards, when) is saved by the
    minute in `learner_state`, for the join window: forgotten, theirs go from every minute's row, those
    saved and closed too, at the next checkpoint; the others' stay."""
    world = World(tmp_path)
    theirs = rewarded(world)
    checkpoint(world)
    world.clock.now += 120  # their minute is closed and saved: it left memory
    mine = rewarded(world)
    world.score(user="u-2")
    other = world.score(user="u-2")
    world.learner.add_logged(LoggedDecision(other.decision_id, other.payload))
    world.react(other.decision_id, "a", user="u-2")
    checkpoint(world)
    saved = {d for row in credit_rows(world.engine).values() for d in row}
    assert {theirs.decision_id, mine.decision_id, other.decision_id} <= saved

    assert forget(world.learner, "u-1", int(time.time() * 1000) + 1) == 2  # as of now on the decision ids' clock (the wall's)
    checkpoint(world)
    saved = {d for row in credit_rows(world.engine).values() for d in row}
    assert other.decision_id in saved and not saved & {theirs.decision_id, mine.decision_id}
    assert all(row for row in credit_rows(world.engine).values()), "a minute left empty is deleted"
    world.engine.dispose()


def test_a_damaged_minute_of_credits_leaves_a_forget_s_checkpoint_going_on(tmp_path: Path, caplog) -> None:
    """A forget takes the user's decisions out of every minute's saved credits at the next checkpoint. One minute's
    row that cannot be decoded (cut short, or overwritten by hand or by a disk fault) failed that checkpoint with
    a JSONDecodeError, and each after it (their decisions stay to take out): no state or position saved again. Now
    the row is left as it is, said as an error naming it and the fixes (the next start stops on it, as
    before), and the checkpoint goes on, the other rows rid of their decisions."""
    import logging

    caplog.set_level(logging.INFO, logger="tipstream")
    world = World(tmp_path)
    theirs = rewarded(world)
    checkpoint(world)
    damaged = "credits:1"  # a minute long closed
    with world.engine.begin() as conn:
        conn.execute(sa.insert(db.learner_state).values(name=damaged, state=b'{"d-1": [{"a"',
                                                        updated_at=sa.func.now()))
    assert forget(world.learner, "u-1", int(time.time() * 1000) + 1) == 1  # as of now on the decision ids' clock (the wall's)
    checkpoint(world)
    with world.engine.connect() as conn:
        rows = dict(conn.execute(sa.select(db.learner_state.c.name, db.learner_state.c.state)
                                 .where(db.learner_state.c.name.like("credits:%"))).all())
    assert bytes(rows.pop(damaged)) == b'{"d-1": [{"a"', "left as it is"
    assert not {d for state in rows.values() for d in orjson.loads(bytes(state))} & {theirs.decision_id}
    [said] = [r.getMessage() for r in caplog.records if r.name == "tipstream.checkpoints" and r.levelname == "ERROR"]
    assert said.startswith(f"The learner_state row {damaged!r} (the credits given in one minute) cannot be read "
                           "(JSONDecodeError: "), said
    assert "(docs/operations.md, 'Backups and restores')" in said and "the checkpoint goes on" in said, said
    world.engine.dispose()


def test_a_forgotten_user_s_credits_restored_at_a_start_do_not_come_back_with_a_copy_read_back_later(
        tmp_path: Path) -> None:
    """A start restores the credits of the join window, each until its decision is served or read back. Another
    publisher's decision of the user, not read back yet when the user was forgotten, is held by no cache the forget
    looks over: its restored credits stayed, keyed by the decision alone, and so did its entries in the saved
    minutes. A copy stored again after the request was done (its publisher sending again) came back with the
    forgotten user's rewards, its `tip_scores` row written with them, and their reaction sent again was a duplicate."""
    world = World(tmp_path)
    copy = external_rewarded(world)
    assert "external-1" in {d for row in credit_rows(world.engine).values() for d in row}

    again = World(tmp_path)
    again.clock.now = world.clock.now
    assert again.learner.restore(again.engine) is not None
    at_ms = int(time.time() * 1000) + 1  # as of now on the decision ids' clock (the wall's)
    went = again.learner.forget_user("u-1", at_ms, asyncio.run(again.learner.decisions_to_forget("u-1", at_ms)))
    # Not read back yet, none held: the request's report counts the credits (`forget-status`), not a decision.
    assert went == {"decisions_held": 0, "restored_credits": 1}
    checkpoint(again)
    assert "external-1" not in {d for row in credit_rows(again.engine).values() for d in row}
    sent_again_once_done(again, copy)
    world.engine.dispose()
    again.engine.dispose()


def test_the_users_saved_with_the_credits_leave_a_row_an_older_release_reads_and_rows_without_them_still_load(
        tmp_path: Path) -> None:
    """Each decision's users are saved with its credits, apart from its entry (`credit_log.USERS`): a release
    from before them unpacks every entry as (credits, rewarded ms), and a third item stopped its start on the row.
    A row saved by such a release names no user: it still loads, and a forget cannot tell its decisions are the
    user's (their credits stay until the join window passes them)."""
    world = World(tmp_path)
    copy = external_rewarded(world)
    assert saved_users(world.engine) == {"external-1": ["u-1"]}
    table = db.learner_state
    with world.engine.begin() as conn:
        [(name, state)] = conn.execute(sa.select(table.c.name, table.c.state).where(table.c.name.like("credits:%")))
        for rewards, rewarded_ms in orjson.loads(bytes(state)).values():  # as a release before them reads it
            assert isinstance(rewards, dict) and (rewarded_ms is None or isinstance(rewarded_ms, int))
        # As a release before them saved it.
        conn.execute(sa.update(table).where(table.c.name == name).values(
            state=orjson.dumps(split_row(orjson.loads(bytes(state)))[0])))

    again = World(tmp_path)
    again.clock.now = world.clock.now
    assert again.learner.restore(again.engine) is not None
    forget(again.learner, "u-1", int(time.time() * 1000) + 1)
    checkpoint(again)
    assert "external-1" in {d for row in credit_rows(again.engine).values() for d in row}, "not known to be theirs"
    del again.learner.erasing["u-1"]
    assert again.learner.add_logged(copy)
    assert again.log.dirty["external-1"]["rewards"] == {"a": 1.0}
    world.engine.dispose()
    again.engine.dispose()


def test_a_forget_takes_out_of_the_saved_minutes_its_user_s_credits_of_decisions_no_longer_held(
        tmp_path: Path) -> None:
    """The join window of credits is kept by the minute they were given in, of decisions by the time they were made
    or stored: another publisher's decision the cache let go past its window keeps its credits saved until their
    own minute leaves. A forget then found it in no cache and left its entry, the user's id with it, in the saved
    minutes. The request's step 3 committed (`dropped`) and the service stopped before it was done: the next start,
    which runs no forget again, restored those credits, and once the request was done a copy stored again came back
    with the forgotten user's rewards (as after a start made once it was done). Now the forget takes out of every
    saved minute the entries of decisions its user's, by the users saved with them, in that commit."""
    world = World(tmp_path)  # a join window of an hour
    body = orjson.loads(world.score(serve=False).payload) | {"id": "external-1"}
    copy = LoggedDecision("external-1", orjson.dumps(body))
    world.learner.add_logged(copy)  # held for a window from now
    world.store.advance("DECISIONS", 1)
    world.clock.now += 30 * 60
    world.react("external-1", "a")  # its credits saved in this minute
    world.learner.feedback_read.advance(int(world.clock.now * 1000), caught_up=True)
    checkpoint(world)
    world.clock.now += 40 * 60  # its window has passed, its credits' minute not yet
    other = world.score(user="u-2")
    world.learner.add_logged(LoggedDecision(other.decision_id, other.payload))
    world.react(other.decision_id, "a", user="u-2")
    world.learner.feedback_read.advance(int(world.clock.now * 1000), caught_up=True)
    checkpoint(world)
    assert "external-1" not in world.learner.joins.cache and "external-1" in saved_users(world.engine)

    at_ms = int(time.time() * 1000) + 1  # as of now on the decision ids' clock (the wall's)
    assert forget(world.learner, "u-1", at_ms) == 0, "none held"
    checkpoint(world)  # step 3: the request is `dropped` in this commit
    assert saved_users(world.engine) == {other.decision_id: ["u-2"]}, "no entry names the forgotten user"
    world.engine.dispose()

    again = World(tmp_path)  # stopped before the request was done: started again
    again.clock.now = world.clock.now
    assert again.learner.restore(again.engine) is not None
    again.learner.erasing["u-1"] = at_ms  # as `Eraser.resume` does for a request `dropped`
    assert "external-1" not in again.learner._restored_credits
    sent_again_once_done(again, copy)
    again.engine.dispose()

"""The eraser's step 2 (`app/erasure.py`), without I/O."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app.erasure import Eraser
from streams.events import parse_event
from streams.store import OnlineStore


class Learner:
    def __init__(self) -> None:
        self.erasing: dict[str, int] = {}
        self.forgotten: list[str] = []
        self.decisions_until_ms = 0

    async def decisions_to_forget(self, user_id: str, at_ms: int) -> list[str]:
        self.erasing[user_id] = at_ms
        return []

    def served_mark(self) -> str | None:
        return None

    def served_since(self, mark: str | None, user_ids: frozenset[str], until_ms: int) -> dict[str, list[str]]:
        return {}

    def served_unmark(self) -> None:
        pass

    def forget_user(self, user_id: str, at_ms: int, theirs: list[str]) -> dict[str, int]:
        self.forgotten.append(user_id)
        return {"decisions_held": 0, "restored_credits": 0}


class Ingest:
    """A stream's ingest, folding a chunk until `between_chunks` is set."""

    def __init__(self) -> None:
        self.between_chunks = asyncio.Event()


def opened(event_id: str, user: str) -> Any:
    return parse_event(orjson.dumps({"id": event_id, "type": "app.opened", "user_id": user,
                                     "ts": "2026-11-26T08:00:00+01:00"}))


async def test_a_user_is_forgotten_between_two_chunks_never_within_one() -> None:
    """Within a chunk's fold (which may wait for a user's state read) the store holds events past the
    stream's position: dropped then, the bounds would leave them out of the messages deleted, and a
    rebuild from the log would bring them back."""
    store, learner, ingest = OnlineStore(), Learner(), Ingest()
    store.apply(opened("e1", "u"))
    store.apply(opened("e2", "other"))
    store.advance("SIGNALS", 7)
    eraser = Eraser(None, store, learner, checkpoint=None, lock=asyncio.Lock(), ingests=[ingest])  # type: ignore[arg-type]
    dropping = asyncio.create_task(eraser._drop([{"user_id": "u", "requested_at": datetime.now(UTC)}]))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not dropping.done() and "u" in store.users and not learner.forgotten
    store.apply(opened("e3", "u"))  # the rest of the chunk
    store.advance("SIGNALS", 9)
    ingest.between_chunks.set()
    await dropping
    assert set(store.users) == {"other"} and learner.forgotten == ["u"]
    [entry] = eraser.snapshot() or []
    assert entry["bounds"] == {"SIGNALS": 9, "FEEDBACK": 0, "DECISIONS": 0, "DLQ": 0}
    assert entry["report"] == {"state": True, "decisions_held": 0, "restored_credits": 0}
    eraser.saved([entry])
    assert eraser.snapshot() is None


async def test_the_wait_for_a_chunk_s_end_is_woken_by_it_not_a_poll(monkeypatch: Any) -> None:
    """A chunk's fold waits as long as a user's state read takes (up to 10 s with the database slow): the
    eraser looked every 1 ms meanwhile, a timer and a turn of the event loop each time."""
    store, learner, ingest = OnlineStore(), Learner(), Ingest()
    store.apply(opened("e1", "u"))
    eraser = Eraser(None, store, learner, checkpoint=None, lock=asyncio.Lock(), ingests=[ingest])  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counted(when: float, *args: Any, **kwargs: Any) -> Any:
        timers.append(when)
        return call_at(when, *args, **kwargs)

    dropping = asyncio.create_task(eraser._drop([{"user_id": "u", "requested_at": datetime.now(UTC)}]))
    await asyncio.sleep(0)
    monkeypatch.setattr(loop, "call_at", counted)  # this test's loop only: its timers from here
    began = time.monotonic()
    while time.monotonic() - began < 0.2:  # the chunk's state read, taking its time
        await asyncio.sleep(0)
    monkeypatch.undo()
    assert not dropping.done() and not learner.forgotten
    assert len(timers) == 0, f"{len(timers)} timers in 0.2 s"
    ingest.between_chunks.set()
    await asyncio.wait_for(dropping, 5)
    assert learner.forgotten == ["u"]


async def test_a_reaction_learned_while_the_join_cache_is_looked_over_leaves_nothing_of_theirs(
        tmp_path: Any, monkeypatch: Any) -> None:
    """The join cache is looked over in turns, the event loop running between (ingest too): a
    reaction of theirs read then, to a decision of theirs not let go yet, was learned after their
    features had left the models, and brought them back for good."""
    from app import join_cache
    from tests.unit.test_scoring_learner import World

    world = World(tmp_path)
    scored = world.score(user="u-1")
    belongs, reacted = join_cache.belongs, []

    def a_reaction_read_meanwhile(*args: Any) -> bool:
        if not reacted:  # a FEEDBACK chunk folded while the look let the event loop run
            reacted.append(scored.decision_id)
            world.react(scored.decision_id, scored.decision["ranked"][0]["tip_id"], user="u-1")
        return belongs(*args)

    monkeypatch.setattr(join_cache, "belongs", a_reaction_read_meanwhile)
    ingest = Ingest()
    ingest.between_chunks.set()
    eraser = Eraser(None, world.store, world.learner, checkpoint=None, lock=asyncio.Lock(),  # type: ignore[arg-type]
                    ingests=[ingest])
    await eraser._drop([{"user_id": "u-1", "requested_at": datetime.now(UTC)}])
    assert reacted and [model.n_learned for _, model in world.lineup.learning] == [1, 1]
    assert [model.forget_user("u-1") for _, model in world.lineup.learning] == [0, 0], "nothing of theirs left"
    assert (eraser.snapshot() or [])[0]["report"]["decisions_held"] == 1
    world.engine.dispose()


def test_the_report_counts_the_credits_a_start_restored_for_their_decisions_not_read_back(tmp_path: Any) -> None:
    """A start restores the credits of the join window (which tips of a decision of theirs were rewarded, when),
    each until its decision is read back: another publisher's, not read back yet, is held by no cache, and the
    forget drops its credits all the same. The report counted only the decisions held (0): `forget-status` said
    nothing of what went, and a request whose only find was those credits said "nothing was held of this id"."""
    from tests.unit.test_learner_credit_log import external_rewarded
    from tests.unit.test_scoring_learner import World

    world = World(tmp_path)
    external_rewarded(world)  # "u-1"'s, rewarded and checkpointed
    world.engine.dispose()
    again = World(tmp_path)  # a start: "external-1" not read back yet
    again.clock.now = world.clock.now
    assert again.learner.restore(again.engine) is not None
    ingest = Ingest()
    ingest.between_chunks.set()
    eraser = Eraser(None, again.store, again.learner, checkpoint=None, lock=asyncio.Lock(),  # type: ignore[arg-type]
                    ingests=[ingest])
    # A test without a loop of its own: `external_rewarded` runs its checkpoint in one.
    asyncio.run(eraser._drop([{"user_id": "u-1", "requested_at": datetime.now(UTC)}]))
    assert (eraser.snapshot() or [])[0]["report"] == {"state": False, "decisions_held": 0, "restored_credits": 1}
    again.engine.dispose()


async def test_decisions_served_before_the_wall_clock_stepped_back_are_forgotten(tmp_path: Any) -> None:
    """NTP stepping the wall clock back an hour (a VM after a suspend): the decisions served in the hour before
    carry later times in their ids than the clock's when the request was acted on, and stayed held, their
    rewards learned with the user's features."""
    from app.decision_ids import decision_time_ms
    from app.decisions import LoggedDecision
    from tests.unit.test_scoring_learner import World

    world = World(tmp_path)
    scored = world.score(user="u-1", serve=False)
    hour_ahead_ms = (decision_time_ms(scored.decision_id) or 0) + 3_600_000
    served_before_the_step = f"d-{hour_ahead_ms:012x}{scored.decision_id[14:]}"
    clock = world.learner.clock
    world.learner.clock = lambda: hour_ahead_ms / 1000  # served by the clock before it stepped back
    world.learner.served(served_before_the_step, scored.payload, scored.decision)
    world.learner.clock = clock
    other = world.score(user="u-1", serve=False)  # served before a restart, read back after it
    read_back = f"d-{hour_ahead_ms + 60_000:012x}{other.decision_id[14:]}"
    world.learner.add_logged(LoggedDecision(read_back, other.payload))
    ingest = Ingest()
    ingest.between_chunks.set()
    eraser = Eraser(None, world.store, world.learner, checkpoint=None, lock=asyncio.Lock(),  # type: ignore[arg-type]
                    ingests=[ingest])
    await eraser._drop([{"user_id": "u-1", "requested_at": datetime.now(UTC)}])
    assert (eraser.snapshot() or [])[0]["report"]["decisions_held"] == 2
    assert not world.learner.joins.cache
    world.engine.dispose()


@pytest.mark.parametrize("failure", [RuntimeError("a bug in the look"), asyncio.CancelledError()])
async def test_a_look_that_fails_mid_way_stops_noting_the_decisions_read_back(
        tmp_path: Any, monkeypatch: Any, failure: BaseException) -> None:
    """During a start's read-back of DECISIONS, the join cache notes the decisions it brings from an erasure's mark
    to the look's end (`JoinCache.added_since`). A look that failed mid-way (an exception, the task cancelled) never
    got there: the join cache went on noting every decision read back (all of DECISIONS, on a rebuild), and held
    the list until the next erasure. The mark ends with the look, however it ends."""
    from app import join_cache
    from tests.unit.test_scoring_learner import World, _decisions_ack, _foreign

    world = World(tmp_path)
    assert world.learner.restore(world.engine) is None  # a start: DECISIONS is read back
    world.score(user="u-1")

    def failing(*args: Any) -> bool:
        raise failure

    monkeypatch.setattr(join_cache, "belongs", failing)
    ingest = Ingest()
    ingest.between_chunks.set()
    eraser = Eraser(None, world.store, world.learner, checkpoint=None, lock=asyncio.Lock(),  # type: ignore[arg-type]
                    ingests=[ingest])
    with pytest.raises(type(failure)):
        await asyncio.create_task(eraser._drop([{"user_id": "u-2", "requested_at": datetime.now(UTC)}]))
    for n in range(100):  # the read-back goes on, bringing u-1's
        assert world.learner.add_logged(_foreign(world, f"ext-{n}"), _decisions_ack(world.clock.now, n + 1))
    assert world.learner.joins._replayed_since_mark is None, "nothing noted once the look has ended"
    world.engine.dispose()


class Streams:
    """A JetStream context's `stream_info`, each stream's last sequence."""

    def __init__(self, last: dict[str, int]) -> None:
        self.last = last

    async def stream_info(self, stream: str) -> Any:
        return SimpleNamespace(state=SimpleNamespace(last_seq=self.last.get(stream, 0)))


async def test_a_user_is_forgotten_once_ingest_has_read_what_was_stored_before_the_request() -> None:
    """A service behind (catching up after a start, or NATS away a while) would fold their events
    stored before the request after it, as a new state that the messages' deletion then left alive."""
    store, learner, ingest = OnlineStore(), Learner(), Ingest()
    ingest.between_chunks.set()
    store.apply(opened("e1", "u"))
    store.advance("SIGNALS", 5)
    eraser = Eraser(None, store, learner, checkpoint=None, lock=asyncio.Lock(), ingests=[ingest],  # type: ignore[arg-type]
                    js=Streams({"SIGNALS": 8, "FEEDBACK": 0, "DECISIONS": 3, "DLQ": 1}))
    dropping = asyncio.create_task(eraser._drop([{"user_id": "u", "requested_at": datetime.now(UTC)}]))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not dropping.done() and not learner.forgotten
    store.apply(opened("e2", "u"))  # stored before the request, read since
    store.advance("SIGNALS", 8)
    await asyncio.wait_for(dropping, 5)
    assert "u" not in store.users and learner.forgotten == ["u"]
    assert (eraser.snapshot() or [])[0]["bounds"] == {"SIGNALS": 8, "FEEDBACK": 0, "DECISIONS": 3, "DLQ": 1}


def test_decisions_spooled_for_a_user_forgotten_since_are_not_published(tmp_path: Any) -> None:
    """Published at the next start, they would land in DECISIONS past the messages deleted, and stay."""
    from sqlalchemy import update

    from app import db, migrate
    from app.db import make_engine
    from app.decision_ids import new_decision_id

    url = f"sqlite:///{tmp_path / 'spool.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    eraser = Eraser(engine, OnlineStore(), Learner(), checkpoint=None, lock=None)  # type: ignore[arg-type]

    def spooled(user: str) -> tuple[str, str, bytes]:
        decision_id = new_decision_id()
        return "decisions.score", decision_id, orjson.dumps({"id": decision_id, "user_id": user})

    before = [spooled("u"), spooled("other"), spooled("asked")]
    assert eraser.without_forgotten(before) == before, "nobody forgotten yet"
    eraser.request("u", "dpo")
    eraser.request("asked", "dpo")  # requested only: their decisions published now get deleted with the rest
    dropped_at = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(update(db.erasures).where(db.erasures.c.user_id == "u")
                     .values(status="done", dropped_at=dropped_at))
    while time.time_ns() // 1_000_000 <= int(dropped_at.timestamp() * 1000):  # later by the ids' milliseconds
        pass
    later = spooled("u")  # the user came back after it
    assert eraser.without_forgotten([*before, later]) == [before[1], before[2], later]
    engine.dispose()


async def test_a_forget_that_did_not_go_through_logs_the_database_s_first_line_not_the_user_s_rows(
        caplog: Any) -> None:
    """SQLAlchemy's error text goes on with the statement (and its parameters, unless the engine hides them, as
    `db.make_engine`'s do): logged whole, the retry line ran over several lines."""
    import sqlalchemy as sa

    caplog.set_level(logging.WARNING, logger="tipstream.erasure")
    engine = sa.create_engine("sqlite://")
    eraser = Eraser(engine, OnlineStore(), Learner(), checkpoint=None, lock=asyncio.Lock(), ingests=[])
    tried = asyncio.Event()

    async def work() -> int:
        tried.set()
        raise sa.exc.OperationalError("DELETE FROM user_state WHERE user_id = ?", ("u-forget-me",),
                                      Exception("database is locked"))

    eraser.work = work  # type: ignore[method-assign]
    running = asyncio.create_task(eraser.run())
    await asyncio.wait_for(tried.wait(), 5)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    [said] = [r.getMessage() for r in caplog.records if r.name == "tipstream.erasure"]
    assert said.startswith("forgetting a user did not go through (OperationalError: database is locked); "), said
    assert "u-forget-me" not in said and "DELETE" not in said, said
    engine.dispose()

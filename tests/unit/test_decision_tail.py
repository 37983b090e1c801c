"""DECISIONS positions follow this process's own acknowledged publishes; anything else is read (app/decision_tail.py)."""

from __future__ import annotations

import asyncio

from app.decision_tail import OwnTail
from streams.store import OnlineStore


class Ingest:
    """What the tail reads of the DECISIONS ingest."""

    def __init__(self) -> None:
        self.caught_up, self.lag, self.buffer, self.reset_needed = False, 3, [], False
        self.puller: object | None = object()
        self.resets = 0

    def request_reset(self) -> None:
        self.resets += 1
        self.puller = object()

    async def pause_reading(self) -> None:
        self.puller = None


class Stream:
    def __init__(self, last: int) -> None:
        self.last = last
        self.away = False

    async def last_seq(self) -> int:
        if self.away:
            raise ConnectionError("no NATS")
        return self.last


def world(position: int = 10, last: int = 10) -> tuple[Ingest, OnlineStore, Stream, OwnTail]:
    ingest, store, stream = Ingest(), OnlineStore(), Stream(last)
    store.positions["DECISIONS"] = position
    return ingest, store, stream, OwnTail(ingest, store, stream.last_seq)


def tick(tail: OwnTail) -> None:
    asyncio.run(tail.tick())


def test_it_follows_only_once_the_consumer_has_caught_up_and_then_pauses_it() -> None:
    ingest, store, _, tail = world()
    follows: list[bool] = []
    tail.on_follow = lambda: follows.append(True)  # the learner joins what it re-read
    tail.stored(11)  # acknowledged while the consumer still reads: the consumer moves the position
    tick(tail)
    assert not tail.following and store.positions["DECISIONS"] == 10
    ingest.caught_up, ingest.lag = True, 0
    ingest.reset_needed = True
    tick(tail)
    assert not tail.following and not follows, "a consumer restart is pending: not caught up yet"
    ingest.reset_needed = False
    tick(tail)
    assert tail.following and ingest.puller is None, "its puller and outstanding pull are gone"
    assert store.positions["DECISIONS"] == 11, "what was acknowledged meanwhile counts"
    assert follows == [True]


def test_the_position_covers_only_unbroken_runs_of_own_sequences() -> None:
    _, store, _, tail = world()
    asyncio.run(tail.follow())
    for seq in (13, 11, 11, 9, 12):  # out of order, a duplicate acknowledgement, one already covered
        tail.stored(seq)
    assert store.positions["DECISIONS"] == 13
    tail.stored(15)
    assert store.positions["DECISIONS"] == 13, "14 is not ours (yet)"
    tail.stored(14)
    assert store.positions["DECISIONS"] == 15


def test_a_message_not_ours_sends_it_back_to_reading_after_a_tick_of_grace() -> None:
    ingest, store, stream, tail = world(last=12)
    asyncio.run(tail.follow())
    tail.stored(11)
    tick(tail)  # sees last = 12: 12 may be ours, its acknowledgement in flight
    assert tail.following and ingest.resets == 0
    stream.away = True
    tick(tail)  # NATS away: nothing decided
    assert tail.following and ingest.resets == 0
    stream.away = False
    tick(tail)  # a tick later the position is still before 12: someone else wrote it
    assert not tail.following and ingest.resets == 1 and tail.resumed == 1
    assert store.positions["DECISIONS"] == 11, "the consumer reads again from 12"


def test_a_consumer_restarted_by_a_reconnect_means_reading_until_caught_up_again() -> None:
    ingest, _, _, tail = world()
    asyncio.run(tail.follow())
    ingest.request_reset()  # what the service does for every ingest after a reconnect
    ingest.lag = 5
    tick(tail)
    assert not tail.following and ingest.puller is not None
    ingest.caught_up, ingest.lag = True, 0
    tick(tail)
    assert tail.following and ingest.puller is None


def test_own_acknowledgements_keep_it_following() -> None:
    ingest, _, stream, tail = world()
    asyncio.run(tail.follow())
    for seq in range(11, 31):
        stream.last = seq
        tail.stored(seq)
        tick(tail)
    assert tail.following and ingest.resets == 0



def test_while_reading_the_acknowledgements_kept_are_only_those_ahead_of_the_position() -> None:
    """Under steady /score load the consumer may never catch up: the heap must not keep one entry
    per decision published meanwhile."""
    _, store, _, tail = world(position=10)
    for seq in range(11, 2011):
        tail.stored(seq)
        store.positions["DECISIONS"] = seq - 5  # the consumer reads close behind
    assert len(tail._acked) <= 6

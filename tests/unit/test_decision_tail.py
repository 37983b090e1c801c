"""DECISIONS positions follow this process's own acknowledged publishes; anything else is read (app/decision_tail.py)."""

from __future__ import annotations

import asyncio

from app.decision_tail import OwnTail
from streams.store import OnlineStore


class Ingest:
    """What the tail reads of the DECISIONS ingest."""

    def __init__(self) -> None:
        self.caught_up, self.lag, self.buffer, self.reset_needed = False, 3, [], False
        self.replaying: str | None = None
        self.puller: object | None = object()
        self.resets = 0

    @property
    def current(self) -> bool:
        return self.caught_up and self.replaying is None

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


def test_it_does_not_follow_while_the_stream_is_read_again_from_its_first_message() -> None:
    """Caught up once, for good, and nothing pending at a look (the lag asked of the server in a hold leaves out
    what is on its way): followed then, the replay was cut short, /readyz saying it goes on (`replaying`) until the
    tail found more to read; for good, were the stream's last messages erased meanwhile."""
    ingest, _, _, tail = world()
    ingest.caught_up, ingest.lag = True, 0
    ingest.replaying = "read again from its first message: it ends before 10, the position read to"
    tick(tail)
    assert not tail.following and ingest.puller is not None
    ingest.replaying = None  # read to its end
    tick(tail)
    assert tail.following


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


def test_sequences_given_to_no_message_are_read_through_once() -> None:
    """nats-server 2.9.10, its account's storage full: each refused publish still took a sequence,
    the stream's last stayed ahead of every message, and the consumer was re-created every other
    tick (measured: "reading them" every 1.5 s for as long as the account stayed full)."""
    ingest, store, stream, tail = world(position=574, last=582)
    asyncio.run(tail.follow())
    tick(tail)
    tick(tail)
    assert ingest.resets == 1, "575-582 may be someone else's: read"
    ingest.caught_up, ingest.lag = True, 0  # the consumer found nothing there
    for _ in range(5):
        tick(tail)
    assert tail.following and ingest.resets == 1 and store.positions["DECISIONS"] == 574
    stream.last = 583  # the account has room again: one of ours, past the sequences given to nothing
    tail.stored(583)
    tick(tail)
    tick(tail)
    assert ingest.resets == 2, "read once more, from 575, to pass them"


def test_a_stream_created_again_forgets_what_the_old_one_was_read_through() -> None:
    ingest, store, stream, tail = world(position=574, last=582)
    asyncio.run(tail.follow())
    tick(tail)
    tick(tail)
    ingest.caught_up, ingest.lag = True, 0
    tick(tail)
    assert tail.following and ingest.resets == 1
    store.positions["DECISIONS"], stream.last = 0, 3  # re-created, published to by another
    tick(tail)
    tick(tail)
    assert ingest.resets == 2, "the new stream's 1-3 are read"


def test_a_stream_that_says_it_holds_nothing_past_the_position_is_not_read() -> None:
    """The same, where the stream can be asked for its next message (nats-server 2.9 and later):
    the sequences each refused retry takes are never read at all."""
    ingest, store, stream, tail = world(position=568, last=568)
    held = set(range(1, 569))

    async def next_seq(seq: int) -> int | None:
        return min((s for s in held if s >= seq), default=None)

    tail.stream_next_seq = next_seq
    asyncio.run(tail.follow())
    for last in range(569, 620, 5):  # a refused retry every tick or so: a sequence each, no message
        stream.last = last
        tick(tail)
    assert tail.following and ingest.resets == 0 and store.positions["DECISIONS"] == 568
    held.add(620)  # room again: a message at last, someone else's
    stream.last = 620
    tick(tail)
    tick(tail)
    assert ingest.resets == 1 and not tail.following


def test_a_stream_created_again_while_followed_behind_the_position_is_read() -> None:
    """Deleted and made again between two ticks (`nats stream rm`, then `add`, to empty it), the stream numbers
    its messages from 1 again: our acknowledgements fall behind the position, and its last sequence stayed under
    it, so nothing sent the consumer back to reading; another publisher's decisions there were not read until the
    new stream passed the old position, their feedback expiring as `unknown_decision` meanwhile."""
    ingest, _, stream, tail = world(position=574, last=574)
    asyncio.run(tail.follow())
    tick(tail)
    tail.stored(575)
    stream.last = 575
    tick(tail)
    tick(tail)
    assert tail.following and ingest.resets == 0
    stream.last = 3  # the new stream: another publisher's 1-2, and ours
    tail.stored(3)
    tick(tail)
    tick(tail)
    assert ingest.resets == 1 and not tail.following, "the new stream's 1-3 are read"


def test_a_last_sequence_read_before_our_latest_acknowledgement_is_not_taken_for_a_new_stream() -> None:
    """The stream's answer and our acknowledgements come by different paths: a last sequence under the position
    for one tick is an answer that left before our latest decision was stored."""
    ingest, _, stream, tail = world(position=574, last=574)
    asyncio.run(tail.follow())
    tick(tail)
    tail.stored(575)
    tick(tail)  # the stream said 574
    stream.last = 575
    tick(tail)
    tick(tail)
    assert tail.following and ingest.resets == 0


def test_acknowledgements_arriving_while_each_tick_waits_for_the_stream_are_not_a_new_stream() -> None:
    """Under a steady /score load (`tipstream run --demo 100` and 10 requests a second, or a registration holding
    the event loop), an acknowledgement of ours arrived while each tick waited for the stream's last sequence, two
    ticks running: the answer, given before it, fell under the position read after it. Logged as a stream created
    again, and the consumer restarted, three times in the first minute."""
    ingest, store, stream, tail = world(position=574, last=574)

    async def last_seq() -> int:
        last = stream.last  # the server answers...
        stream.last += 1  # ...then stores our next decision, whose acknowledgement comes first
        tail.stored(stream.last)
        return last

    tail.stream_last_seq = last_seq
    asyncio.run(tail.follow())
    for _ in range(5):
        tick(tail)
    assert tail.following and ingest.resets == 0 and store.positions["DECISIONS"] == 579

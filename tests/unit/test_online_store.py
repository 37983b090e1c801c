"""The online store and the checkpointer's bookkeeping, without I/O."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from app import checkpoints
from app.checkpoint_stores import MemoryCheckpointStore
from app.checkpoints import Checkpointer
from app.collector import FreezePolicy
from streams.events import parse_event
from streams.fold import FutureEvent
from streams.store import OnlineStore, UnreadableState
from tests.conftest import eventually


def opened(i: int, user: str = "u", ts: str = "2026-11-26T08:00:00+01:00") -> Any:
    return parse_event(orjson.dumps({"id": f"o-{i}", "type": "app.opened", "user_id": user, "ts": ts}))


def test_cold_users_are_loaded_on_first_use_and_never_overwritten_by_the_warm_up() -> None:
    source = OnlineStore()
    source.apply(opened(1, "a"))
    source.apply(opened(2, "b"))
    blobs = {u: s.to_bytes() for u, s in source.users.items()}
    fetched: list[list[str]] = []

    store = OnlineStore()
    store.cold = set(blobs)
    store.fetch_cold = lambda ids: (fetched.append(ids), {i: blobs[i] for i in ids})[1]
    assert store.apply(opened(3, "a"))  # thawed, then folded
    assert not store.apply(opened(1, "a"))  # already in the checkpointed state
    assert fetched == [["a"]]
    assert store.warm(blobs.items()) == 1  # only b: a is live and newer than its checkpoint
    assert store.users["a"].count("app.opened") == 2 and not store.cold


def test_loading_every_state_at_once_names_the_user_of_a_damaged_row() -> None:
    """`load` (the bench scripts') decoded the rows itself: a damaged one was a bare ValueError naming no one,
    where every other read of a row is UnreadableState, naming the user and the fixes (`decoded`)."""
    source = OnlineStore()
    source.apply(opened(1, "a"))
    told: list[str] = []
    store = OnlineStore()
    store.on_unreadable = lambda error: told.append(error.user_id)
    with pytest.raises(UnreadableState, match="The user_state row of user 'b' cannot be read"):
        store.load({"SIGNALS": 1}, [("a", source.users["a"].to_bytes()), ("b", source.users["a"].to_bytes()[:-1])])
    assert told == ["b"] and store.users["a"] == source.users["a"] and "b" not in store.users


def test_future_events_are_refused_without_leaving_an_empty_user() -> None:
    store = OnlineStore()
    store.max_ts_ms = 0
    with pytest.raises(FutureEvent):
        store.apply(opened(1))
    assert store.users == {}


class FlakyStore(MemoryCheckpointStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.away = False

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database away")
        super().save(*args, **kwargs)

    def reachable(self) -> bool:
        return not self.away


async def test_checkpoints_failing_with_nothing_to_save_are_told_over_by_the_next_that_goes_through(
        caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint whose lock check failed (the database away, the service idle) hands no users back, and the next
    found nothing to save: it went through saying nothing, and the next commit, hours on maybe, said 'checkpoints
    commit again (the first of the 1 that failed did ... ago)' of an outage long over."""
    store = OnlineStore()
    checkpointer = Checkpointer(store, MemoryCheckpointStore(), every_events=1, every_s=60)
    store.apply(opened(1, "a"))
    store.advance("SIGNALS", 1)
    assert await checkpointer.checkpoint()
    away = [ConnectionError("the database is away")]

    async def lock_check() -> None:
        if away:
            raise away.pop()

    checkpointer.before_write = lock_check
    caplog.set_level(logging.INFO, logger="tipstream.checkpoints")
    with pytest.raises(ConnectionError):
        await checkpointer.checkpoint()
    assert not await checkpointer.checkpoint()  # nothing changed
    store.apply(opened(2, "a"))
    store.advance("SIGNALS", 2)
    assert await checkpointer.checkpoint()
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and told[0].startswith("checkpoints go through again (the one that failed did "), told
    assert told[0].endswith(" s ago): nothing changed meanwhile"), told


async def test_a_checkpoint_that_commits_after_one_failed_says_so_in_the_singular(
        caplog: pytest.LogCaptureFixture) -> None:
    """'checkpoints commit again (the first of the 1 that failed did 0 s ago): the 1 users changed meanwhile are
    saved'."""
    store = OnlineStore()
    checkpointer = Checkpointer(store, FlakyStore(failures=1), every_events=1, every_s=60)
    store.apply(opened(1, "a"))
    store.advance("SIGNALS", 1)
    caplog.set_level(logging.INFO, logger="tipstream.checkpoints")
    with pytest.raises(ConnectionError):
        await checkpointer.checkpoint()
    assert await checkpointer.checkpoint()
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and told[0].startswith("checkpoints commit again (the one that failed did "), told
    assert told[0].endswith(" s ago): the 1 user changed meanwhile is saved"), told


async def test_a_failed_checkpoint_hands_its_users_back_for_the_next_one() -> None:
    store = OnlineStore()
    target = FlakyStore(failures=1)
    checkpointer = Checkpointer(store, target, every_events=1, every_s=60)
    store.apply(opened(1, "a"))
    store.advance("SIGNALS", 1)
    with pytest.raises(ConnectionError):
        await checkpointer.checkpoint()
    assert store.dirty_count == 1 and checkpointer.uncheckpointed == 1
    # /readyz tells it, also for a checkpoint asked for outside the loop (before a card reads the log).
    assert checkpointer.health()["ok"] is False and checkpointer.health()["last_error"] == "ConnectionError: database away"
    store.apply(opened(2, "b"))
    store.advance("SIGNALS", 2)
    assert await checkpointer.checkpoint()
    assert target.positions == {"SIGNALS": 2} and set(target.states) == {"a", "b"}
    assert checkpointer.uncheckpointed == 0 and checkpointer.health()["ok"] is True
    saved_at = checkpointer.last_ok
    assert not await checkpointer.checkpoint(), "nothing changed: nothing written"
    assert checkpointer.last_ok > saved_at, "in step with the database: an idle service is not behind"


def test_run_loop_retries_until_the_database_is_back() -> None:
    store = OnlineStore()
    store.apply(opened(1))
    store.advance("SIGNALS", 1)
    target = FlakyStore(failures=2)
    checkpointer = Checkpointer(store, target, every_events=1, every_s=0.01)

    async def run() -> None:
        task = asyncio.create_task(checkpointer.run())
        while target.positions != {"SIGNALS": 1}:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert checkpointer.failures == 2


async def test_a_retry_comes_once_the_database_answers_not_after_the_whole_backoff() -> None:
    """Waited out whole, the backoff (up to 30 s) kept /score answering 503 that long after the
    database was back: its unwritten decisions wait for a checkpoint."""
    store = OnlineStore()
    store.apply(opened(1))
    store.advance("SIGNALS", 1)
    target = FlakyStore(failures=1)
    target.away = True
    checkpointer = Checkpointer(store, target, every_events=1, every_s=0.01)
    checkpointer.retry_first_s = 60.0  # as after a long outage
    task = asyncio.create_task(checkpointer.run())
    try:
        await eventually(lambda: checkpointer.failures)
        target.away = False
        await asyncio.wait_for(_until(lambda: target.positions == {"SIGNALS": 1}), timeout=10)
    finally:
        task.cancel()


async def test_a_checkpoint_over_lost_commits_tells_once_and_writes_nothing_more() -> None:
    """The store went back in time under the service: its run loop stops (a retry finds the same),
    `on_lost` is told once, and no later checkpoint is written, the stop's last one included."""
    store = OnlineStore()
    target = MemoryCheckpointStore()
    target.positions = {"SIGNALS": 3}  # as the start restored them
    checkpointer = Checkpointer(store, target, every_events=1, every_s=0.01, committed={"SIGNALS": 3})
    told: list[str] = []
    checkpointer.on_lost = told.append
    store.positions = {"SIGNALS": 3}
    store.apply(opened(1, "a"))
    store.advance("SIGNALS", 4)
    assert await checkpointer.checkpoint() and checkpointer.committed == {"SIGNALS": 4}
    target.positions = {"SIGNALS": 3}  # the commit lost: a failover, a restore
    store.apply(opened(2, "b"))
    store.advance("SIGNALS", 5)
    await asyncio.wait_for(checkpointer.run(), timeout=10)  # returns: nothing to retry
    assert len(told) == 1 and "SIGNALS 3 (this service committed 4)" in told[0]
    assert checkpointer.refused is not None and checkpointer.health()["ok"] is False
    assert not await checkpointer.checkpoint()
    assert target.positions == {"SIGNALS": 3} and set(target.states) == {"a"}


async def _until(done: Any) -> None:
    while not done():
        await asyncio.sleep(0.01)


async def test_the_warm_up_loads_everyone_after_a_read_that_failed(tmp_path: Any) -> None:
    """Before, a failed read left the warm-up waiting for ever and `Service.warm` never true."""
    from app.api import create_app
    from app.settings import Settings
    from app.warm_up import warm_up

    source = OnlineStore()
    for i, user in enumerate(("a", "b", "c")):
        source.apply(opened(i, user))
    blobs = {u: s.to_bytes() for u, s in source.users.items()}

    class Checkpoint:  # what the warm-up reads of SqlCheckpointStore
        reads = 0

        def states(self) -> Any:
            self.reads += 1
            yield "a", blobs["a"]
            if self.reads == 1:
                raise ConnectionError("the database went away")
            yield from ((u, blobs[u]) for u in ("b", "c"))

    service = create_app(Settings(data_dir=tmp_path)).state.service  # not started: the store only
    service.store.cold = set(blobs)
    checkpoint = Checkpoint()
    await asyncio.wait_for(warm_up(service.store, service.freezer, checkpoint, lambda: service.checkpointer), 30)
    assert checkpoint.reads == 2 and service.warm and sorted(service.store.users) == ["a", "b", "c"]


async def test_a_warm_up_failing_for_as_long_as_the_database_is_away_is_told_once_a_minute(tmp_path: Any,
                                                                                            caplog: Any) -> None:
    """The database away at a start: the warm-up warned at every try, 30 s apart at the backoff's most, for as long
    as it was away. Ten tries that fail on the warm-up's clock (0.5 s doubling to 30 s, not slept), then one that
    loads everyone."""
    import logging

    from app.api import create_app
    from app.settings import Settings
    from app.warm_up import warm_up

    source = OnlineStore()
    source.apply(opened(0, "a"))
    source.apply(opened(1, "idle", ts="2026-09-01T08:00:00+01:00"))  # left in the database by the warm-up
    blobs = {u: state.to_bytes() for u, state in source.users.items()}
    reads = []

    class Checkpoint:  # what the warm-up reads of SqlCheckpointStore
        def states(self) -> Any:
            reads.append(1)
            if len(reads) <= 10:
                raise ConnectionError("the database went away")
            yield from blobs.items()

    now = [0.0]

    async def pause(seconds: float) -> None:
        now[0] += seconds

    service = create_app(Settings(data_dir=tmp_path)).state.service  # not started: the store only
    service.store.cold = set(blobs)
    caplog.set_level(logging.INFO, logger="tipstream")
    await asyncio.wait_for(warm_up(service.store, service.freezer, Checkpoint(), lambda: service.checkpointer,
                                   pause=pause, clock=lambda: now[0]), 30)
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream"]
    # Tries at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5, 61.5 (told, 6 left out), 91.5, 121.5 (told, 1 left out).
    away = "could not load the checkpointed users (ConnectionError: the database went away)"
    assert [line.split("; ")[0] for line in told[:3]] == [away] * 3, told
    assert "more failed" not in told[0] and told[1].endswith("(6 more failed tries since the last line)"), told
    assert told[2].endswith("(1 more failed try since the last line)"), told
    # One of each said so: the last line read 'all 1 users loaded' whatever the count.
    assert told[3].startswith("all 1 user loaded in ") and "(1 idle one left in the database)" in told[3], told
    assert told[3].endswith(", after 10 tries that failed"), told
    assert len(told) == 4 and service.store.users.keys() == {"a"}, told


async def test_idle_users_leave_memory_after_a_checkpoint_and_come_back_whole(caplog: pytest.LogCaptureFixture) -> None:
    """A user with no event for 32 days of the log's time is let go of once the database holds
    their state as memory does; a request or an event loads it back from the checkpoint."""
    caplog.set_level(logging.INFO, logger="tipstream.checkpoints")
    store = OnlineStore()

    class IngestDuringTheWrite(MemoryCheckpointStore):
        saves = 0

        def save(self, *args: Any, **kwargs: Any) -> None:
            super().save(*args, **kwargs)
            self.saves += 1
            if self.saves == 1:  # an event for "late" after its hand-over
                store.apply(opened(4, "late", ts="2026-09-02T08:00:00+01:00"))

    target = IngestDuringTheWrite()
    fetched: list[str] = []
    store.fetch_cold = lambda ids: (fetched.extend(ids), {i: target.states[i] for i in ids})[1]
    checkpointer = Checkpointer(store, target, every_events=1, every_s=60)
    kept = {"kept"}  # as the offline writer holds a user its pass has not read yet
    checkpointer.keep_awake.append(kept.__contains__)
    for i, user in enumerate(("gone", "kept", "late")):
        store.apply(opened(i, user, ts="2026-09-01T08:00:00+01:00"))
    store.apply(opened(3, "here", ts="2026-11-26T08:00:00+01:00"))
    assert await checkpointer.checkpoint()
    assert sorted(store.users) == ["here", "kept", "late"] and store.dormant == {"gone"}
    let_go = [r.getMessage() for r in caplog.records if "let go of from memory" in r.getMessage()]
    assert let_go == ["1 idle user let go of from memory (no event for 32 days); 3 held, 1 in the database only"]
    store.apply(opened(5, "here", ts="2026-11-27T08:00:00+01:00"))  # a new day of the log: another look
    assert await checkpointer.checkpoint()
    assert sorted(store.users) == ["here", "kept"] and store.dormant == {"gone", "late"}
    kept.clear()  # its pass has read it: the next checkpoint looks at it again, the same day of the log
    store.apply(opened(6, "here", ts="2026-11-27T09:00:00+01:00"))
    assert await checkpointer.checkpoint()
    assert list(store.users) == ["here"] and store.dormant == {"gone", "kept", "late"}
    store.apply(opened(7, "here", ts="2026-11-28T08:00:00+01:00"))

    late = store.state_of("late")  # a request loads it back, as saved: both of its events
    assert late is not None and late.count("app.opened") == 2 and late.to_bytes() == target.states["late"]
    assert store.apply(opened(8, "gone", ts="2026-11-28T09:00:00+01:00"))  # an event: loaded, then folded
    assert fetched == ["late", "gone"] and store.dormant == {"kept"}


def test_the_warm_up_leaves_idle_users_in_the_database() -> None:
    source = OnlineStore()
    source.apply(opened(1, "active", ts="2026-11-26T08:00:00+01:00"))
    source.apply(opened(2, "idle", ts="2026-09-01T08:00:00+01:00"))
    blobs = {u: s.to_bytes() for u, s in source.users.items()}
    store = OnlineStore()
    store.cold = set(blobs)
    store.fetch_cold = lambda ids: {i: blobs[i] for i in ids}
    assert store.warm(blobs.items()) == 2
    assert list(store.users) == ["active"] and store.dormant == {"idle"} and not store.cold
    assert store.state_of("idle").to_bytes() == blobs["idle"]


def test_users_coming_in_after_idle_ones_left_are_frozen_too() -> None:
    """Idle users leaving kept the store's size flat: new and returning users, counted against
    the size at the last freeze, were never frozen, and full collections visited ever more of them."""
    store = OnlineStore()
    store.fetch_cold = lambda ids: {}  # where the checkpoint is read back from
    freezer = FreezePolicy(every_users=2)
    for i, user in enumerate(("a", "b")):
        store.apply(opened(i, user, ts="2026-09-01T08:00:00+01:00"))
    assert freezer.due(store.taken_in)
    freezer.users_at_freeze = store.taken_in  # as `check` does, without freezing this test's objects
    store.begin_checkpoint()  # and its save committed
    store.apply(opened(2, "c", ts="2026-11-26T08:00:00+01:00"))
    assert store.rest(["a", "b"]) == 2 and len(store.users) == 1
    assert not freezer.due(store.taken_in)
    store.apply(opened(3, "d", ts="2026-11-26T09:00:00+01:00"))
    assert freezer.due(store.taken_in)  # c and d came in since the freeze


async def test_idle_user_days_0_keeps_every_user_in_memory() -> None:
    store = OnlineStore()
    store.idle_days = 0
    store.fetch_cold = lambda ids: {}
    store.apply(opened(1, "idle", ts="2026-01-01T08:00:00+01:00"))
    store.apply(opened(2, "active", ts="2026-11-26T08:00:00+01:00"))
    assert await Checkpointer(store, MemoryCheckpointStore(), every_events=1, every_s=60).checkpoint()
    assert sorted(store.users) == ["active", "idle"] and not store.dormant


async def test_a_read_made_stale_by_users_let_go_of_meanwhile_is_read_again_off_the_loop() -> None:
    """`load_state` reads a user in a worker thread; `install` leaves the answer out when other
    users were let go of meanwhile (this one may have been among them, with a newer row). The
    caller's `apply` or `state_of` then read the user on the spot, on the event loop: the very read
    app/thaw.py moves off it (a table locked by the time it runs held the whole service)."""
    import threading

    from app import thaw

    blob = OnlineStore()
    blob.apply(opened(1, "back"))
    saved = blob.users["back"].to_bytes()
    loop_thread, reading, release = threading.get_ident(), threading.Event(), threading.Event()
    read_on: list[bool] = []

    def fetch(ids: list[str]) -> dict[str, bytes]:
        read_on.append(threading.get_ident() == loop_thread)
        reading.set()
        release.wait(5)
        return {"back": saved}

    store = OnlineStore()
    store.fetch_cold = fetch
    store.dormant.add("back")
    store.apply(opened(2, "gone", ts="2026-09-01T08:00:00+01:00"))
    store.apply(opened(3, "here"))
    store.begin_checkpoint()  # and its save committed
    loading = asyncio.create_task(thaw.load_state(store, "back"))
    await eventually(reading.is_set)
    assert store.rest(["gone"]) == 1  # the checkpointer lets an idle user go meanwhile
    release.set()
    await loading
    assert store.apply(opened(1, "back", ts="2026-11-26T08:00:00+01:00")) is False  # in the row read
    assert read_on and not any(read_on), "read again on the event loop"


async def test_a_user_at_the_event_cap_is_counted_and_told_until_back_under_it(caplog: pytest.LogCaptureFixture) -> None:
    """One user's publisher in a loop: the fold keeps their newest MAX_RECORDS_PER_KIND of a kind,
    and the operator hears of it (a gauge, a warning naming the user), not of calm users."""
    from datetime import datetime, timedelta

    from app.metrics import METRICS
    from streams.fold import MAX_RECORDS_PER_KIND

    start = datetime.fromisoformat("2026-11-26T08:00:00+01:00")
    store = OnlineStore()
    checkpointer = Checkpointer(store, MemoryCheckpointStore(), every_events=1, every_s=60)
    for i in range(MAX_RECORDS_PER_KIND + 5):
        store.apply(opened(i, "flood", (start + timedelta(seconds=i)).isoformat()))
    store.apply(opened(0, "calm"))
    assert store.users["flood"].count("app.opened") == MAX_RECORDS_PER_KIND
    caplog.clear()
    assert await checkpointer.checkpoint()
    assert METRICS.users_at_cap._value.get() == 1
    told = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(told) == 1 and "'flood' (app.opened)" in told[0] and "calm" not in told[0], told
    assert told[0].startswith(f"1 user holds {MAX_RECORDS_PER_KIND:,} events of one kind"), told  # not 'user(s) hold'
    # Forty days on, the old events fell out of every window: under the cap again.
    store.apply(opened(-1, "flood", (start + timedelta(days=40)).isoformat()))
    assert await checkpointer.checkpoint()
    assert METRICS.users_at_cap._value.get() == 0


@pytest.mark.parametrize("idle_days", [None, 0])
async def test_a_user_at_the_event_cap_who_stopped_leaves_the_count_once_past_the_log_s_horizon(
        idle_days: float | None) -> None:
    """A flood that stopped: once the log's time is 31 days past what the user's capped kind holds, no
    window reaches it, and the gauge (and its alert) is quiet, whether the user was let go of from
    memory (as a start would find them: not counted) or kept in it (`idle_days` 0)."""
    from datetime import datetime, timedelta

    from app.metrics import METRICS
    from streams.fold import MAX_RECORDS_PER_KIND

    start = datetime.fromisoformat("2026-09-01T08:00:00+01:00")
    store = OnlineStore()
    store.fetch_cold = lambda ids: {}
    if idle_days is not None:
        store.idle_days = idle_days
    checkpointer = Checkpointer(store, MemoryCheckpointStore(), every_events=1, every_s=60)
    for i in range(MAX_RECORDS_PER_KIND + 5):
        store.apply(opened(i, "flood", (start + timedelta(seconds=i)).isoformat()))
    assert await checkpointer.checkpoint()
    assert METRICS.users_at_cap._value.get() == 1
    store.apply(opened(0, "calm", (start + timedelta(days=20)).isoformat()))
    assert await checkpointer.checkpoint()
    assert METRICS.users_at_cap._value.get() == 1, "still within 31 days of the log's time"
    store.apply(opened(1, "calm", (start + timedelta(days=40)).isoformat()))
    assert await checkpointer.checkpoint()
    assert ("flood" in store.dormant) == (idle_days is None)
    assert METRICS.users_at_cap._value.get() == 0


async def test_a_user_at_the_event_cap_who_is_forgotten_leaves_the_count_at_once() -> None:
    """Forgotten (a request to erase them), their id and their oldest capped event's time leave the
    checkpointer's memory and the gauge: kept, they stayed up to 31 days, never saved again."""
    from datetime import datetime, timedelta

    from app.metrics import METRICS
    from streams.fold import MAX_RECORDS_PER_KIND

    start = datetime.fromisoformat("2026-11-26T08:00:00+01:00")
    store = OnlineStore()
    checkpointer = Checkpointer(store, MemoryCheckpointStore(), every_events=1, every_s=60)
    for i in range(MAX_RECORDS_PER_KIND + 5):
        store.apply(opened(i, "flood", (start + timedelta(seconds=i)).isoformat()))
    assert await checkpointer.checkpoint()
    assert METRICS.users_at_cap._value.get() == 1
    assert store.forget("flood")
    assert METRICS.users_at_cap._value.get() == 0
    store.apply(opened(0, "calm"))
    assert await checkpointer.checkpoint()
    assert METRICS.users_at_cap._value.get() == 0 and "flood" not in checkpointer.at_cap.users


async def test_a_checkpoint_of_many_users_puts_them_in_order_in_turns_of_the_event_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint after a catch-up that changed 1M users sorted their ids in one call: every request and
    stream waited 0.47 s. Sorted in runs and merged a piece at a time, the loop gets turns in between, and
    the rows are still written in key order."""
    from app import checkpoints
    from streams.fold import UserState

    monkeypatch.setattr(checkpoints, "SORT_CHUNK", 2)
    store = OnlineStore()
    for i, user in enumerate(["g", "c", "e", "a", "f", "b", "d"]):
        store.apply(opened(i, user))
    store.advance("SIGNALS", 7)
    target = MemoryCheckpointStore()
    checkpointer = Checkpointer(store, target, every_events=1, every_s=60)
    turns, at = [0], {}
    begin, to_bytes = store.begin_checkpoint, UserState.to_bytes

    def begin_noted(*args: Any, **kwargs: Any) -> Any:
        at.setdefault("begin", turns[0])
        return begin(*args, **kwargs)

    def to_bytes_noted(state: UserState) -> bytes:
        at.setdefault("serialise", turns[0])
        return to_bytes(state)

    async def tick() -> None:
        while True:
            turns[0] += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(store, "begin_checkpoint", begin_noted)
    monkeypatch.setattr(UserState, "to_bytes", to_bytes_noted)
    ticker = asyncio.create_task(tick())
    try:
        assert await checkpointer.checkpoint()
    finally:
        ticker.cancel()
    assert at["serialise"] - at["begin"] >= 4, "the loop ran while the users were put in order"
    assert list(target.states) == sorted("abcdefg")


async def test_the_users_a_checkpoint_saved_are_told_a_run_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Told all at once, a catch-up's million users held the event loop 0.1-0.2 s (the offline writer's set of them
    grew by a million ids in one call)."""
    monkeypatch.setattr(checkpoints, "SORT_CHUNK", 2)
    store = OnlineStore()
    for i, user in enumerate("ecbda"):
        store.apply(opened(i, user))
    store.advance("SIGNALS", 5)
    checkpointer = Checkpointer(store, MemoryCheckpointStore(), every_events=1, every_s=60)
    turns: list[int] = []
    told: list[tuple[list[str], int]] = []
    checkpointer.on_saved.append(lambda users: told.append((list(users), len(turns))))

    async def ticking() -> None:
        while True:
            turns.append(1)
            await asyncio.sleep(0)

    ticker = asyncio.create_task(ticking())
    assert await checkpointer.checkpoint()
    ticker.cancel()
    assert [users for users, _ in told] == [["a", "b"], ["c", "d"], ["e"]]
    assert told[0][1] < told[1][1] < told[2][1], "the loop turned between the runs"


async def test_a_user_read_that_fails_says_why_in_the_log(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """/score's and the features' 503 for a user not in memory says "see the warnings in the log", and
    there were none: a `user_state` locked on PostgreSQL gave the 503 after 10 s and the log said nothing.
    The log now says why, the cause named (the wait given up, or the driver's error), at most once a
    minute of each, and not who the user is (docs/operations.md, "Forgetting a user": the log is not erased)."""
    import threading

    from app import thaw
    from streams.log_throttle import LogThrottle
    from streams.store import StateUnavailable

    monkeypatch.setattr(thaw, "LOAD_TIMEOUT_S", 0.2)
    monkeypatch.setattr(thaw, "_failure_lines", LogThrottle(per_window=1))
    release = threading.Event()
    store = OnlineStore()
    store.fetch_cold = lambda ids: release.wait(5) and {}  # a lock held on user_state
    store.dormant.update({"locked-1", "locked-2"})
    with caplog.at_level(logging.WARNING, logger="tipstream.thaw"):
        for user in ("locked-1", "locked-2"):
            with pytest.raises(StateUnavailable):
                await thaw.load_state(store, user)
        release.set()

        def refused(ids: list[str]) -> dict[str, bytes]:
            raise OSError("connection refused\n[SQL: SELECT ...]\n[parameters: ('locked-1',)]")  # as SQLAlchemy's

        store.fetch_cold = refused
        with pytest.raises(StateUnavailable, match="^OSError: connection refused$"):
            await thaw.load_state(store, "locked-1")
    lines = [r.getMessage() for r in caplog.records if r.name == "tipstream.thaw"]
    assert len(lines) == 2, lines  # one a minute for the two waits given up, one for the error
    assert "did not answer within 0.2 s" in lines[0] and "locked" in lines[0] and "503" in lines[0]
    assert "OSError: connection refused" in lines[1]
    assert not any("locked-" in line for line in lines)


def test_the_checkpoint_age_starts_at_the_start_not_at_1970() -> None:
    """docs/operations.md alerts on `time() - tipstream_checkpoint_ok_timestamp_seconds > 60`. The gauge read 0 from a
    start to its first checkpoint (~5 s, longer behind a large catch-up's first one), so the alert fired at
    every start, saying checkpoints fail. It starts where /readyz's `since_last_ok_s` does."""
    import time

    from app.metrics import METRICS

    METRICS.checkpoint_ok_at.set(0)
    before = time.time()
    checkpointer = Checkpointer(OnlineStore(), MemoryCheckpointStore(), every_events=1, every_s=60)
    assert before <= METRICS.checkpoint_ok_at._value.get() <= time.time()
    assert checkpointer.health()["since_last_ok_s"] < 1


async def test_a_checkpoint_cancelled_while_it_puts_its_users_in_order_keeps_them_to_save(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop during a catch-up cancels the checkpoint in progress, which may be sorting the users it took
    (`sorted_in_turns`, which yields). Handed over and not given back, they were in no checkpoint after, the
    stop's last one among them, whose positions went past their events: their states lacked them for good."""
    monkeypatch.setattr(checkpoints, "SORT_CHUNK", 2)
    store = OnlineStore()
    for i, user in enumerate("ecbda"):
        store.apply(opened(i, user))
    store.advance("SIGNALS", 5)
    target = MemoryCheckpointStore()
    checkpointer = Checkpointer(store, target, every_events=1, every_s=60)
    cut = asyncio.create_task(checkpointer.checkpoint())
    await asyncio.sleep(0)  # to its first turn of the loop: sorting the users it took
    assert store.dirty_count == 0, "the users are handed over"
    cut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cut
    assert await checkpointer.checkpoint()  # the stop's last
    assert sorted(target.states) == list("abcde") and target.positions == {"SIGNALS": 5}


async def test_a_participant_whose_snapshot_fails_leaves_the_users_to_the_next_checkpoint() -> None:
    """Its snapshot is taken after the users are handed over: failing, it must give them back, as a failed
    write does, else the next checkpoint saves positions past their events without them."""

    class FailsOnce:
        name = "fails once"
        write = staticmethod(lambda conn, snapshot: None)

        def __init__(self) -> None:
            self.calls = 0

        def snapshot(self) -> Any:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("snapshot failed")
            return None

        def saved(self, snapshot: Any) -> None:
            pass

    store = OnlineStore()
    store.apply(opened(1, "a"))
    store.advance("SIGNALS", 1)
    target = MemoryCheckpointStore()
    checkpointer = Checkpointer(store, target, every_events=1, every_s=60, participants=[FailsOnce()])
    with pytest.raises(RuntimeError):
        await checkpointer.checkpoint()
    store.apply(opened(2, "b"))
    store.advance("SIGNALS", 2)
    assert await checkpointer.checkpoint()
    assert sorted(target.states) == ["a", "b"], "a's state is saved with the positions past its event"

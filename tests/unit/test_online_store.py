"""The online store and the checkpointer's bookkeeping, without I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from app.checkpoints import Checkpointer, MemoryCheckpointStore
from streams.events import parse_event
from streams.fold import FutureEvent
from streams.store import OnlineStore


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
        while not checkpointer.failures:
            await asyncio.sleep(0.01)
        target.away = False
        await asyncio.wait_for(_until(lambda: target.positions == {"SIGNALS": 1}), timeout=10)
    finally:
        task.cancel()


async def _until(done: Any) -> None:
    while not done():
        await asyncio.sleep(0.01)


async def test_the_warm_up_loads_everyone_after_a_read_that_failed(tmp_path: Any) -> None:
    """Before, a failed read left the warm-up waiting for ever and `Service.warm` never true."""
    from app.api import create_app
    from app.settings import Settings

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
    await asyncio.wait_for(service._warm_up(checkpoint), timeout=30)
    assert checkpoint.reads == 2 and service.warm and sorted(service.store.users) == ["a", "b", "c"]

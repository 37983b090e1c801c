"""The lazy restore and the warm-up: a start takes the checkpoint's positions and user ids, and
serves and ingests at once; each user's state is read on first use (`OnlineStore.fetch_cold`) or by
the warm-up, which loads them all in the background.

Apart from `bootstrap.Service`: the warm-up reads in a worker thread and folds here in small chunks,
and its hand-over between the two is what lets a stop end it (see `_warm_once`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoints import Checkpointer
from app.collector import FreezePolicy
from app.db import briefly
from app.metrics import METRICS
from streams.log_throttle import LogThrottle, counted, since_last_line
from streams.store import OnlineStore, UnreadableState

log = logging.getLogger("tipstream")
READ_CHUNK = 1_000  # users read at a time by the worker thread
# While the warm-up loads, a line this often with how far it is, as a stream's catch-up tells its own
# (`app/catch_up.py`): a million users took 31-58 s, with nothing said between the start's line and the last.
REPORT_EVERY_S = 10.0


async def restore(store: OnlineStore, freezer: FreezePolicy, target: SqlCheckpointStore) -> dict[str, int]:
    """Lazy restore: positions and user ids now, states on first use or by the warm-up task (`warm_up`).
    Returns the positions as the database held them.

    A restart serves and ingests at once, however many users the checkpoint holds.
    """
    positions, _ = await asyncio.to_thread(target.load)
    store.positions = positions
    restored = dict(positions)  # `positions` is changed after (the learner's, another stream's)
    store.cold = set(await asyncio.to_thread(target.user_ids))
    store.fetch_cold = target.fetch
    freezer.before_warm_up(len(store.cold))
    return restored


async def warm_up(store: OnlineStore, freezer: FreezePolicy, target: SqlCheckpointStore,
                  checkpointer: Callable[[], Checkpointer | None], *,
                  pause: Callable[[float], Awaitable[object]] = asyncio.sleep,
                  clock: Callable[[], float] = time.monotonic) -> None:
    """Load every cold user, reading in a worker thread and folding in small chunks here;
    a read that fails (the database away) is tried again, for the users still cold. A row that cannot be decoded
    is not: no retry mends it, and the store has told the service, which stops saying whose row and what to do
    (`UnreadableState`). It was retried every 30 s for good, with a warning that blamed the database."""
    started, delay = time.perf_counter(), 0.5
    progress = WarmUpProgress(len(store.cold), started)
    # The database away for as long as it lasts wrote a line per try, 30 s apart at the backoff's most: told at once,
    # then once a minute with the tries since, another kind of failure at once.
    lines, failures = LogThrottle(clock=clock), 0
    while store.cold:
        try:
            await _warm_once(store, freezer, target, progress)
            break
        except UnreadableState:
            return
        except Exception as error:  # noqa: BLE001 - users load on demand meanwhile
            failures += 1
            left_out = lines.allow(type(error))
            if left_out is not None:
                log.warning("could not load the checkpointed users (%s); %d still to load, trying again in %.1fs%s",
                            briefly(error), len(store.cold), delay,
                            since_last_line(left_out, "failed try", "failed tries"))
            await pause(delay)
            delay = min(delay * 2, 30.0)
    # Those loaded before the newest event had been seen were judged against an older one. (The
    # warm-up may end before the checkpointer exists: its first checkpoint looks then.)
    if (made := checkpointer()) is not None:
        await made.rest_idle()
    METRICS.users.set(len(store.users))
    log.info("all %s loaded in %.1fs (%s left in the database)%s", counted(len(store.users), "user", "users"),
             time.perf_counter() - started, counted(len(store.dormant), "idle one", "idle ones"),
             f", after {counted(failures, 'try', 'tries')} that failed" if failures else "")


class WarmUpProgress:
    """The warm-up's line every `REPORT_EVERY_S`: users loaded (by it or on demand) of those the start found cold,
    the rate and the time left."""

    def __init__(self, cold: int, started: float) -> None:
        self.cold, self.started = cold, started
        self.next_report = started + REPORT_EVERY_S

    def loaded(self, still_cold: int, now: float) -> str | None:
        """The line to log now (None: not yet, or all loaded, which the warm-up's last line tells)."""
        if now < self.next_report or not still_cold:
            return None
        self.next_report = now + REPORT_EVERY_S
        done = self.cold - still_cold
        rate = done / max(now - self.started, 1e-9)
        return (f"loading the checkpointed users: {done:,} of {self.cold:,} loaded ({rate:,.0f} users/s, about "
                f"{still_cold / max(rate, 1e-9):,.0f} s left)")


async def _warm_once(store: OnlineStore, freezer: FreezePolicy, target: SqlCheckpointStore,
                     progress: WarmUpProgress | None = None) -> None:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue[list[tuple[str, bytes]]](maxsize=4)
    # Set when this side stops taking chunks (a stop during the warm-up): the reader then puts no more.
    # It used to wait for room in the full queue for ever, and the process, whose end waits for its
    # worker threads, never exited after a SIGTERM in the first seconds of a large restart.
    abandoned = threading.Event()

    def put(chunk: list[tuple[str, bytes]]) -> None:
        if not abandoned.is_set():
            asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()

    def read() -> None:
        try:
            chunk: list[tuple[str, bytes]] = []
            for row in target.states():
                chunk.append(row)
                if len(chunk) == READ_CHUNK:
                    put(chunk)
                    if abandoned.is_set():
                        return
                    chunk = []
            put(chunk)
        finally:  # the end, also of a read that failed: the loop below must not wait for ever
            put([])

    reader = asyncio.create_task(asyncio.to_thread(read))
    try:
        while chunk := await queue.get():
            for start in range(0, len(chunk), 100):
                store.warm(chunk[start : start + 100])
                await asyncio.sleep(0)
            freezer.check(store.taken_in)  # as they load: each pass visits only the newest
            if progress is not None and (line := progress.loaded(len(store.cold), time.perf_counter())) is not None:
                log.info("%s", line)
    except BaseException:
        # A stop, a start that failed (its one line said why), or a chunk that could not be folded: the
        # reader puts nothing more, and what it raises after is no news (unretrieved, asyncio printed it
        # as a traceback after the start's one line).
        abandoned.set()
        while not queue.empty():  # room for the one put that may have looked before the flag was set
            queue.get_nowait()
        reader.add_done_callback(lambda task: task.cancelled() or task.exception())
        raise
    await reader  # raises what the read raised

"""The task that writes checkpoints: when, the retries while the database is away, and what it tells.

A checkpoint is the fold state of the users changed since the last one plus the
stream positions that state reflects, written in one transaction. On start the
service resumes from those positions, whatever JetStream's acknowledgements say.
Where it is written (memory, SQL) is a checkpoint store's (`app/checkpoint_stores.py`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from app import checkpoint_failures as failures
from app import db
from app.checkpoint_rows import PositionsBehind, positions_behind
from app.checkpoint_stores import Batched, CheckpointStore, InThread, Participant
from app.metrics import METRICS
from app.periodic import woken
from app.thread_work import ThreadWork
from app.users_at_cap import HEAVY_STATE_BYTES, UsersAtCap
from streams.fold import DAY_MS
from streams.log_throttle import LogThrottle, counted, since_last_line
from streams.store import OnlineStore

if TYPE_CHECKING:
    from app.checkpoint_writer import CheckpointWriter

log = logging.getLogger("tipstream.checkpoints")
REST_CHUNK = 10_000  # users looked at per turn of the event loop when letting go of idle ones
SERIALISE_CHUNK = 50  # ~0.6 ms of the event loop per chunk
SORT_CHUNK = 20_000  # user ids sorted or merged per turn of the event loop (~10-20 ms)
# Serialised states sent to the transaction at a time: a checkpoint of more is written in batches (~5,000
# typical users each), so that its memory is a few batches', not every changed user's (6.4 GB for a million).
SAVE_BATCH_BYTES = 32 << 20
# While a checkpoint (or ingest held at a user read) waits to retry: how often it asks whether the database is back.
PROBE_EVERY_S = 0.5
# A checkpoint not committed after this long is told: a database whose server or link hangs, the kernel still
# acknowledging, is no error libpq sees, and a hang of minutes went by without a line in the log.
SLOW_CHECKPOINT_S = 30.0


class Checkpointer:
    """Writes a checkpoint every `every_events` applied events or `every_s` seconds.

    Steps of one checkpoint:
    1. Take the positions and the set of changed users from the online store, and a
       snapshot from each participant (None: nothing changed).
    2. Ask NATS when it stored the message at each position that moved (`stored_us`), so that a
       start can tell, without comparing clocks, that a stream is still the one read. Serialise
       the changed users in chunks, yielding to the event loop between chunks.
    3. Write states, positions and snapshots in one transaction, in the writer process (or a
       worker thread), the states a batch at a time as they are serialised when there are more
       than `SAVE_BATCH_BYTES` of them; then tell each participant its snapshot is safe. A user's
       state serialised after the hand-over may hold later events: a replay from the positions
       folds them again, and the fold ignores what it already holds. The transaction first reads
       the positions the database holds: older than those this service committed last (`committed`),
       the database lost commits under it (a failover, a restore), and this checkpoint would record
       newer positions without the users only those commits held. It commits nothing then, and the
       service stops (`on_lost`): a start resumes from what the database holds. A lower position that a
       checkpoint failed since the last committed one sent (set back at a start to the learner's, a stream
       read again from its start) is no loss: that commit may have landed, its answer lost.
    4. On failure, hand the users back to the store and retry with backoff: a database
       that is away delays checkpoints, it never loses events (they stay in the stream).
    5. Once per day of the log's time, let go of idle users' states (`rest_idle`).
    """

    def __init__(self, store: OnlineStore, target: CheckpointStore, every_events: int, every_s: float,
                 participants: Sequence[Participant] = (), writer: CheckpointWriter | None = None,
                 lock: asyncio.Lock | None = None, committed: dict[str, int] | None = None,
                 threads: ThreadWork | None = None) -> None:
        self.store, self.target = store, target
        self.threads = threads or ThreadWork()  # its transactions in threads, which the stop waits for
        # The positions the database holds as far as this service knows: those the start restored, then
        # each checkpoint's. Kept here, not read back: a database that lost commits would read as right.
        self.committed = dict(committed or {})
        # Per stream, the lowest position a checkpoint that failed since the last one committed sent, where lower
        # than `committed`'s (at a start, FEEDBACK's and DECISIONS' set back to where the learner resumes; a stream
        # read again from its start): its commit may have landed with its answer lost, and the database hold that
        # position by no loss.
        self._may_hold: dict[str, int] = {}
        # Told the message when the database turns out to have lost commits (`PositionsBehind`): the
        # service must stop; without it, the message is logged here.
        self.on_lost: Callable[[str], None] | None = None
        # Held from the participants' snapshots to their `saved`: anything else that snapshots them
        # (a model registration, `Lineup.snapshot_lock`) takes it too, so that an older snapshot
        # never commits after a newer one.
        self.lock = lock or asyncio.Lock()
        # writer: a process for SQL targets' transactions; without one, target.save runs in a thread.
        self.writer = writer
        self.participants = list(participants)
        # Told which users each checkpoint saved, a run of them at a time (the offline writer's set of them grows).
        self.on_saved: list[Callable[[list[str]], None]] = []
        self.every_events, self.every_s = every_events, every_s
        self.last_applied = store.applied
        # From the start, as if a checkpoint had just been written: the one restored was read back. At 0
        # until the first one, the operator's guide's alert on the gauge's age fired at every start.
        self.last_ok = time.monotonic()
        METRICS.checkpoint_ok_at.set(time.time())
        self.failures = 0
        self.last_error: str | None = None  # of the checkpoint that failed last, until one succeeds
        # When the first of the failed checkpoints since the last committed one failed: the outage's warnings
        # said each retry, and nothing said it was over.
        self._failing_since: float | None = None
        self._failed_since_ok = 0  # how many did, told with the commit that ends it
        # `run`'s warnings of a failed checkpoint: a line every 30 s (the backoff's most) for as long as the database
        # was away. An outage's first at once, then once a minute with those left out, another kind of failure at once.
        self._failure_lines = LogThrottle()
        # When the checkpoint under way began, once told as not committed after SLOW_CHECKPOINT_S
        self._slow_since: float | None = None
        self._saved_positions: dict[str, int] | None = None
        # Why this service may write no more checkpoints (another service took its database): set, a
        # checkpoint writes nothing, which would go over that service's state and positions.
        self.refused: str | None = None
        # Run before each checkpoint: on PostgreSQL, makes sure the service still holds its database lock (taken again
        # if its session ended), or sets `refused`.
        self.before_write: Callable[[], Awaitable[None]] | None = None
        # (stream, seq) -> when NATS stored that message, µs (None: not known); set by the service.
        self.stored_us: Callable[[str, int], Awaitable[int | None]] | None = None
        self._marks: dict[str, tuple[int, int]] = {}  # stream -> (seq, stored µs), of the last asked
        self._wake = asyncio.Event()
        # Users that must stay in memory though idle: the offline writer's, until its pass reads them.
        self.keep_awake: list[Callable[[str], bool]] = []
        self._rested_day: int | None = None
        self.at_cap = UsersAtCap(store)  # told the users each checkpoint saved
        self._rest_later: list[str] = []  # idle, but not saved yet or kept: looked at again next time
        self.saving = 0  # users in the checkpoint being serialised and written, if one is
        self._in_thread: InThread | None = None  # made at the first checkpoint in batches without a writer

    @property
    def uncheckpointed(self) -> int:
        return self.store.applied - self.last_applied

    def behind_because(self) -> str:
        """Why events wait for a checkpoint, for ingest's line when it holds: a catch-up that changes many
        users at once makes a checkpoint long while the database is fine (131,000 users on SQLite: 2.5-3.7 s,
        its serialising given a turn of the event loop per chunk of ingest), and the line blamed the database.
        One past SLOW_CHECKPOINT_S is told as a hang, the current state, over a failure before it: the line said
        the database answered."""
        if (hung := self._hung()) is not None:
            return hung
        if self.last_error is not None and self.last_error.startswith(("the database's disk is full",
                                                                       "the database refused it", "it failed (")):
            return f"checkpoints fail: {self.last_error}"
        if self.last_error is not None:
            return f"checkpoints fail ({self.last_error}): is the database away?"
        if self.saving:
            return (f"the checkpoint in progress, of {counted(self.saving, 'user', 'users')}, has not committed yet "
                    "(long when many users changed, as in a catch-up)")
        return "no checkpoint has saved them yet"

    def nudge(self) -> None:
        """Called by ingest after each chunk: wakes the loop once enough events are in."""
        if self.uncheckpointed >= self.every_events:
            self._wake.set()

    def wanted(self) -> None:
        """Called by ingest while it holds for checkpoints (`TIPSTREAM_MAX_UNCHECKPOINTED_EVENTS`, or the
        DECISIONS ingest's rows): a checkpoint now, another once it is done, for as long as the hold lasts.
        Left to `every_events` or `every_s`, a bound under `every_events` held ingest until the next timed
        checkpoint each time: one batch a stream per `every_s`, so a start's read-back of DECISIONS trailed
        its publishers and /readyz stayed 503. A failed checkpoint still waits out its backoff first."""
        self._wake.set()

    retry_first_s, retry_max_s = 0.5, 30.0  # the wait after a failed checkpoint, doubling up to the max

    async def run(self) -> None:
        backoff = self.retry_first_s
        retrying = False
        while True:
            if not retrying:  # a retry comes after its backoff, not a further `every_s` later, as it said
                await woken(self._wake, self.every_s)
            self._wake.clear()
            retrying = False
            try:
                await self.checkpoint()
                backoff = self.retry_first_s
            except asyncio.CancelledError:
                raise
            except PositionsBehind:  # told (`on_lost`); a retry would find the same
                return
            except Exception as error:  # noqa: BLE001 - any database error is retried
                self.failures += 1
                METRICS.checkpoint_failures.inc()
                setting = db.refused_by_setting(error, self._user())
                left_out = self._failure_lines.allow(failures.kind(error, setting))
                more = since_last_line(left_out, "failed checkpoint", "failed checkpoints")
                if left_out is not None:
                    failures.tell(error, setting, backoff, more, self._url())
                await self.wait_to_retry(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                retrying = True

    def _failing_ended(self, what: str, saved: str) -> None:
        """The outage's warnings were the last word: `what` says it is over, with how many failed and since when."""
        if self._failing_since is None:
            return
        failed = ("the one that failed" if self._failed_since_ok == 1
                  else f"the first of the {self._failed_since_ok:,} that failed")
        log.info("%s (%s did %.0f s ago): %s", what, failed, time.monotonic() - self._failing_since, saved)
        self._failing_since, self._failed_since_ok = None, 0
        self._failure_lines.clear()  # the next outage's first line comes at once

    def _user(self) -> str | None:
        engine = getattr(self.target, "engine", None)
        return engine.url.username if engine is not None else None

    def _url(self) -> Any:
        engine = getattr(self.target, "engine", None)
        return engine.url if engine is not None else "postgresql://"

    def health(self) -> dict[str, Any]:
        """For /readyz: whether the last checkpoint succeeded, and how long ago one did (or found
        nothing to save: an idle service is not behind). A database that hangs raises no error: the
        checkpoint waiting on it past SLOW_CHECKPOINT_S is told as one, or `ok` stayed true for minutes."""
        error = self._hung() or self.last_error  # the current state, over a failure before it
        return {"ok": error is None, "last_error": error,
                "since_last_ok_s": round(time.monotonic() - self.last_ok, 1)}

    async def wait_to_retry(self, backoff_s: float,
                            pause: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """`backoff_s`, cut short once the database answers again: waited out whole, it kept /score
        answering 503 (its decisions' rows wait for a checkpoint) up to 30 s after the database was
        back, and ingest held at a user's state it could not read (`pause`: its own) held the stream
        up to 10 s. A database that answers at once failed on something else: the whole wait then."""
        # The probes run in asyncio's threads, not `self.threads`, which the stop waits for: a probe writes nothing
        # that could land after the stop lets go of the database. One a database that hangs holds (to libpq's
        # connect_timeout, 10 s) is left by the stop's cancel at once; only the event loop's close at the exit waits
        # for its end, which comes before that of the stop's own later connect to that database (its last checkpoint).
        if await asyncio.to_thread(self.target.reachable):
            await pause(backoff_s)
            return
        deadline = time.monotonic() + backoff_s
        while (left := deadline - time.monotonic()) > 0:
            await pause(min(PROBE_EVERY_S, left))
            if await asyncio.to_thread(self.target.reachable):
                return

    def _succeeded(self) -> None:
        self.last_ok, self.last_error = time.monotonic(), None
        METRICS.checkpoint_ok_at.set(time.time())

    async def checkpoint(self) -> bool:
        """One checkpoint; False when nothing changed since the last (or `refused`)."""
        async with self.lock:
            started = time.monotonic()
            slow = asyncio.get_running_loop().call_later(SLOW_CHECKPOINT_S, self._tell_slow, started)
            try:
                if self.before_write is not None and self.refused is None:
                    await self.before_write()  # the lock's check waits for a database that hangs, as the save does
                if self.refused is not None:
                    self.last_error = self.refused
                    return False
                saved = await self._checkpoint()
                if self._slow_since is not None:
                    log.info("the checkpoint that had not committed after %.0f s committed, %.0f s after it began",
                             SLOW_CHECKPOINT_S, time.monotonic() - started)
                return saved
            except PositionsBehind as behind:
                # No checkpoint from now on, nor a last one at the stop: each would commit the same hole.
                self.refused = self.last_error = ("the database lost checkpoints this service had committed (its "
                                                  "stream positions went back)")
                METRICS.checkpoint_failures.inc()
                if self.on_lost is not None:
                    self.on_lost(str(behind))
                else:
                    log.error("%s", behind)
                raise
            except Exception as error:  # also those asked for outside `run` (before a card reads the log)
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                self._failed_since_ok += 1
                self.last_error = failures.summary(error, self._url())
                raise
            finally:
                slow.cancel()
                self._slow_since = None

    def _hung(self) -> str | None:
        """Why the checkpoint under way has not committed, once past SLOW_CHECKPOINT_S (None before)."""
        if self._slow_since is None:
            return None
        return (f"a checkpoint has not committed after {time.monotonic() - self._slow_since:.0f} s "
                f"({self._saving()}): the database does not answer, unless it saves very many users")

    def _saving(self) -> str:
        return f"saving {counted(self.saving, 'user', 'users')}" if self.saving else "not writing yet"

    def _tell_slow(self, started: float) -> None:
        self._slow_since = started
        log.warning("a checkpoint has not committed after %.0f s (%s): the database does not answer (a server or "
                    "link that hangs, which no connection timeout ends, or a lock held on a table: PostgreSQL's "
                    "pg_stat_activity names the statement and what it waits for), unless it saves very many users. It "
                    "goes on waiting; events are safe in the streams, and /score answers meanwhile.",
                    SLOW_CHECKPOINT_S, self._saving())

    async def _checkpoint(self) -> bool:
        for participant in self.participants:  # work `snapshot` would do in one turn of the loop, in turns
            prepare = getattr(participant, "before_snapshot", None)
            if prepare is not None:
                await prepare()
        applied = self.store.applied
        positions, users = self.store.begin_checkpoint(ordered=False)
        try:
            users = await sorted_in_turns(users)
            extras = [(p, p.snapshot()) for p in self.participants]
        except BaseException:
            # Handed over, and not given back: a stop cancelling the sort, or a snapshot that failed, left these
            # users in no checkpoint after, whose positions went past their events (their states lacked them).
            self.store.abort_checkpoint(users)
            raise
        if not users and positions == self._saved_positions and all(snap is None for _, snap in extras):
            # In step with the database: as good as a save. After failures that handed no users back (the lock's
            # check failing, the service idle), they were else told over by the next commit, hours on maybe.
            self._failing_ended("checkpoints go through again", "nothing changed meanwhile")
            self._succeeded()
            await self._rest_idle()  # the first time after a start: those the warm-up loaded early
            return False
        started = time.perf_counter()
        self.saving = len(users)
        try:
            marks = await self._stored_marks(positions)
            heavy: list[str] = []
            batches = self._serialised(users, heavy)
            first = await anext(batches, [])
            second = await anext(batches, None)
            committed = {stream: min(seq, self._may_hold.get(stream, seq)) for stream, seq in self.committed.items()}
            if second is not None:
                await self._save_in_batches(first, second, batches, positions, extras, marks, committed)
            elif self.writer is not None:
                await self.writer.save(positions, first, [(p.write, snap) for p, snap in extras], marks, committed)
            else:
                await self.threads.run("a checkpoint", self.target.save, positions, first, extras, marks, committed)
        except BaseException as error:
            self.store.abort_checkpoint(users)
            if not isinstance(error, PositionsBehind):
                for stream, (_, sent) in positions_behind(self.committed, positions).items():
                    if sent is not None:  # a stream it has no position for: it wrote none
                        self._may_hold[stream] = min(sent, self._may_hold.get(stream, sent))
            raise
        finally:
            self.saving = 0
        self._saved_positions = positions
        self.committed.update(positions)
        self._may_hold.clear()
        for participant, snapshot in extras:
            if snapshot is not None:
                participant.saved(snapshot)
        self.last_applied = applied
        self._failing_ended("checkpoints commit again", f"the {len(users):,} users changed meanwhile are saved"
                            if len(users) != 1 else "the 1 user changed meanwhile is saved")
        self._succeeded()
        if heavy or self.at_cap.users:
            self.at_cap.count(users, heavy)
        METRICS.checkpoint_seconds.observe(time.perf_counter() - started)
        METRICS.checkpoint_users.inc(len(users))
        for stream, seq in positions.items():
            METRICS.checkpoint_position.labels(stream).set(seq)
        for start in range(0, max(len(users), 1), SORT_CHUNK):  # told all at once, 1M users held the loop 0.1-0.2 s
            if start:
                await asyncio.sleep(0)
            for listener in self.on_saved:
                listener(users[start : start + SORT_CHUNK])
        await self._rest_idle()
        return True

    async def _serialised(self, users: list[str], heavy: list[str]) -> AsyncIterator[list[tuple[str, bytes]]]:
        """The users' states, serialised a chunk per turn of the event loop, in batches of `SAVE_BATCH_BYTES` or
        so; those large enough to hold a kind at the fold's cap go to `heavy`."""
        batch: list[tuple[str, bytes]] = []
        size = 0
        for start in range(0, len(users), SERIALISE_CHUNK):
            chunk = [(u, self.store.users[u].to_bytes()) for u in users[start : start + SERIALISE_CHUNK]]
            for user_id, blob in chunk:
                size += len(blob)
                if len(blob) >= HEAVY_STATE_BYTES:
                    heavy.append(user_id)
            batch.extend(chunk)
            if size >= SAVE_BATCH_BYTES:
                yield batch
                batch, size = [], 0
            await asyncio.sleep(0)
        if batch:
            yield batch

    async def _save_in_batches(self, first: list[tuple[str, bytes]], second: list[tuple[str, bytes]],
                               batches: AsyncIterator[list[tuple[str, bytes]]], positions: dict[str, int],
                               extras: list[tuple[Participant, Any]], marks: dict[str, int],
                               committed: dict[str, int]) -> None:
        """`save`, a batch at a time into one transaction: the service holds three batches at most (one being
        written, the next, one being serialised), where it held every changed user's state to the commit."""
        writer: Batched
        if self.writer is not None:
            writer, opening = self.writer, [(p.write, snapshot) for p, snapshot in extras]
        else:
            writer, opening = self._in_thread or InThread(self.target, self.threads), extras
            self._in_thread = writer
        call = asyncio.ensure_future(writer.begin(opening, committed, first))
        try:
            batch = second
            while (following := await anext(batches, None)) is not None:  # serialised while the one before is written
                await call
                call = asyncio.ensure_future(writer.add(batch))
                batch = following
            await call
            await writer.commit(positions, marks, batch)
        except BaseException:
            call.cancel()
            writer.rollback()
            raise

    async def _stored_marks(self, positions: dict[str, int]) -> dict[str, int]:
        """When NATS stored the message at each position: asked once per position it moves to."""
        if self.stored_us is None:
            return {}
        moved = [(stream, seq) for stream, seq in positions.items()
                 if seq > 0 and self._marks.get(stream, (0, 0))[0] != seq]
        for (stream, seq), mark in zip(moved, await asyncio.gather(*(self.stored_us(s, q) for s, q in moved)),
                                       strict=True):
            if mark is None:
                self._marks.pop(stream, None)
            else:
                self._marks[stream] = (seq, mark)
        return {stream: mark for stream, (seq, mark) in self._marks.items() if positions.get(stream) == seq}

    def forget_stored(self, stream: str) -> None:
        """The stream is another now (created again, or an older copy): its positions' stored times are
        asked again, though a position comes back to a sequence asked before."""
        self._marks.pop(stream, None)

    async def rest_idle(self) -> int:
        """`_rest_idle` now, whatever the day (the warm-up has loaded every user)."""
        async with self.lock:
            self._rested_day = None
            return await self._rest_idle()

    async def _rest_idle(self) -> int:
        """Let go of the states of users idle for `idle_days` of the log's time (their newest event
        that far behind the newest folded), once per day of it: a user who left kept up to 30 days
        of events in memory for good. Their state is in the database; their next event or request
        loads it back (`OnlineStore.state_of`).

        Run holding the lock, after a save committed: a user not changed since that checkpoint's
        hand-over is in the database as it is in memory. The look goes over every user, a chunk
        at a time, yielding to the loop between chunks; an idle user not saved yet or kept is looked
        at again at the next checkpoint, alone."""
        store = self.store
        day = store.newest_ms // DAY_MS
        if day != self._rested_day:
            self._rested_day = day
            ids = list(store.users)
        elif self._rest_later:
            ids = self._rest_later
        else:
            return 0
        keep = self.keep_awake
        later: list[str] = []
        rested = 0
        for start in range(0, len(ids), REST_CHUNK):
            rested += store.rest(ids[start : start + REST_CHUNK], lambda user: any(k(user) for k in keep), later)
            await asyncio.sleep(0)
        self._rest_later = later
        if rested:
            log.info("%s let go of from memory (no event for %g days); %d held, %d in the database only",
                     counted(rested, "idle user", "idle users"), store.idle_days, len(store.users), len(store.dormant))
        return rested


async def sorted_in_turns(items: list[str]) -> list[str]:
    """`sorted(items)`, yielding to the event loop between runs of `SORT_CHUNK`: a checkpoint after a catch-up
    that changed 1M users sorted them in one call, which held every request and stream 0.47 s. Rows are written
    in key order (an index's pages in turn) and the saved users are searched (`UsersAtCap.count`), so the order stays."""
    if len(items) <= SORT_CHUNK:
        return sorted(items)
    runs = []
    for start in range(0, len(items), SORT_CHUNK):
        runs.append(sorted(items[start : start + SORT_CHUNK]))
        await asyncio.sleep(0)
    merged, ordered = heapq.merge(*runs), []
    while piece := list(itertools.islice(merged, SORT_CHUNK)):
        ordered.extend(piece)
        await asyncio.sleep(0)
    return ordered


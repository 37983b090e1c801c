"""The offline store: `user_features`, one row per user, for training and analytics.

Rows are written at the cadence of `TIPSTREAM_OFFLINE_FEATURES_EVERY_S`, for the users
that changed, with every feature evaluated at the user's newest event: the same
definitions serving uses, so there is no train/serve skew. `fallbacks` names the features
that hold their fallback, not the user's data, as serving flags them.

Steps of one pass:
1. Take the users saved by checkpoints since the last pass. Those whose state is in the
   checkpoint only (idle ones let go of, cold ones after a start) are read from it, in a
   worker thread: memory holds no newer state of theirs.
2. Evaluate their features in small chunks, pausing between chunks so the pass uses at most
   a tenth of the event loop. A user whose row cannot be computed is logged and kept for the
   next pass; the others' rows are still written. One whose checkpointed state cannot be decoded
   stops the service, as wherever it reads that row (`streams.store.UnreadableState`).
3. Upsert the rows in batches, in a worker thread; on failure, keep the users for the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, or_, select

from app import db
from app.metrics import METRICS
from app.periodic import every
from app.thread_work import ThreadWork
from streams.features import evaluate
from streams.store import OnlineStore, UnreadableState

log = logging.getLogger("tipstream.offline")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EVALUATE_CHUNK = 5  # ~1.5 ms of the event loop per chunk
CPU_SHARE = 0.1
WRITE_BATCH = 1_000
# A stop writes the user_features rows of the users saved since the last pass for this long at most, a batch
# at a time; the next start finds the rest (`users_behind`) and writes them.
LAST_PASS_S = 5.0
LAST_PASS_BATCH = 1_000  # users: ~0.1 s of evaluating and writing
SAVED_CHUNK = 20_000  # users behind handed to the passes per turn of the event loop (~3 ms)


def feature_row(user_id: str, store: OnlineStore, now: datetime,
                saved: dict[str, bytes] | None = None) -> dict[str, Any] | None:
    """The user's row from their state in memory, else from `saved` (their checkpointed state); UnreadableState
    (the service told, `OnlineStore.decoded`) when that row is damaged."""
    state = store.users.get(user_id)
    if state is None and saved is not None and user_id in saved:
        # Read as the store reads it: decoded here, a damaged row was a ValueError "tried again next pass" every
        # pass for good, a warning a minute, where read by an event, a request or the warm-up it stops the service
        # naming the user and the fixes.
        state = store.decoded(user_id, saved[user_id])
    if state is None:
        return None
    values = evaluate(state, state.newest_ms)
    return {
        "user_id": user_id,
        # In integers: float seconds hold no whole microseconds far from 1970 (an event in 1500 read .518999
        # for .519), and `?at=` such an `as_of` left the newest event out.
        "as_of": EPOCH + timedelta(milliseconds=state.newest_ms),
        "features": {name: value.value for name, value in values.items()},
        "updated_at": now,
        "fallbacks": sorted(name for name, value in values.items() if value.fallback),
    }


def users_behind(engine: Engine) -> list[str]:
    """Users whose state a checkpoint saved after their `user_features` row was written, or who have
    none: the writer knows the users saved since its last pass in memory only, so a crash (kill -9)
    lost them, and their rows stayed older than their state until their next event. And those whose
    row has no `fallbacks` (written before schema 0006): an idle user's next pass never came."""
    state, features = db.user_state, db.user_features
    query = (select(state.c.user_id)
             .select_from(state.outerjoin(features, features.c.user_id == state.c.user_id))
             .where(or_(features.c.user_id.is_(None), features.c.updated_at < state.c.updated_at,
                        features.c.fallbacks.is_(None))))
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


class OfflineFeatureWriter:
    def __init__(self, store: OnlineStore, engine: Engine, every_s: float, threads: ThreadWork | None = None) -> None:
        self.store, self.engine, self.every_s = store, engine, every_s
        self.threads = threads or ThreadWork()  # its writes, which the stop waits for
        self.pending: set[str] = set()
        self._in_pass: set[str] = set()
        self.rows_written = 0
        self.refused: str | None = None  # why the database is no longer this service's: it writes no row
        # Awaited before each batch's write (the service's lock made sure of, `refused` set if another took it).
        self.before_write: Callable[[], Awaitable[None]] | None = None
        # Users forgotten since the pass under way began: a row it computed before, written after their
        # row was deleted, would bring their features back. A pass begun later computes none of theirs
        # (they left `pending`), so each pass starts it afresh: kept since the start, every request to
        # forget stayed in memory until a restart.
        self.forgotten: set[str] = set()
        self._writing: asyncio.Future[None] | None = None  # a pass's rows on their way to the database
        # Users forgotten while `find_behind` reads: its answer, read before their rows went, names them still.
        self._forgotten_while_finding: set[str] | None = None

    def holds(self, user_id: str) -> bool:
        """Whether a pass is still to read this user's state: it must stay in memory (it reads no other)."""
        return user_id in self.pending or user_id in self._in_pass

    def saved(self, users: list[str]) -> None:
        """Called after each checkpoint with the users it saved."""
        self.pending.update(users)
        METRICS.offline_pending.set(len(self.pending))

    def forget(self, user_id: str) -> None:
        """A user to forget: no pass writes a row of theirs computed before now."""
        self.pending.discard(user_id)
        self._in_pass.discard(user_id)
        self.forgotten.add(user_id)
        if self._forgotten_while_finding is not None:
            self._forgotten_while_finding.add(user_id)

    async def find_behind(self) -> None:
        """Hand the passes the users whose row is older than their state (`users_behind`).

        Run beside the service, not in its start: the query scans every `user_state` row, and with 1M users
        on SQLite it held the start 12.7 s (the HTTP port opened after it), the warm-up reading meanwhile.
        """
        forgotten = self._forgotten_while_finding = set()
        try:
            try:
                users = await asyncio.to_thread(users_behind, self.engine)
            except Exception as error:  # noqa: BLE001 - the rows catch up at the users' next events
                log.warning("user_features: could not look for rows older than their users' state (%s); they are "
                            "written at those users' next events, or found at the next start", db.briefly(error))
                return
            # A chunk a turn of the event loop: after a crash that followed a rebuild nearly every user is behind,
            # and 979,000 handed over at once held it ~0.14 s.
            for start in range(0, len(users), SAVED_CHUNK):
                if start:
                    await asyncio.sleep(0)
                self.saved([user_id for user_id in users[start : start + SAVED_CHUNK] if user_id not in forgotten])
        finally:
            self._forgotten_while_finding = None

    async def written(self) -> None:
        """Until the rows a pass is writing are in: filtered before a user was forgotten, a row of theirs
        written in a later batch's transaction than the one deleting theirs would be left behind."""
        writing = self._writing
        if writing is not None and not writing.done():
            await asyncio.wait({writing})

    async def run(self) -> None:
        await every(self.every_s, self.write_pass, "a user_features pass")

    async def write_pass(self, pause: bool = True, users: list[str] | None = None) -> int:
        """`pause=False`: the whole event loop's time (at a stop, nothing else needs it). `users`: those of
        the pending users only, the rest staying pending; else every one.

        Each batch's rows are written once computed. A pass held every row until its end, and sorted its
        users first: after a restart that found 979,000 users behind, the sort stalled the event loop 0.6-1.2 s,
        and the pass (~40 minutes at its tenth of the loop) held a million rows and wrote none until then."""
        if self.refused is not None:  # another service's rows, from its fresher state, would be overwritten
            return 0
        if users is None:  # handed over, not copied (a copy of a million ids is ~0.1 s of the loop)
            self._in_pass, self.pending = self.pending, set()
            users = list(self._in_pass)
        else:
            self.pending.difference_update(users)
            self._in_pass = set(users)
        self.forgotten = set()
        now = datetime.now(UTC)
        # Floored to the millisecond, as SQLite keeps it (`db.upsert`, rounded there): rounded up, a row read as
        # newer than a state a checkpoint saved within that half millisecond after, and `users_behind` passed it over.
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        failed: list[str] = []
        unread: set[str] = set()
        written = batch_start = 0
        try:
            for batch_start in range(0, len(users), WRITE_BATCH):
                batch = sorted(users[batch_start : batch_start + WRITE_BATCH])  # rows written in key order
                rows = await self._rows(batch, now, await self._checkpointed(batch, unread), failed, unread, pause)
                if self.forgotten:
                    rows = [row for row in rows
                            if row["user_id"] not in self.forgotten or row["user_id"] in self._in_pass]
                if self.before_write is not None and self.refused is None:
                    await self.before_write()
                if self.refused is not None:  # the lock lost during the pass: the rest stay pending, unwritten
                    self.pending.update(users[batch_start:])
                    break
                self._writing = writing = asyncio.ensure_future(self.threads.run("a user_features write", self._write, rows))
                await writing
                written += len(rows)
                self._in_pass.difference_update(batch)  # read: they may leave memory
        except BaseException:
            self.pending.update(users[batch_start:])
            raise
        finally:
            self._in_pass = set()
            self.pending.update(failed)
            self.pending.update(unread)
            METRICS.offline_pending.set(len(self.pending))
        if len(failed) > 1:
            log.warning("user_features: %d users' rows could not be computed this pass", len(failed))
        self.rows_written += written
        return written

    async def _rows(self, batch: list[str], now: datetime, saved: dict[str, bytes], failed: list[str],
                    unread: set[str], pause: bool) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(batch), EVALUATE_CHUNK):
            began = time.perf_counter()
            for user_id in batch[start : start + EVALUATE_CHUNK]:
                if user_id in unread:
                    continue  # the next pass
                try:
                    row = feature_row(user_id, self.store, now, saved)
                except UnreadableState:  # the service is told, and stops saying why: kept, as unread
                    unread.add(user_id)
                    continue
                except Exception as error:  # noqa: BLE001 - one user must not cost the others their rows
                    failed.append(user_id)
                    if len(failed) == 1:
                        log.warning("user_features: the row of %r could not be computed (%s: %s); it is "
                                    "tried again next pass", user_id, type(error).__name__, error)
                    continue
                if row is not None:
                    rows.append(row)
            # At most a tenth of the event loop: analytics must not slow ingest or the API.
            await asyncio.sleep((time.perf_counter() - began) * (1 / CPU_SHARE - 1) if pause else 0)
        return rows

    async def _checkpointed(self, users: list[str], unread: set[str]) -> dict[str, bytes]:
        """The checkpointed states of those of `users` whose state is there only (a user let go of
        while idle, or still cold after a start, whom a crash's `users_behind` handed to this pass).
        Skipped, as they were, their rows stayed older than their state until their next event,
        which an idle user may never send. Those whose read fails go to `unread`, kept for the next
        pass, as do the rest of the pass's once one read has failed."""
        store = self.store
        absent = [user_id for user_id in users if store.in_checkpoint_only(user_id)]
        if not absent or store.fetch_cold is None:
            return {}
        if not unread:
            try:
                return await asyncio.to_thread(store.fetch_cold, absent)
            except Exception as error:  # noqa: BLE001 - whatever the driver raises: the next pass tries again
                log.warning("user_features: the states of users held in the checkpoint only could not be read (%s); "
                            "their rows are written next pass", db.briefly(error))
        unread.update(absent)
        return {}

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for start in range(0, len(rows), WRITE_BATCH):
            with self.engine.begin() as conn:
                db.upsert(conn, db.user_features, rows[start : start + WRITE_BATCH], ["user_id"])

    async def last_pass(self) -> None:
        """The users saved since the last `user_features` pass get their rows now, a batch at a time for
        `LAST_PASS_S` at most. Once a rebuild or a catch-up has saved every user, a whole pass is
        long (5.3 s of a 5.7 s stop at 60,000 users); waited for whole, it held the stop up to 30 s, and
        then wrote nothing. The rows left are those the next start finds older than their users' state
        (`users_behind`) and writes: a stop only makes them current sooner."""
        if not self.pending or self.refused is not None:
            return
        # Not sorted: each batch's rows are (`write_pass`). A sort of every pending id, before the bound began,
        # held the loop and lengthened the stop 0.16 s with 300,000 users (8 ms for the list).
        users = list(self.pending)
        began = time.monotonic()
        deadline = began + LAST_PASS_S
        done = 0
        try:
            for start in range(0, len(users), LAST_PASS_BATCH):
                batch = users[start : start + LAST_PASS_BATCH]
                # A batch gets a second at least: the database slow to answer, rather than the bound spent.
                await asyncio.wait_for(self.write_pass(pause=False, users=batch),
                                       timeout=max(deadline - time.monotonic(), 1.0))
                done += len(batch)
                if time.monotonic() >= deadline:
                    break
        except Exception as error:  # noqa: BLE001 - the database away
            log.warning("user_features: the last pass did not finish (%s)", db.briefly(error, self.engine.url))
        left = len(users) - done
        if left:
            log.info("stopping: user_features rows of %d users written in %.1f s; the next start writes those of "
                     "the other %d", done, time.monotonic() - began, left)
        else:
            log.info("stopping: user_features rows of %d users written in %.1f s", done, time.monotonic() - began)

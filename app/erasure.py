"""Forgetting a user: a request to erase what tipstream holds of them (the right to erasure).

Each request is a row of `erasures`, its `status` moving on as each step is done:

1. `requested`: saved before anything else, so that a stop or a crash never loses it; the service
   takes it up at once, or at its next start.
2. Once ingest has folded what SIGNALS and FEEDBACK held when the request was taken up (a service
   catching up would fold their older events after it), holding the checkpoint lock, the learner's
   join cache is looked over for their decisions (`Learner.decisions_to_forget`, in turns). Then,
   between two chunks of ingest (no stream's chunk half folded) and with nothing waited for until
   the bounds are read, acted on as of then (`dropped_at`): the user's state goes from memory with
   /score's cache of it (`OnlineStore.forget`), and from the learner their decisions (also those /score
   served during the look, `Learner.served_since`), their reactions waiting for one,
   and their own features in every model that learns (`Learner.forget_user`; a version being
   registered then, trained over their rows, as it joins them: `Lineup.forget_user`). `bounds`: the
   stream positions read to then.
3. A checkpoint at once deletes their `user_state`, `user_features` and `tip_scores` rows (those of
   decisions served until step 2, by the time in the decision's id, not its `ts`: the caller's
   `context.now`, `checkpoint_rows.delete_decisions_served_until`) and marks the request `dropped`, with its bounds
   (and the ids of their decisions then on their way to JetStream), in the transaction that saves positions past them
   (`checkpoint_rows.write_erasures`): a restart never folds those events again.
4. Their messages up to the bounds are deleted from SIGNALS, FEEDBACK, DECISIONS and the DLQ
   (`streams.scrub`), so a rebuild from the log never brings them back (and past DECISIONS' bound, their
   decisions /score had queued for JetStream at step 2, once stored, by their ids: `ON_THE_WAY`; those held aside
   for a limit, never stored, are let go); then the `tip_scores` rows
   of their decisions acknowledged meanwhile, and their own features in the saved bytes of the
   versions that no longer learn (retired ones). A version whose bytes cannot be decoded stops this step, said
   once (`UnreadableModel`): the request stays `dropped` until a start after the fix (a restore, a rebuild).
5. `done`, with a report of what went where.

A request whose row cannot be decoded (its `bounds` or `report`, cut short or overwritten) is set aside, said once
(`damaged_request`): the others go on. Asked for again, the row is replaced and the user taken through every step.

What is theirs and stays: what every user shares in the models (the intercept, the tips' weights,
the popularity prior) keeps what their rewards taught it; the `erasures` row, the record that the
request was made and done. Events of theirs read after step 2 are new: the user came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from nats.errors import TimeoutError as NatsTimeoutError
from sqlalchemy import Table, and_, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from app import db
from app.checkpoint_rows import delete_decisions_served_until, utc_ms, write_erasures
from app.decision_ids import decision_time_ms
from app.lineup import DatabaseNotOurs
from app.metrics import METRICS
from app.periodic import woken
from app.registry_store import UnreadableModel, decoded_model
from app.thread_work import ThreadWork
from streams import jetstream as jsx
from streams.scrub import ScrubError, belongs, delete_all, no_answer, read_through, spellings
from streams.store import OnlineStore

log = logging.getLogger("tipstream.erasure")
POLL_S = 30.0  # requests are also looked for this often: one saved while the database was away
RETRY_MAX_S = 60.0
PROGRESS_EVERY_S = 10.0
# The DLQ first: a copy cut before its user's id is told theirs by its original (`scrub.cut_copy_of`), which
# must still be in its stream.
SCRUBBED = (jsx.DLQ.name, jsx.SIGNALS.name, jsx.FEEDBACK.name, jsx.DECISIONS.name)
FOLDED = (jsx.SIGNALS.name, jsx.FEEDBACK.name)
READ_THROUGH_POLL_S = 0.02
# In `bounds`: {"ids": [...]} saved at step 3, a crash losing the publisher's queue and what it knew; "through":
# DECISIONS' last seq once they are stored (step 4).
ON_THE_WAY = "decisions_on_the_way"
ON_THE_WAY_POLL_S = 0.1  # each look copies the publisher's queue, which holds thousands while NATS is away

Scrub = Callable[..., Awaitable[Any]]
# What a request on its way is left at when the database is no longer this service's (`Eraser.ours`).
UNDONE = ("the requests to forget a user stay where they are, saved: this service stops, and the one that holds the "
          "database lock takes them on")


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite hands back no zone


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class Eraser:
    """Takes requests to forget users through the steps above; a checkpoint participant (step 3)."""

    name = "erasures"
    write = staticmethod(write_erasures)

    def __init__(self, engine: Engine, store: OnlineStore, learner: Any, *, checkpoint: Callable[[], Awaitable[Any]],
                 lock: asyncio.Lock, ingests: Sequence[Any] = (), offline: Any = None,
                 js: Any = None, scrub: Scrub | None = None,
                 learning_versions: Callable[[], set[str]] | None = None,
                 unpublished: Callable[[], Sequence[tuple[str, str, bytes]]] | None = None,
                 withdraw: Callable[[Callable[[bytes], bool]], int] | None = None,
                 let_go_held: Callable[[set[str]], list[str]] | None = None,
                 threads: ThreadWork | None = None) -> None:
        self.engine, self.store, self.learner = engine, store, learner
        self.threads = threads or ThreadWork()  # its transactions, which the stop waits for
        self.checkpoint, self.lock, self.ingests, self.offline = checkpoint, lock, ingests, offline
        self.js, self.scrub = js, scrub
        # The versions that learn, whose models the learner's snapshot saves: any other's bytes are
        # rewritten here (step 4).
        self.learning_versions = learning_versions or set
        self._dropped: list[dict[str, Any]] = []  # step 2 done, step 3 not committed yet
        # Requests not done at the last read of `erasures` (None: not read yet). With none, a failed read is only
        # the look for new ones: told as a request that "did not go through", it named one at every outage.
        self._waiting: int | None = None
        self._undone: dict[str, dict[str, Any]] = {}  # user -> the report of a step 2 whose bounds were not read
        # What /score served and JetStream has not acknowledged yet (the decision publisher's queue):
        # a user's decisions there at step 2 are stored in DECISIONS after its bound was read.
        self.unpublished = unpublished or list
        # What /score made and waits to queue (the queue full): served after step 2, not on the way then.
        self.withdraw = withdraw or (lambda made_from: 0)
        # Of those, the ones held aside until a limit is raised (the publisher's `held`): let go, never stored.
        self.let_go_held = let_go_held or (lambda decision_ids: [])
        self._wake = asyncio.Event()
        # A version's saved model the last step could not decode: no retry mends it, and the fixes (a restore, a
        # rebuild) stop the service. The requests dropped wait for the next start, which takes them again.
        self._unreadable: UnreadableModel | None = None
        self._damaged: dict[str, str] = {}  # user -> what was logged of their request's row that cannot be decoded
        # Awaited before each of its own writes (a request, its bounds, its last transaction: the service's lock made
        # sure of, `refused` set if another took it). Without, those in the 10 s before the lock's check went on over
        # the database of a service that took it meanwhile (a request marked done that one had not scrubbed).
        self.before_write: Callable[[], Awaitable[None]] | None = None
        self.refused: str | None = None  # why the database is no longer this service's: it writes nothing more

    async def ours(self, refused_then: str) -> None:
        """Before a write: the database still this service's (its lock made sure of), else DatabaseNotOurs, naming the
        lock and `refused_then` (what was left undone and where to ask instead)."""
        if self.before_write is not None and self.refused is None:
            await self.before_write()
        if self.refused is not None:
            raise DatabaseNotOurs(f"{self.refused}; {refused_then}")

    # -- requests ------------------------------------------------------------------------------

    def request(self, user_id: str, actor: str) -> dict[str, Any]:
        """Save a request to forget `user_id` (a worker thread); the row. A user asked for again (done,
        or on the way) is taken through every step again: events of theirs may have come since. The
        request done before is kept in `erasures_earlier`, the record that they were forgotten then; what
        one still on its way has done so far stays in the report (`_drop` adds the new pass's to it; asked
        for between steps 2 and 3, step 3 gives it what step 2 did: `write_erasures`)."""
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as SQLite keeps it: answered as read back
        row = {"user_id": user_id, "status": "requested", "requested_at": now, "requested_by": actor,
               "dropped_at": None, "bounds": None, "report": None, "done_at": None}
        with self.engine.begin() as conn:
            # Read column by column: one whose JSON is damaged failed the request, and asking again is a fix for it.
            before = next(iter(read_rows(conn, db.erasures, db.erasures.c.user_id == user_id, for_update=True)), None)
            if before is not None and before["status"] == "done":
                # Copied by the database: a column `read_rows` could not decode (None in `before`) moves with the text
                # it holds, where it went as null, and nothing said what it had held.
                names = [column.name for column in db.erasures_earlier.columns]
                conn.execute(insert(db.erasures_earlier).from_select(
                    names, select(*(db.erasures.c[name] for name in names)).where(db.erasures.c.user_id == user_id)))
            elif before is not None:
                # Still on its way: what it has done (their state dropped, say) is this request's too. The pass
                # starting over finds it gone, and its report said `"state": false` of a user it had forgotten.
                # (None if it is damaged: the new pass counts only what it finds.)
                row["report"] = before["report"]
            db.upsert(conn, db.erasures, [row], ["user_id"])
        return {**_shown(row), "earlier": self._earlier(user_id)}

    def wake(self) -> None:
        self._wake.set()

    def status(self, user_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = next(iter(read_rows(conn, db.erasures, db.erasures.c.user_id == user_id)), None)
        if row is None:
            return None
        damaged = row.get(DAMAGED)
        answer = {**_noted(row), "earlier": self._earlier(user_id)}
        if damaged is not None and row["status"] != "done":  # set aside for good: the fix is the operator's
            answer["stuck"] = damaged_request(user_id, damaged)
        elif row["status"] == "dropped" and self._unreadable is not None:  # else 'dropped' for good, no word why
            answer["stuck"] = f"{self._unreadable}, then start tipstream again"
        return answer

    def _earlier(self, user_id: str) -> list[dict[str, Any]]:
        """The requests to forget `user_id` done before the one in `erasures`, oldest first."""
        return [_noted(row) for row in earlier_erasures(self.engine, user_id)]

    def resume(self) -> None:
        """At the start, before DECISIONS is read back: the users whose messages are still to delete are
        forgotten by the learner as of then (their decisions read back are not held again)."""
        self.learner.erasing.update(self._dropped_at(done_too=False))

    def _dropped_at(self, done_too: bool) -> dict[str, int]:
        """Users whose state was dropped (step 2 done; `done_too`: and requests done) -> when, ms."""
        table = db.erasures
        wanted = table.c.dropped_at.is_not(None) if done_too else table.c.status == "dropped"
        with self.engine.connect() as conn:
            return {user_id: utc_ms(at) for user_id, at in conn.execute(select(table.c.user_id, table.c.dropped_at)
                                                                        .where(wanted)).all()}

    def without_forgotten(self, spooled: list[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
        """Of the decisions the last stop spooled (`decision_spool`), those not made for a user forgotten
        since, before the request was acted on: published now, they would land in DECISIONS past the
        messages deleted, and stay there."""
        if not spooled:
            return spooled
        until = self._dropped_at(done_too=True)
        if not until:
            return spooled
        kept = []
        for item in spooled:
            decision = orjson.loads(item[2])
            forgotten_at = until.get(decision.get("user_id"))
            if forgotten_at is None or (decision_time_ms(item[1]) or 0) > forgotten_at:
                kept.append(item)
        return kept

    # -- the checkpoint participant (step 3) --------------------------------------------------------

    async def before_snapshot(self) -> None:
        # A `user_features` pass writing rows it computed before step 2 (a batch per transaction) would
        # put a forgotten user's row back after step 3 deleted it: step 3 comes after it.
        if self._dropped and self.offline is not None:
            await self.offline.written()

    def snapshot(self) -> list[dict[str, Any]] | None:
        return list(self._dropped) or None

    def saved(self, snapshot: list[dict[str, Any]]) -> None:
        self._dropped = [entry for entry in self._dropped if not any(entry is saved for saved in snapshot)]
        self._wake.set()

    # -- the work --------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 1.0
        while True:
            try:
                await self.work()
                backoff = 1.0
                timeout = POLL_S
            except asyncio.CancelledError:
                raise
            except DatabaseNotOurs as error:  # tried again, it said "trying again" until the stop, which is at once
                log.warning("forgetting stops: %s", error)
                return
            except Exception as error:  # noqa: BLE001 - the database or NATS away: the request waits, saved
                # A checkpoint saved, or another request, wakes it sooner: the database answers again.
                # The first line: SQLAlchemy's next are the statement and more, lines a log reader takes for others.
                if self._waiting == 0 and not self._dropped:
                    log.warning("cannot look for requests to forget a user (%s); none was waiting at the last look. "
                                "Looking again in %.0f s, or at the next checkpoint.",
                                db.briefly(error, self.engine.url), backoff)
                else:
                    log.warning("forgetting a user did not go through (%s); trying again in %.0f s, or at the next "
                                "checkpoint. The request is saved and goes on from the step it reached.",
                                db.briefly(error, self.engine.url), backoff)
                timeout, backoff = backoff, min(backoff * 2, RETRY_MAX_S)
            await woken(self._wake, timeout)
            self._wake.clear()

    async def work(self) -> int:
        """Take every request saved through every step it has still to go; how many were done."""
        rows = await asyncio.to_thread(self._unfinished)
        METRICS.erasures_unfinished.set(len(rows))
        unfinished, rows = len(rows), self._set_aside(rows)
        waiting = {entry["user_id"] for entry in self._dropped}
        requested = [row for row in rows if row["status"] == "requested" and row["user_id"] not in waiting]
        if requested:
            await self._drop(requested)
        if self._dropped:
            await self.checkpoint()
            rows = await asyncio.to_thread(self._unfinished)
            unfinished, rows = len(rows), self._set_aside(rows)
        # Users dropped together share their bounds: their messages are found in one pass over the
        # streams (a scan of millions of messages each), and the report counts that pass's.
        together: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["status"] == "dropped":
                together.setdefault(orjson.dumps(row["bounds"], option=orjson.OPT_SORT_KEYS).decode(), []).append(row)
        done = 0
        for group in together.values():
            if self._unreadable is not None:  # said once: scanned again, every stream's messages read for nothing
                break
            if await self._delete_messages(group):
                done += len(group)
        METRICS.erasures_unfinished.set(unfinished - done)
        return done

    def _unfinished(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = read_rows(conn, db.erasures, db.erasures.c.status != "done")
        self._waiting = len(rows)
        return rows

    def _set_aside(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Of `rows`, those that can be taken on; each whose row cannot be decoded is logged, once. Read all at
        once, the first such row failed every request, retried for good as if the database were away, naming no one;
        and its bounds, say, are what step 4 deletes by: no step can go on without them."""
        damaged = {row["user_id"]: damaged_request(row["user_id"], row[DAMAGED]) for row in rows if DAMAGED in row}
        for user_id, said in damaged.items():
            if self._damaged.get(user_id) != said:
                log.error("%s. The other requests go on.", said)
        self._damaged = damaged
        return [row for row in rows if DAMAGED not in row]

    async def _between_chunks(self) -> None:
        # A chunk's fold can wait (a user's state read from the database): the store then holds
        # events past the position, which the bounds would leave out of step 4.
        while folding := [ingest for ingest in self.ingests if not ingest.between_chunks.is_set()]:
            await folding[0].between_chunks.wait()

    async def _drop(self, rows: list[dict[str, Any]]) -> None:
        """Step 2, for each of `rows`."""
        await self._read_through(await self._ends(FOLDED), rows)
        # Asked before too: NATS away, nothing is dropped yet, and the whole step is tried again.
        await self._ends()
        async with self.lock:
            await self._between_chunks()
            at, mark = self._acted_on_at(), self.learner.served_mark()
            try:
                theirs = {row["user_id"]: await self.learner.decisions_to_forget(row["user_id"], utc_ms(at))
                          for row in rows}
                # That look let the event loop run: a chunk begun meanwhile ends first, and from here to the
                # bounds nothing waits, so no event or reaction of theirs is folded or learned in between.
                await self._between_chunks()
                # /score answered meanwhile, with the state dropped here: the request is acted on as of now, and
                # their decisions served since the look began go too. As of the time read before the look, they
                # were a new user's, held (a reaction learned with their features as served) and kept their rows.
                at = self._acted_on_at()
                since = self.learner.served_since(mark, frozenset(row["user_id"] for row in rows), utc_ms(at))
            finally:
                # Ended however the look ends (an exception, a stop): else the join cache noted every decision the
                # rest of a start's read-back brought, until the next erasure.
                self.learner.served_unmark()
            entries, unpublished, on_the_way = [], self.unpublished(), set()
            for row in rows:
                user_id = row["user_id"]
                held = self.store.forget(user_id)
                went = self.learner.forget_user(user_id, utc_ms(at), theirs[user_id] + since.get(user_id, []))
                if self.offline is not None:
                    self.offline.forget(user_id)
                on_the_way |= _decisions_of(user_id, unpublished)
                self.withdraw(functools.partial(_belongs_to, user_id))
                positions = self.store.positions
                entries.append({
                    "user_id": user_id, "requested_at": row["requested_at"], "dropped_at": at,
                    "bounds": {stream: positions.get(stream, 0) for stream in (jsx.SIGNALS.name, jsx.FEEDBACK.name)},
                    "report": _added({"state": held, **went},
                                     self._undone.pop(user_id, None) or row.get("report")),
                })
            # Nothing is folded from these two: whatever they hold now was stored before the request
            # was acted on. (A decision of theirs on its way to JetStream is not held again: `erasing`.)
            try:
                ends = await self._ends()
            except Exception:
                # NATS gone since the look before the lock: the ends read then left out what JetStream stored in
                # between (their decisions acknowledged, copies of their events dead-lettered), for good. The step
                # is done again once it answers, as of then; the report keeps what this one found.
                self._undone.update((entry["user_id"], entry["report"]) for entry in entries)
                raise
            for entry in entries:
                entry["bounds"].update(ends)
                if on_the_way:
                    entry["bounds"][ON_THE_WAY] = {"ids": sorted(on_the_way)}
                log.info("forgetting user %r: their state and what the learner held of them are gone (%s); their "
                         "messages through %s are deleted next", entry["user_id"], entry["report"], _sequences(entry["bounds"]))
            self._dropped.extend(entries)

    def _acted_on_at(self) -> datetime:
        """When a request is acted on (step 2): now, or the time in the newest decision id /score served or the
        join cache held, if that is later. Their decisions made before then are forgotten by the time in their ids:
        after NTP stepped the wall clock back (a VM after a suspend), those served in the hour before a step of an
        hour stayed held, their rewards learned with the user's features and their `tip_scores` rows written again."""
        return max(datetime.now(UTC), _EPOCH + self.learner.decisions_until_ms * _MS)

    async def _ends(self, streams: tuple[str, ...] = (jsx.DECISIONS.name, jsx.DLQ.name)) -> dict[str, int]:
        """The last sequence each of `streams` holds."""
        if self.js is None:
            return dict.fromkeys(streams, 0)
        ends = {}
        for stream in streams:
            try:
                ends[stream] = int((await self.js.stream_info(stream)).state.last_seq)
            except (TimeoutError, NatsTimeoutError) as error:  # logged as "(TimeoutError: nats: timeout)", no more
                raise ScrubError(no_answer(f"no answer from JetStream about stream {stream}",
                                           f"$JS.API.STREAM.INFO.{stream}")) from error
        return ends

    async def _read_through(self, ends: dict[str, int], rows: list[dict[str, Any]]) -> None:
        """Wait for ingest to have folded what SIGNALS and FEEDBACK held when the request was taken up:
        behind (a start's catch-up, NATS away a while), their events stored before it would be folded
        after step 2, as a new state. Not holding the lock: ingest pauses for the checkpoints it takes."""
        told = time.monotonic()
        specs = {spec.name: spec for spec in (jsx.SIGNALS, jsx.FEEDBACK)}
        seen: dict[str, int] = {}  # each stream's position at the last look
        looked: dict[str, int] = {}  # the position the server was last asked past
        while behind := {s: (self.store.positions.get(s, 0), seq) for s, seq in ends.items()
                         if self.store.positions.get(s, 0) < seq}:
            for stream, (at, seq) in behind.items():
                # The last messages may be erased ones (an earlier request's, at the stream's end), which
                # ingest never reads: a rebuild from the log, or a database restored from before the
                # erase, waited for them for good. Asked once per position ingest rests at, not while it moves.
                if seen.get(stream) == at != looked.get(stream) and stream in specs and self.js is not None:
                    looked[stream] = at
                    stored = await jsx.next_stored(self.js, specs[stream], at + 1)
                    if stored is None or stored > seq:
                        ends[stream] = at
                seen[stream] = at
            if time.monotonic() - told >= PROGRESS_EVERY_S:
                told = time.monotonic()
                log.info("forgetting %s: waiting for ingest to read what was stored before the request (%s)",
                         ", ".join(repr(row["user_id"]) for row in rows[:5]),
                         ", ".join(f"{s} at #{at} of #{seq}" for s, (at, seq) in behind.items()))
            await asyncio.sleep(READ_THROUGH_POLL_S)

    async def _delete_messages(self, rows: list[dict[str, Any]]) -> bool:
        """Steps 4 and 5 for requests dropped together (the same bounds); whether they are done (not when a version's
        saved model cannot be decoded: `_unreadable`)."""
        users, bounds = frozenset(row["user_id"] for row in rows), rows[0]["bounds"] or {}
        shown = ", ".join(sorted(map(repr, users)))
        found: dict[str, int] = {"users_in_pass": len(users)} if len(users) > 1 else {}
        if self.scrub is not None and self.js is not None:
            moved = await self._past_decisions_on_the_way(rows, bounds)
            if moved != bounds:
                await self.ours(UNDONE)
                # Saved before the scan: a stop during it (minutes over millions of messages) resumed with the
                # bounds step 3 saved, the decisions stored since left in DECISIONS for a rebuild to hold again.
                await self.threads.run("an erasure's bounds", self._save_bounds, rows, moved)
            bounds = moved
            for stream in SCRUBBED:
                last = [time.monotonic()]

                def progress(scanned: int, through: int, stream: str = stream, last: list[float] = last) -> None:
                    if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
                        last[0] = time.monotonic()
                        log.info("forgetting %s: %s read to #%d of #%d", shown, stream, scanned, through)

                result = await self.scrub(self.js, stream, users, int(bounds.get(stream, 0)), progress)
                found[f"messages_{stream.lower()}"] = result.deleted
                if stream == jsx.DECISIONS.name and bounds.get(ON_THE_WAY):
                    found[f"messages_{stream.lower()}"] += await self._delete_on_the_way(
                        users, int(bounds.get(stream, 0)), bounds[ON_THE_WAY])
        try:
            async with self.lock:  # a registry change (a rollback to a retired version) loads the bytes rewritten here
                await self.ours(UNDONE)  # within the lock, as a checkpoint's: none comes between
                reports = await self.threads.run("an erasure's last transaction", self._finish, rows,
                                                    self.learning_versions(), found)
        except UnreadableModel as error:
            # Retried as an outage, it said "did not go through (UnpicklingError: ...); trying again", naming neither
            # the version nor a fix, and scanned every stream again at each try, for good.
            self._unreadable = error
            log.error("forgetting %s cannot be finished: %s, then start tipstream again. Their state, rows and messages "
                      "are gone, their own weights are still in that model: the request stays 'dropped' "
                      "(`tipstream users forget-status`), as do those dropped after it, until a start finds the model "
                      "readable.", shown, error)
            return False
        for row, report in zip(rows, reports, strict=True):
            until = utc_ms(row["dropped_at"])
            if self.learner.erasing.get(row["user_id"]) == until:
                del self.learner.erasing[row["user_id"]]
            log.info("forgot user %r: %s", row["user_id"], report)
        await self.threads.run("an erasure's WAL checkpoint", self._empty_wal)  # not holding the lock: it may wait for readers
        return True

    async def _past_decisions_on_the_way(self, rows: list[dict[str, Any]], bounds: dict[str, Any]) -> dict[str, Any]:
        """`bounds`, with the users' decisions that were on their way to JetStream at step 2 (served with their
        state, queued while NATS was slow or away) and the DECISIONS sequence they are stored by (`ON_THE_WAY`):
        JetStream stores them after the bound was read, where the scrub left them, and a restart or a rebuild held
        them again (a `tip_scores` row, their features as served). By their ids, not all of theirs up to there:
        the bound moved, their decisions served after step 2 (the user came back) went from the log too, and kept
        their rows. Waits for their acknowledgements (the publisher never drops one), and so also keeps
        `Learner.erasing` until then: acknowledged after step 5, one got a `tip_scores` row. One held aside for a
        limit (`DecisionPublisher.let_go_held`) is let go instead: it may never be stored. Their ids are step 3's
        (in the bounds): after a crash, which lost the publisher's queue, one stored whose acknowledgement it lost
        stayed in DECISIONS."""
        on_the_way = bounds.get(ON_THE_WAY) or {}
        if not on_the_way.get("ids") or "through" in on_the_way:
            return bounds
        users, waited = [row["user_id"] for row in rows], set(on_the_way["ids"])
        told = time.monotonic()
        while pending := waited & {decision_id for _, decision_id, _ in self.unpublished()}:
            if let_go := self.let_go_held(pending):
                # Held for a limit (the server's max_payload, DECISIONS' max_msg_size) that may never be raised,
                # they kept the forget waiting as long; never stored, they have nothing to delete.
                log.info("forgetting %s: %d of their decisions served before the request were held aside, too "
                         "large for NATS (the decision log's error lines say which limit), never stored: let go, "
                         "not published (%s)", ", ".join(sorted(map(repr, users))), len(let_go), ", ".join(let_go))
                continue
            if time.monotonic() - told >= PROGRESS_EVERY_S:
                told = time.monotonic()
                log.info("forgetting %s: waiting for JetStream to store %d of their decisions served before the "
                         "request (is NATS reachable?)", ", ".join(sorted(map(repr, users))), len(pending))
            await asyncio.sleep(ON_THE_WAY_POLL_S)
        through = (await self._ends((jsx.DECISIONS.name,)))[jsx.DECISIONS.name]
        return {**bounds, ON_THE_WAY: {"through": through, "ids": sorted(waited)}}

    async def _delete_on_the_way(self, users: frozenset[str], bound: int, on_the_way: dict[str, Any]) -> int:
        """Delete the decisions of `users` named in `on_the_way` (`_past_decisions_on_the_way`) stored past DECISIONS'
        `bound`; how many."""
        ids, spelt, seqs = frozenset(on_the_way["ids"]), spellings(users), []

        def on_body(seq: int, body: bytes) -> None:
            if belongs(body, users, spelt) and _decision_id(body) in ids:
                seqs.append(seq)

        if int(on_the_way["through"]) > bound:
            await read_through(self.js, jsx.DECISIONS.name, bound + 1, int(on_the_way["through"]), on_body)
        return (await delete_all(self.js, jsx.DECISIONS.name, seqs))[0]

    def _save_bounds(self, rows: list[dict[str, Any]], bounds: dict[str, Any]) -> None:
        """In a worker thread: `bounds` are those of `rows` (each still dropped as it was: not asked for again)."""
        table = db.erasures
        with self.engine.begin() as conn:
            for row in rows:
                conn.execute(update(table).where(and_(table.c.user_id == row["user_id"], table.c.status == "dropped",
                                                      table.c.dropped_at == row["dropped_at"])).values(bounds=bounds))
                row["bounds"] = bounds

    def _finish(self, rows: list[dict[str, Any]], learning: set[str], found: dict[str, int]) -> list[dict[str, Any]]:
        """In a worker thread, for requests dropped together: the `tip_scores` rows of their decisions
        acknowledged after step 3, their features in the versions that do not learn (each loaded once),
        and the requests marked done; their reports."""
        versions, erasures = db.model_versions, db.erasures
        reports = []
        with self.engine.begin() as conn:
            retired: dict[str, int] = {}
            for version, blob in conn.execute(select(versions.c.version, versions.c.model)
                                              .where(versions.c.model.is_not(None))).all():
                if version in learning:
                    continue
                model = decoded_model(version, blob)  # UnreadableModel, naming it: the transaction rolls back
                held = {row["user_id"] for row in rows if model.forget_user(row["user_id"])}
                if held:
                    conn.execute(update(versions).where(versions.c.version == version).values(model=model.to_bytes()))
                for user_id in held:
                    retired[user_id] = retired.get(user_id, 0) + 1
            for row in rows:
                user_id, at = row["user_id"], _utc(row["dropped_at"])
                late = delete_decisions_served_until(conn, user_id, at)
                done_now = {**found, "tip_scores_late": late, "retired_models": retired.get(user_id, 0)}
                report = _added(done_now, row["report"])
                if not conn.execute(update(erasures).where(and_(erasures.c.user_id == user_id,
                                                                erasures.c.status == "dropped",
                                                                erasures.c.dropped_at == row["dropped_at"]))
                                    .values(status="done", report=report, done_at=datetime.now(UTC))).rowcount:
                    # Asked for again meanwhile: the pass starting over deletes what is left, and its report
                    # adds to what this one deleted.
                    again = conn.execute(select(erasures.c.report).where(erasures.c.user_id == user_id)).scalar()
                    conn.execute(update(erasures).where(erasures.c.user_id == user_id)
                                 .values(report=_added(done_now, again)))
                reports.append(report)
        return reports

    def _empty_wal(self) -> None:
        """SQLite: the WAL's older frames still held the users' rows as they were before the deletes (states,
        decisions, features) until overwritten, minutes on a busy service and for good on an idle one. TRUNCATE
        copies the newest pages into the file (the freed space zeroed: `secure_delete`) and empties the WAL. It
        waits for readers of an older snapshot up to the busy timeout; past it, the next request's tries again."""
        if self.engine.dialect.name != "sqlite":
            return
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception as error:  # noqa: BLE001 - the requests are done; the WAL's frames are overwritten in time
            log.warning("forgetting: the SQLite WAL could not be emptied (%s); its older frames may hold the "
                        "forgotten users' rows until they are overwritten", db.briefly(error, self.engine.url))


def _added(report: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """`report`, what a step did, added to what was done before for the same request (asked for again on
    its way, it starts over, and the new pass finds gone what the one before dropped): counts summed,
    what was found at all found by either.

    >>> _added({"state": False, "decisions_held": 1}, {"state": True, "decisions_held": 2, "messages_signals": 4})
    {'state': True, 'decisions_held': 3, 'messages_signals': 4}
    """
    added = dict(before or {})
    for key, value in report.items():
        prior = added.get(key)
        if isinstance(value, bool):
            added[key] = value or bool(prior)
        elif isinstance(value, int) and isinstance(prior, int):
            added[key] = value + prior
        else:
            added[key] = value
    return added


def earlier_erasures(engine: Engine, user_id: str, *, held: bool = False) -> list[dict[str, Any]]:
    table = db.erasures_earlier
    with engine.connect() as conn:
        return read_rows(conn, table, table.c.user_id == user_id, held=held)


DAMAGED = "damaged"  # in a row `read_rows` read: which of its JSON columns cannot be decoded, and why
_JSON_COLUMNS = ("bounds", "report")


def read_rows(conn: Connection, table: Table, where: ColumnElement[bool], *,
              for_update: bool = False, held: bool = False) -> list[dict[str, Any]]:
    """The rows of `table` (`erasures` or `erasures_earlier`) `where` says, oldest request first, each JSON column
    decoded on its own: one that cannot be (cut short, or overwritten by hand or by a disk fault) is None (`held`:
    what it holds, as an export shows it), and the row says which and why under `DAMAGED`. Decoded as the rows are
    fetched, the first such cell failed the read of every row, naming none."""
    query = db.json_as_text(table).where(where).order_by(table.c.requested_at)
    rows = []
    for found in conn.execute(query.with_for_update() if for_update else query).mappings():
        row, damaged = dict(found), []
        for name in _JSON_COLUMNS:
            text = row[name]
            row[name], why = _decoded(name, text)
            if why is not None:
                damaged.append(f"its {name} ({table.name}.{name}; {why})")
                if held:
                    row[name] = _held(text)
        if damaged:
            row[DAMAGED] = " and ".join(damaged)
        rows.append(row)
    return rows


def _decoded(name: str, text: str | None) -> tuple[Any, str | None]:
    """A request's `bounds` or `report` decoded from its text, and why it cannot be used (None: it can). PostgreSQL
    keeps only JSON in the column, but not only this shape.

    >>> _decoded("bounds", '{"SIGNALS": 4, "decisions_on_the_way": {"ids": ["d-1"]}}')
    ({'SIGNALS': 4, 'decisions_on_the_way': {'ids': ['d-1']}}, None)
    >>> _decoded("bounds", '{"SIGNALS": 4, "FEED')
    (None, 'JSONDecodeError: Unterminated string starting at: line 1 column 16 (char 15)')
    >>> _decoded("report", '"overwritten"')
    (None, "not a request's report: 'overwritten'")
    """
    if text is None:
        return None, None
    try:
        value = json.loads(text)
    except ValueError as error:
        return None, f"{type(error).__name__}: {error}"
    if value is None or _well_formed(name, value):
        return value, None
    return None, f"not a request's {name}: {value!r:.60}"


def _held(text: str) -> Any:
    """A damaged column as the database holds it: its JSON when it is JSON of another shape, else its text.

    >>> _held('"overwritten"'), _held('{"SIGNALS": 4, "FEED')
    ('overwritten', '{"SIGNALS": 4, "FEED')
    """
    try:
        return json.loads(text)
    except ValueError:
        return text


def _well_formed(name: str, value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    if name == "report":  # counts, and what was found at all
        return all(isinstance(count, int) for count in value.values())
    on_the_way = value.get(ON_THE_WAY, {"ids": []})
    return (all(isinstance(seq, int) and not isinstance(seq, bool) for key, seq in value.items() if key != ON_THE_WAY)
            and isinstance(on_the_way, dict) and isinstance(on_the_way.get("ids"), list)
            and all(isinstance(decision_id, str) for decision_id in on_the_way["ids"])
            and isinstance(on_the_way.get("through", 0), int))


def damaged_request(user_id: str, damaged: str) -> str:
    """What to say of a request to forget `user_id` whose row cannot be decoded (`damaged`: which column, why), the
    fixes with it. Not a rebuild from the log, a damaged database's other fix: it drops the requests with the tables,
    and their users' messages not deleted yet would be folded again."""
    return (f"The request to forget user {user_id!r} cannot be read: {damaged}, the database holds it damaged. "
            f"Request the forget again (`tipstream users forget {shlex.quote(user_id)}`), which replaces the row and "
            "takes the user through every step again, or restore that row from a backup (docs/operations.md, 'Backups and "
            "restores'); not a rebuild from the log, which would bring back their events still in the streams")


def _noted(row: dict[str, Any]) -> dict[str, Any]:
    """A request's row as the status shows it, with `damaged` saying which column cannot be read (`read_rows`): shown
    as null without a word, a done request's damaged report read as if it had none."""
    shown = _shown({key: value for key, value in row.items() if key != DAMAGED})
    if DAMAGED in row:
        shown["damaged"] = (f"{row[DAMAGED]} cannot be read, shown as null: the database holds it damaged, and keeps "
                            "it as it is (moved with the record when the user is asked for again). Restore that row "
                            "from a backup to read it (docs/operations.md, 'Backups and restores')")
    return shown


def _decisions_of(user_id: str, items: Sequence[tuple[str, str, bytes]]) -> set[str]:
    """The ids of `user_id`'s decisions among the publisher's `(subject, decision id, payload)` items."""
    return {decision_id for _, decision_id, payload in items if _belongs_to(user_id, payload)}


def _decision_id(body: bytes) -> Any:
    with contextlib.suppress(orjson.JSONDecodeError):
        decision = orjson.loads(body)
        return decision.get("id") if isinstance(decision, dict) else None
    return None


def _belongs_to(user_id: str, payload: bytes) -> bool:
    users = frozenset((user_id,))
    return belongs(payload, users, spellings(users))


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON can carry it (SQLAlchemy's keys are a subclass of str, which orjson refuses), its bounds a
    sequence a stream, as the API documents them (`ON_THE_WAY` is the service's own)."""
    shown = {str(key): (_utc(value).isoformat() if isinstance(value, datetime) else value) for key, value in row.items()}
    if isinstance(shown.get("bounds"), dict):
        shown["bounds"] = _sequences(shown["bounds"])
    return shown


def _sequences(bounds: dict[str, Any]) -> dict[str, Any]:
    """`bounds` without `ON_THE_WAY`'s ids (thousands while NATS was away): a sequence a stream."""
    return {stream: seq for stream, seq in bounds.items() if stream != ON_THE_WAY}

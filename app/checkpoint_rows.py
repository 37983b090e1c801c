"""What a checkpoint writes: users' states, positions, and the participants' rows.

Plain functions of (connection, data), run inside the checkpoint transaction, usually in
the writer process (see `checkpoint_writer.py`), which imports only this module's light
dependencies: the participants themselves (the learner with its models) stay in the service.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import and_, delete, select, update
from sqlalchemy.engine import Connection, Engine

from app import db
from app.credit_log import ROW_PREFIX as CREDITS_ROW
from app.credit_log import without
from app.decision_ids import decision_time_ms
from app.registry_store import write_models
from app.start_errors import UnreadableLearnerState, reading_learner_row
from streams.fold import to_ms

log = logging.getLogger("tipstream.checkpoints")

Write = tuple[Callable[[Connection, Any], None], Any]


def positions_behind(committed: Mapping[str, int], found: Mapping[str, int]) -> dict[str, tuple[int, int | None]]:
    """The streams whose position in the database is older than the one this service last committed
    (none at all reads as 0: nothing read), each as (committed, found; None: no row).

    A newer position found is no loss: a commit whose answer was lost (the connection broke during
    COMMIT) holds positions the service does not count as committed, and its retry writes the same
    users again, with more.

    >>> positions_behind({"SIGNALS": 120, "FEEDBACK": 40}, {"SIGNALS": 120, "FEEDBACK": 40})
    {}
    >>> positions_behind({"SIGNALS": 120, "FEEDBACK": 40, "DECISIONS": 0}, {"SIGNALS": 95})
    {'SIGNALS': (120, 95), 'FEEDBACK': (40, None)}
    >>> positions_behind({"SIGNALS": 120}, {"SIGNALS": 130, "DECISIONS": 7})
    {}
    >>> positions_behind({}, {})  # a first start, or a rebuild from the log: nothing committed yet
    {}
    """
    return {stream: (seq, found.get(stream)) for stream, seq in committed.items() if found.get(stream, 0) < seq}


class PositionsBehind(Exception):
    """The database holds older stream positions than this service committed: checkpoints it committed
    were lost under it. Picklable (its one argument): raised in the writer process, it reaches the service."""

    def __init__(self, behind: dict[str, tuple[int, int | None]]) -> None:
        super().__init__(behind)
        self.behind = behind

    def __str__(self) -> str:
        found = ", ".join(f"{stream} {'none' if at is None else at} (this service committed {seq})"
                          for stream, (seq, at) in self.behind.items())
        return (f"The database holds older stream positions than this service committed: {found}. It lost commits "
                "under the running service: a failover to a standby that had not received the last commits, or a "
                "backup restored while the service ran? Committing this checkpoint would record newer positions "
                "with only the users changed since the previous one, and users changed only in the lost commits "
                "would keep stale state for good. This checkpoint is not committed, and tipstream stops (exit code "
                "1): its next start resumes from what the database holds and replays the streams from there, so "
                "nothing is lost and nothing counted twice.")


def check_positions(conn: Connection, committed: Mapping[str, int]) -> None:
    """Raise `PositionsBehind` if the database no longer holds the positions this service committed
    last. First in the checkpoint's transaction, its rows locked to its end (`FOR UPDATE`; on SQLite
    the write lock, `BEGIN IMMEDIATE`), so nothing moves them between this read and the commit."""
    if conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite opens no transaction before a SELECT
    table = db.stream_positions
    rows = conn.execute(select(table.c.stream, table.c.seq).with_for_update())  # a row a stream: a few
    found = {stream: seq for stream, seq in rows}
    if behind := positions_behind(committed, found):
        raise PositionsBehind(behind)


def write_checkpoint(conn: Connection, positions: dict[str, int], states: list[tuple[str, bytes]],
                     writes: Sequence[Write] = (), marks: dict[str, int] | None = None,
                     committed: Mapping[str, int] | None = None) -> None:
    """One checkpoint's rows, inside the caller's transaction: what the participants write, the
    users' states, then the positions they reflect, each with when NATS stored its message
    (`marks`, where known). First, unless `committed` is None, that the database still holds the
    positions this service committed last (`check_positions`)."""
    now = datetime.now(UTC)
    start_checkpoint(conn, writes, committed)
    write_states(conn, states, now)
    finish_checkpoint(conn, positions, marks, now)


def start_checkpoint(conn: Connection, writes: Sequence[Write], committed: Mapping[str, int] | None) -> None:
    """`write_checkpoint`'s first rows: the positions checked, then the participants' (an erasure's deletes
    among them, which the users' states written after must follow)."""
    if committed:
        check_positions(conn, committed)
    for write, snapshot in writes:
        write(conn, snapshot)


def write_states(conn: Connection, states: Sequence[tuple[str, bytes]], now: datetime) -> None:
    db.upsert(conn, db.user_state, [{"user_id": u, "state": b, "updated_at": now} for u, b in states], ["user_id"])


def finish_checkpoint(conn: Connection, positions: dict[str, int], marks: dict[str, int] | None,
                      now: datetime) -> None:
    marks = marks or {}
    db.upsert(conn, db.stream_positions,
              [{"stream": s, "seq": q, "updated_at": now, "stored_us": marks.get(s)} for s, q in positions.items()],
              ["stream"])


class OpenCheckpoint:
    """A checkpoint of many users written in batches: one transaction held open across calls (`begin`,
    `add`s, `commit`), so that the caller holds one batch of serialised states at a time, not every
    changed user's, and the database gets all of it or none. Any call that fails rolls the transaction
    back, and so does a new `begin`: nothing is left half-written and holding the database's locks.
    Its calls run one at a time, in order (one thread, or the writer process)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self._now = datetime.now(UTC)

    def begin(self, writes: Sequence[Write], committed: Mapping[str, int] | None,
              states: Sequence[tuple[str, bytes]]) -> None:
        self.rollback()
        self._conn = self.engine.connect()
        self._conn.begin()
        self._now = datetime.now(UTC)  # the positions' time: read at the hand-over, before this
        self._in_turn(lambda conn: (start_checkpoint(conn, writes, committed), write_states(conn, states, self._now)))

    def add(self, states: Sequence[tuple[str, bytes]]) -> None:
        # Each batch stamped when written, which is after it was serialised: a later batch's states hold what was
        # folded since the begin, and stamped with the begin's time, a user_features row computed in between (its
        # pass begun after that time) read as newer than the state saved (`offline.users_behind`). A crash before
        # the next pass then left that row older than the user's state, and the events replayed, which the state
        # already held, changed no user: nothing rewrote it until their next event.
        self._in_turn(lambda conn: write_states(conn, states, datetime.now(UTC)))

    def commit(self, positions: dict[str, int], marks: dict[str, int] | None,
               states: Sequence[tuple[str, bytes]]) -> None:
        def last(conn: Connection) -> None:
            write_states(conn, states, datetime.now(UTC))  # as `add`'s
            finish_checkpoint(conn, positions, marks, self._now)
            conn.commit()

        self._in_turn(last)
        self.rollback()  # closes the connection: nothing is left to roll back

    def rollback(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection: the database rolls back without it
                conn.close()  # rolls the open transaction back

    def _in_turn(self, step: Callable[[Connection], Any]) -> None:
        if self._conn is None:
            raise RuntimeError("no checkpoint transaction is open: its begin failed, or a later one rolled it back")
        try:
            step(self._conn)
        except BaseException:
            self.rollback()
            raise


def write_learner_state(conn: Connection, snapshot: dict[str, Any] | None) -> None:
    """The learner's joins, the popularity prior, the models that learned, and the minutes of
    credits that changed (`credit_log`: None deletes a minute's row); in a registration's
    transaction, the `tip_scores` rows marked too (`rows`, `Learner.snapshot`)."""
    if snapshot is None:
        return
    write_tip_scores(conn, snapshot.get("rows"))
    now = datetime.now(UTC)
    write_models(conn, snapshot["models"])
    credits = snapshot.get("credits", {})
    gone = [name for name, data in credits.items() if data is None]
    if gone:
        conn.execute(delete(db.learner_state).where(db.learner_state.c.name.in_(gone)))
    db.upsert(conn, db.learner_state, [
        {"name": "learner", "state": snapshot["state"], "updated_at": now},
        {"name": "prior", "state": snapshot["prior"], "updated_at": now},
        *({"name": name, "state": data, "updated_at": now} for name, data in credits.items() if data is not None),
    ], ["name"])
    forgotten, users = set(snapshot.get("forgotten_credits") or ()), snapshot.get("forgotten_credit_users") or {}
    if forgotten or users:
        _delete_credits(conn, forgotten, users)


def _delete_credits(conn: Connection, decision_ids: set[str], users: dict[str, int]) -> None:
    """Forgotten users' decisions go from every minute's row of credits (`CreditLog.forget`), also those the rows
    saved as theirs (`users` -> as of when: `credit_log.theirs`): a closed minute is in no snapshot again, and kept
    what their reactions credited for the join window."""
    table = db.learner_state
    rows = conn.execute(select(table.c.name, table.c.state).where(table.c.name.like(f"{CREDITS_ROW}%"))).all()
    for name, data in rows:
        try:
            with reading_learner_row(name):
                credits = orjson.loads(bytes(data))
                kept = without(credits, decision_ids, users)  # their users' index too (`credit_log.USERS`)
        except UnreadableLearnerState as error:
            # Raised, it failed this checkpoint and every one after it (their users' request kept it in each): no
            # state or position was saved again. Left as it is, the next start stops on it, naming it as here.
            log.error("%s The forgotten users' decisions in it could not be taken out; the checkpoint goes on.", error)
            continue
        if kept is credits:
            continue
        if kept:
            conn.execute(update(table).where(table.c.name == name).values(state=orjson.dumps(kept)))
        else:
            conn.execute(delete(table).where(table.c.name == name))


def write_tip_scores(conn: Connection, snapshot: tuple[int, list[dict[str, Any]]] | None) -> None:
    """The `tip_scores` rows marked since the last confirmed checkpoint. One without rewards is written only
    where its decision has no row yet: one there holds the same decision, maybe rewarded since (`TipScoresLog`)."""
    if snapshot is None:
        return
    rewarded = [row for row in snapshot[1] if row["rewards"]]
    db.upsert(conn, db.tip_scores, rewarded, ["decision_id"])
    if len(rewarded) < len(snapshot[1]):
        db.upsert(conn, db.tip_scores, [row for row in snapshot[1] if not row["rewards"]], ["decision_id"],
                  replace=False)


def write_erasures(conn: Connection, dropped: list[dict[str, Any]] | None) -> None:
    """The rows of the users forgotten since the last checkpoint go, and their requests are marked
    dropped: in the transaction that saves the positions read to when their state was dropped, so a
    restart never folds their events again. Written after the other participants' rows (their last
    decisions' `tip_scores` rows among them) and before the users' states: one of theirs saved here
    holds only events folded since."""
    for erased in dropped or ():
        user_id, at = erased["user_id"], erased["dropped_at"]
        conn.execute(delete(db.user_state).where(db.user_state.c.user_id == user_id))
        conn.execute(delete(db.user_features).where(db.user_features.c.user_id == user_id))
        delete_decisions_served_until(conn, user_id, at)
        table = db.erasures
        # Not a request made since (its time moved): that one drops what came after this one.
        if not conn.execute(update(table).where(and_(table.c.user_id == user_id, table.c.status == "requested",
                                                     table.c.requested_at == erased["requested_at"]))
                            .values(status="dropped", dropped_at=at, bounds=erased["bounds"], report=erased["report"])
                            ).rowcount:
            # Asked for again since step 2: the request made then took the report as it was before step 2
            # (`Eraser.request`), and the pass starting over finds gone what step 2 dropped (`"state": false`).
            conn.execute(update(table).where(and_(table.c.user_id == user_id, table.c.status == "requested"))
                         .values(report=erased["report"]))


_IN_ONE_DELETE = 500  # decision ids per DELETE: well under the bound parameters SQLite takes in one statement


def delete_decisions_served_until(conn: Connection, user_id: str, at: datetime) -> int:
    """Delete `user_id`'s `tip_scores` rows of the decisions served until `at` (a request to forget them acted
    on); how many. When a decision was served is the time in its id (`decision_ids`), as the learner judges it
    (`Learner._forgotten`), not the row's `created_at`: that is the decision's `ts`, the caller's `context.now`
    when given, which may be days ahead (a tip ranked for tomorrow's reminder) or long gone. Judged by it, a
    decision served before the request for a `now` ahead kept its row (their features as served, once rewarded)
    for good, and one served once the user came back, for a `now` gone by, lost its row while its message stayed
    in DECISIONS. Another publisher's decision, with no time in its id, is judged by its `created_at`."""
    table = db.tip_scores
    until_ms = utc_ms(at)
    served = conn.execute(select(table.c.decision_id, table.c.created_at).where(table.c.user_id == user_id)).all()
    gone = [decision_id for decision_id, created_at in served
            if (timed if (timed := decision_time_ms(decision_id)) is not None else utc_ms(created_at)) <= until_ms]
    deleted = 0
    for start in range(0, len(gone), _IN_ONE_DELETE):
        deleted += conn.execute(delete(table).where(table.c.decision_id.in_(gone[start : start + _IN_ONE_DELETE]))
                                ).rowcount
    return deleted


def utc_ms(moment: datetime) -> int:
    """`to_ms` of a time read back from the database: one without a zone (SQLite hands back none) is in UTC."""
    return to_ms(moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC))

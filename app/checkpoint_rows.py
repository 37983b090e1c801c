"""What a checkpoint writes: users' states, positions, and the participants' rows.

Plain functions of (connection, data), run inside the checkpoint transaction, usually in
the writer process (see `checkpoint_writer.py`), which imports only this module's light
dependencies: the participants themselves (the learner with its models) stay in the service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import and_, delete, select, update
from sqlalchemy.engine import Connection

from app import db
from app.credit_log import ROW_PREFIX as CREDITS_ROW
from app.registry_store import write_models

Write = tuple[Callable[[Connection, Any], None], Any]


def write_checkpoint(conn: Connection, positions: dict[str, int], states: list[tuple[str, bytes]],
                     writes: Sequence[Write] = (), marks: dict[str, int] | None = None) -> None:
    """One checkpoint's rows, inside the caller's transaction: what the participants write, the
    users' states, then the positions they reflect, each with when NATS stored its message
    (`marks`, where known)."""
    marks = marks or {}
    now = datetime.now(UTC)
    for write, snapshot in writes:
        write(conn, snapshot)
    db.upsert(conn, db.user_state, [{"user_id": u, "state": b, "updated_at": now} for u, b in states], ["user_id"])
    db.upsert(conn, db.stream_positions,
              [{"stream": s, "seq": q, "updated_at": now, "stored_us": marks.get(s)} for s, q in positions.items()],
              ["stream"])


def write_learner_state(conn: Connection, snapshot: dict[str, Any] | None) -> None:
    """The learner's joins, the popularity prior, the models that learned, and the minutes of
    credits that changed (`credit_log`: None deletes a minute's row)."""
    if snapshot is None:
        return
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
    if forgotten := set(snapshot.get("forgotten_credits") or ()):
        _delete_credits(conn, forgotten)


def _delete_credits(conn: Connection, decision_ids: set[str]) -> None:
    """Forgotten users' decisions go from every minute's row of credits (`CreditLog.forget`): a closed
    minute is in no snapshot again, and kept what their reactions credited for the join window."""
    table = db.learner_state
    rows = conn.execute(select(table.c.name, table.c.state).where(table.c.name.like(f"{CREDITS_ROW}%"))).all()
    for name, data in rows:
        credits = orjson.loads(bytes(data))
        kept = {decision_id: held for decision_id, held in credits.items() if decision_id not in decision_ids}
        if len(kept) == len(credits):
            continue
        if kept:
            conn.execute(update(table).where(table.c.name == name).values(state=orjson.dumps(kept)))
        else:
            conn.execute(delete(table).where(table.c.name == name))


def write_tip_scores(conn: Connection, snapshot: tuple[int, list[dict[str, Any]]] | None) -> None:
    """The `tip_scores` rows marked since the last confirmed checkpoint."""
    if snapshot is None:
        return
    db.upsert(conn, db.tip_scores, snapshot[1], ["decision_id"])


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
        conn.execute(delete(db.tip_scores).where(and_(db.tip_scores.c.user_id == user_id,
                                                      db.tip_scores.c.created_at <= at)))
        table = db.erasures
        # Not a request made since (its time moved): that one drops what came after this one.
        conn.execute(update(table).where(and_(table.c.user_id == user_id, table.c.status == "requested",
                                              table.c.requested_at == erased["requested_at"]))
                     .values(status="dropped", dropped_at=at, bounds=erased["bounds"], report=erased["report"]))

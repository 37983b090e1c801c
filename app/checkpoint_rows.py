"""What a checkpoint writes: users' states, positions, and the participants' rows.

Plain functions of (connection, data), run inside the checkpoint transaction, usually in
the writer process (see `checkpoint_writer.py`), which imports only this module's light
dependencies: the participants themselves (the learner with its models) stay in the service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete
from sqlalchemy.engine import Connection

from app import db
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


def write_tip_scores(conn: Connection, snapshot: tuple[int, list[dict[str, Any]]] | None) -> None:
    """The `tip_scores` rows marked since the last confirmed checkpoint."""
    if snapshot is None:
        return
    db.upsert(conn, db.tip_scores, snapshot[1], ["decision_id"])

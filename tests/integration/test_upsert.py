"""`db.upsert` against SQLite and PostgreSQL, both its many-rows-per-statement paths (a JSON
array; multi-row VALUES for binary columns): every column type comes back as SQLAlchemy wrote it
before, times are stored as instants, and a second upsert updates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import sqlalchemy as sa

from app import db, migrate

CET = timezone(timedelta(hours=1))


def _row(decision_id: str, **changes: Any) -> dict[str, Any]:
    row = {"decision_id": decision_id, "user_id": "u-1", "created_at": datetime(2026, 11, 26, 8, 0, 0, 123000, CET),
           "kind": "scored", "model_version": "v1", "shadow_version": None, "prompt_version": None,
           "policy": "epsilon_greedy", "tip_id": "tip-a", "score": 0.25, "propensity": 0.9, "decision": None,
           "rewards": None, "reward": None, "rewarded_at": None}
    return {**row, **changes}


def _read(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(db.tip_scores)).mappings().all()
    out = {}
    for row in rows:
        row = dict(row)
        for name in ("created_at", "rewarded_at"):  # SQLite gives naive UTC, PostgreSQL aware
            if row[name] is not None and row[name].tzinfo is None:
                row[name] = row[name].replace(tzinfo=UTC)
        out[row["decision_id"]] = row
    return out


def test_rows_written_in_one_statement_read_back_exactly(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    tricky = _row("d-2", user_id="u-'quoted\" \\ é 🙂", score=1e-300, shadow_version="v2",
                  decision='{"id": "d-2", "text": "line\\nbreak"}', rewards={"tip-a": 1.0, "tip-b": -0.5},
                  reward=1.0, rewarded_at=datetime(2026, 11, 26, 9, 30, tzinfo=UTC))
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [_row("d-1"), tricky], ["decision_id"])
    stored = _read(engine)
    assert stored["d-2"] == tricky
    # A time in another offset is stored as the same instant (SQLite keeps it as UTC text).
    assert stored["d-1"]["created_at"] == datetime(2026, 11, 26, 7, 0, 0, 123000, UTC)
    assert stored["d-1"]["rewards"] is None and stored["d-1"]["decision"] is None

    credited = _row("d-1", rewards={"tip-a": 0.5}, reward=0.5, decision="{}",
                    rewarded_at=datetime(2026, 11, 26, 10, tzinfo=UTC))
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [credited], ["decision_id"])
    stored = _read(engine)
    assert len(stored) == 2
    assert stored["d-1"]["rewards"] == {"tip-a": 0.5} and stored["d-1"]["reward"] == 0.5
    assert stored["d-1"]["rewarded_at"] == datetime(2026, 11, 26, 10, tzinfo=UTC)

    # `replace=False` writes a row only where its key has none: d-1 keeps its rewards.
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [_row("d-1"), _row("d-3")], ["decision_id"], replace=False)
    stored = _read(engine)
    assert stored["d-1"]["rewards"] == {"tip-a": 0.5} and stored["d-3"] == _row("d-3")
    assert stored["d-2"] == tricky
    engine.dispose()


def test_numpy_numbers_are_written_as_numbers(database_url: str) -> None:
    """Feature values computed with numpy reach the JSON path as numpy scalars."""
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    row = {"user_id": "u-1", "as_of": datetime(2026, 11, 26, tzinfo=UTC), "updated_at": datetime(2026, 11, 26, tzinfo=UTC),
           "features": {"rate": np.float64(0.25), "count": np.int64(3)}}
    with engine.begin() as conn:
        db.upsert(conn, db.user_features, [row], ["user_id"])
        stored = conn.execute(sa.select(db.user_features.c.features)).scalar_one()
    assert stored == {"rate": 0.25, "count": 3}
    engine.dispose()


def test_times_in_sqlite_sort_as_instants(tmp_path: Any) -> None:
    """Decisions of users in different offsets: ordering by created_at is ordering by instant."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    migrate.upgrade(url)
    engine = db.make_engine(url)
    early_in_tokyo = datetime(2026, 11, 26, 16, 0, tzinfo=timezone(timedelta(hours=9)))  # 07:00Z
    later_in_london = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [_row("d-late", created_at=later_in_london),
                                        _row("d-early", created_at=early_in_tokyo)], ["decision_id"])
        order = conn.execute(sa.select(db.tip_scores.c.decision_id).order_by(db.tip_scores.c.created_at)).scalars().all()
    assert order == ["d-early", "d-late"]
    engine.dispose()


def test_more_rows_than_one_statement_holds_are_all_written(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    count = db.JSON_ROWS_PER_STATEMENT * 2 + 1
    rows = [_row(f"d-{i:05d}", score=i / count) for i in range(count)]
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, rows, ["decision_id"])
    stored = _read(engine)
    assert len(stored) == count
    assert stored[f"d-{count - 1:05d}"]["score"] == (count - 1) / count
    engine.dispose()


def test_binary_rows_go_in_multi_row_statements_and_read_back(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    count = db.PARAMETERS_PER_STATEMENT // 3 * 2 + 1  # user_state has 3 columns: three statements
    at = datetime(2026, 11, 26, 9, 0, 0, 250000, CET)
    rows = [{"user_id": f"u-{i}", "state": bytes([i % 256]) * (i % 7 + 1) + b"\x00\xff", "updated_at": at}
            for i in range(count)]
    with engine.begin() as conn:
        db.upsert(conn, db.user_state, rows, ["user_id"])
        db.upsert(conn, db.user_state, [{**rows[0], "state": b"new"}], ["user_id"])
        stored = {r.user_id: r for r in conn.execute(sa.select(db.user_state))}
    assert len(stored) == count
    assert stored["u-0"].state == b"new"
    assert all(stored[r["user_id"]].state == r["state"] for r in rows[1:])
    updated = stored[f"u-{count - 1}"].updated_at
    assert (updated if updated.tzinfo else updated.replace(tzinfo=UTC)) == at
    engine.dispose()


def test_binary_rows_of_any_count_make_few_statement_texts(database_url: str) -> None:
    """Each text is a statement the driver prepares and keeps per connection: a checkpoint's users, any
    count, made one text per count, and the service's resident memory grew ~70 MB a connection."""
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    texts: set[str] = set()
    sa.event.listen(engine, "before_cursor_execute",
                    lambda _conn, _cursor, statement, *_: texts.add(statement) if "user_state" in statement else None)
    at = datetime(2026, 11, 26, 9, tzinfo=UTC)
    most = db.PARAMETERS_PER_STATEMENT // 3  # user_state's rows in one statement
    for count in [*range(1, 130), most + 77]:
        with engine.begin() as conn:
            db.upsert(conn, db.user_state, [{"user_id": f"u-{i}", "state": bytes([count % 256]), "updated_at": at}
                                            for i in range(count)], ["user_id"])
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(db.user_state.c.user_id, db.user_state.c.state)).all())
    assert len(stored) == most + 77 and set(stored.values()) == {bytes([(most + 77) % 256])}
    assert len(texts) <= most.bit_length() + 1, len(texts)
    engine.dispose()

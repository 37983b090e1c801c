"""Evaluation's read of the decision log (`evaluation.rewarded_decisions`), on SQLite and PostgreSQL: the newest
rewarded decisions, read off the index of the rewarded rows (0010)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa

from app import db, evaluation, migrate
from tests.integration.rows_read import count_sqlite_steps, rows_read

NOW = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)


def row(decision_id: str, created_at: datetime, rewarded_at: datetime | None = None) -> dict[str, Any]:
    rewarded = rewarded_at is not None
    return {"decision_id": decision_id, "user_id": "u1", "created_at": created_at, "kind": "logreg",
            "model_version": "v1", "shadow_version": None, "prompt_version": None, "policy": "epsilon_greedy",
            "tip_id": "t1", "score": 0.5, "propensity": 0.9,
            "decision": orjson.dumps({"id": decision_id}).decode() if rewarded else None,
            "rewards": {"t1": 1.0} if rewarded else None, "reward": 1.0 if rewarded else None,
            "rewarded_at": rewarded_at}


def test_evaluation_reads_the_rewarded_rows_it_returns_not_those_waiting_for_a_reward(database_url: str) -> None:
    """Nine decisions in ten are never rewarded, and the newest wait for their rewards (up to the join window;
    ~18M rows an hour at 5,000 answers a second). Walking `created_at`'s index from the newest (before 0010),
    the read went through all of them, and the unrewarded among the older ones, then sorted by the id: here
    2,600 rows read on PostgreSQL for 20 returned (60 with the rewarded rows alone), 9,185 SQLite steps (545).
    Off the index of the rewarded rows, in the read's order, it reads the rows it returns."""
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    if engine.dialect.name == "sqlite":
        count_sqlite_steps(engine)
    made = NOW - timedelta(days=1)
    # Two made at the same instant: the id orders them.
    rewarded = [row(f"d-r{i:03d}", made + timedelta(minutes=i // 2), made + timedelta(hours=1)) for i in range(60)]
    newest = [f"d-r{i:03d}" for i in range(59, 39, -1)]

    def write(rows: list[dict[str, Any]]) -> None:
        with engine.begin() as conn:
            db.upsert(conn, db.tip_scores, rows, ["decision_id"])
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("ANALYZE tip_scores"))  # as autovacuum does: the planner's estimates

    def read() -> int:
        with engine.begin() as conn:
            before = rows_read(conn)
            assert [orjson.loads(d)["id"] for d, *_ in conn.execute(evaluation.rewarded_query(20))] == newest
            return rows_read(conn) - before

    write(rewarded)
    read()  # statements prepared, statistics read
    alone = read()
    never = [row(f"d-u{i:04d}", made + timedelta(seconds=i * 3)) for i in range(540)]  # nine in ten, among them
    write(never + [row(f"d-w{i:04d}", NOW - timedelta(seconds=i)) for i in range(2_000)])  # waiting for rewards
    assert read() - alone < 100  # SQLite: ~10 steps a row read
    assert [d["id"] for d, *_ in evaluation.rewarded_decisions(engine, 20)] == newest[::-1]  # oldest first
    engine.dispose()

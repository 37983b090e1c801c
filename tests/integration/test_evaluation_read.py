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
    assert [d["id"] for d, *_ in evaluation.rewarded_decisions(engine, 20).decisions] == newest[::-1]  # oldest first
    engine.dispose()


async def test_a_card_leaves_out_the_log_s_damaged_rows_counting_them_and_naming_the_first(
        start_service, database_url: str, caplog, monkeypatch, capsys) -> None:
    """`tip_scores` rows cut short (a decision's text) or overwritten (its rewards; PostgreSQL keeps only JSON in
    that column) failed every `models evaluate` and every registration, with a JSONDecodeError (or AttributeError)
    naming no row, for as long as they were among the newest rewarded. The log can write them again (a rebuild),
    so they are left out: the card and the command's summary count them, and the service's log says so once, with
    the first one's decision id."""
    import asyncio
    import logging

    from app.cli import main
    from app.decisions import tip_score_row

    caplog.set_level(logging.INFO, logger="tipstream")
    token = "s3cret-token-for-tests"
    running = await start_service(database_url=database_url, admin_token=token)
    rows = []
    for i in range(40):
        served = NOW - timedelta(hours=2) + timedelta(minutes=i)
        ms = int(served.timestamp() * 1000)
        decision = {"id": f"d-{ms:012x}{i:016x}", "ts": served.isoformat(), "user_id": f"u-{i}", "model_version": "v1",
                    "features": {"hour_of_day": 9}, "ranked": [{"tip_id": "a", "score": 0.5, "propensity": 0.9}]}
        rows.append(tip_score_row(decision, orjson.dumps(decision), {"a": float(i % 2)}, ms + 60_000))
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            db.upsert(conn, db.tip_scores, rows, ["decision_id"])
            cut, overwritten = rows[3]["decision_id"], rows[7]["decision_id"]
            conn.execute(sa.text("update tip_scores set decision = substr(decision, 1, 30) where decision_id = :d"),
                         {"d": cut})
            damaged = "'\"overwritten\"'" if engine.dialect.name == "postgresql" else "'{\"a\": 1'"
            conn.execute(sa.text(f"update tip_scores set rewards = {damaged} where decision_id = :d"),
                         {"d": overwritten})
    finally:
        engine.dispose()
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", token)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["models", "evaluate", "v1", "--url", running.base_url]) == 0
    out = capsys.readouterr().out
    assert "progressive validation over 38 rewards" in out, out
    assert "2 row(s) of the log (tip_scores) could not be read, the database holding them damaged: left out" in out, out
    async with running.http() as http:
        card = (await http.get("/models/v1/card", headers={"Accept": "text/markdown"})).text
    assert "| skipped_damaged_rows | 2 |" in card, card
    assert "\n2 row(s) of the log (tip_scores) could not be read" in card, card
    [said] = [r.getMessage() for r in caplog.records if r.name == "tipstream.models" and r.levelname == "WARNING"]
    assert said.startswith(f"the card's evaluation over the decision log left out 2 tip_scores row(s) that cannot "
                           f"be read (the first: decision {cut!r}, its decision: JSONDecodeError: "), said
    assert "(docs/operations.md, 'Rebuilding from the log'" in said, said

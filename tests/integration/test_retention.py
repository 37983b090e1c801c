"""`tip_scores` keeps `TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS` of decisions (app/retention.py),
on SQLite and PostgreSQL, and the running service deletes older rows by itself."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app import db, migrate
from app.decision_ids import decision_time_ms, served_before_bound
from app.learning_metrics import DECISION_ROWS_PRUNED
from app.retention import TipScoresRetention, delete_before, goes_at_key
from streams.fold import to_ms
from tests.conftest import eventually
from tests.integration.rows_read import count_sqlite_steps, rows_read

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
PLUS_14 = timezone(timedelta(hours=14))


def row(decision_id: str, created_at: datetime) -> dict[str, Any]:
    return {"decision_id": decision_id, "user_id": "u1", "created_at": created_at, "kind": "logreg",
            "model_version": "v1", "shadow_version": None, "prompt_version": None, "policy": "epsilon_greedy",
            "tip_id": "t1", "score": 0.5, "propensity": 0.9, "decision": None, "rewards": None, "reward": None,
            "rewarded_at": None}


def decision_ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(db.tip_scores.c.decision_id)).scalars())


def pruned_so_far() -> float:
    return DECISION_ROWS_PRUNED._value.get()


async def test_rows_older_than_the_bound_go_in_batches_and_younger_ones_stay(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    cut = NOW - timedelta(days=30)
    old = [row(f"old-{i}", cut - timedelta(minutes=i + 1)) for i in range(23)]
    # The same instant written at +14:00: compared as an instant, not as the text of a local time.
    old.append(row("old-far-east", (cut - timedelta(seconds=1)).astimezone(PLUS_14)))
    young = [row("at-the-cut", cut), row("young", NOW - timedelta(days=1)),
             row("young-far-east", (cut + timedelta(seconds=1)).astimezone(PLUS_14)),
             # Served for a past `context.now` (a backfill) and rewarded since: kept for its reward.
             {**row("backdated-rewarded", cut - timedelta(days=5)), "reward": 1.0, "rewards": {"t1": 1.0},
              "rewarded_at": NOW - timedelta(minutes=3)}]
    old.append(row("backfilled-1960", datetime(1960, 1, 1, tzinfo=UTC)))  # before any time in an id
    old.append({**row("rewarded-long-ago", cut - timedelta(days=2)), "reward": 0.0, "rewards": {"t1": 0.0},
                "rewarded_at": cut - timedelta(days=1)})
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, old + young, ["decision_id"])
    before = pruned_so_far()

    retention = TipScoresRetention(engine, max_age_days=30, clock=NOW.timestamp, batch=5)
    assert await retention.prune() == len(old)  # five full batches, then an empty one

    assert decision_ids(engine) == {r["decision_id"] for r in young}
    assert pruned_so_far() - before == len(old)
    assert await retention.prune() == 0
    engine.dispose()


async def test_a_decision_served_for_a_now_far_ahead_goes_by_when_it_was_served(database_url: str) -> None:
    """A row's `created_at` is the request's `context.now`: scored for a `now` far ahead (a reminder for next
    year, or year 9999), a row was kept as long by it, the user's features as served with it once rewarded. When
    it was served, the time in its id, bounds it too, as it bounds a forget; an id with no time in it (another
    publisher's) goes by its `created_at` alone."""
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    cut, ahead = NOW - timedelta(days=30), datetime(9999, 12, 31, tzinfo=UTC)

    def served(at: datetime, tail: str = "0") -> str:
        return served_before_bound(to_ms(at)) + tail * 16

    rewarded = {"reward": 1.0, "rewards": {"t1": 1.0}}
    gone = [row(served(cut - timedelta(days=1)), ahead),
            {**row(served(cut - timedelta(milliseconds=1), "1"), NOW + timedelta(days=400)), **rewarded,
             "rewarded_at": cut - timedelta(hours=1)},
            row("old-by-its-now", cut - timedelta(days=1))]
    kept = [row(served(cut), ahead), row(served(NOW - timedelta(days=1)), ahead),
            # Served long ago, rewarded since: kept for its reward, as by `created_at`.
            {**row(served(cut - timedelta(days=2), "2"), ahead), **rewarded, "rewarded_at": NOW - timedelta(hours=1)},
            row("d-0001", ahead), row("elsewhere-" + "0" * 20, ahead),  # no time in their ids
            row("d-0000000000zz" + "0" * 16, ahead)]  # our form's length, no time in its digits
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, gone + kept, ["decision_id"])
    retention = TipScoresRetention(engine, max_age_days=30, clock=NOW.timestamp, batch=2)
    assert await retention.prune() == len(gone)  # a batch of both kinds, then one of the second
    assert decision_ids(engine) == {r["decision_id"] for r in kept}
    engine.dispose()


async def test_on_sqlite_a_backlog_goes_in_transactions_short_enough_for_the_checkpoint_to_wait_on(
        database_url: str) -> None:
    """SQLite's write lock is the checkpoint's too: 10,000 rows a transaction held it 0.45-1.1 s over a backlog
    (`python bench/retention.py`, its `longest_batch_ms`), each checkpoint waiting that long. PostgreSQL locks
    only the rows a transaction deletes, and takes them 10,000 at a time."""
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    backlog = [row(f"old-{i:05}", NOW - timedelta(days=31, minutes=i)) for i in range(2_500)]
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, backlog, ["decision_id"])
    deleted_by_transaction: list[int] = []
    retention = TipScoresRetention(engine, max_age_days=30, clock=NOW.timestamp)
    delete_batch = retention._delete_batch

    def counted(cut: datetime) -> int:
        deleted_by_transaction.append(delete_batch(cut))
        return deleted_by_transaction[-1]

    retention._delete_batch = counted  # type: ignore[method-assign]
    assert await retention.prune() == len(backlog)
    assert deleted_by_transaction == ([1_000, 1_000, 500] if engine.dialect.name == "sqlite" else [2_500])
    assert decision_ids(engine) == set()
    engine.dispose()


def test_the_time_in_an_id_is_read_alike_by_the_index_retention_goes_by_and_by_the_service(database_url: str) -> None:
    """Forgetting a user and the learner read the time in an id in Python (`decision_time_ms`), retention in SQL
    (`db.tip_scores_goes_at`). Python's `int(_, 16)` read upper case, signs ("d--19c5..." a time before 1970),
    "0x", spaces and underscores too: a row of such an id was deleted by a forget for the time in it, and kept
    by retention for its `created_at`."""
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    ahead = datetime(9999, 12, 31, tzinfo=UTC)  # after any time in an id: the index's value is the id's, if read
    digits = ["019c5e8a2b10", "019C5E8A2B10", "019c5e8A2b10", " 19c5e8a2b1", "0_9c5e8a2b10", "+19c5e8a2b10",
              "-19c5e8a2b10", "0x9c5e8a2b10", "019c5e8a2b1g", "000000000000", "0fffffffffff"]
    ids = [f"d-{d}" + "0" * 16 for d in digits] + ["d-019c5e8a2b10", "e-019c5e8a2b10" + "0" * 16]
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [{**row(i, ahead), "user_id": f"u{n}"} for n, i in enumerate(ids)],
                  ["decision_id"])
        goes_at = dict(conn.execute(sa.select(db.tip_scores.c.decision_id, db.tip_scores_goes_at)).all())
    engine.dispose()

    def read_in_sql(value: Any) -> int | None:
        if isinstance(value, str):  # SQLite's: the milliseconds in hex
            return int(value, 16) if value != goes_at_key("sqlite", ahead) else None
        return to_ms(value) if value.year < 9999 else None

    assert {i: read_in_sql(goes_at[i]) for i in ids} == {i: decision_time_ms(i) for i in ids}
    assert sum(decision_time_ms(i) is not None for i in ids) == 3  # the first, and the lowest and highest times


@pytest.mark.parametrize("max_age_days", [1e6, 1e21])
async def test_a_bound_reaching_before_year_1_keeps_every_row_and_the_pass_succeeds(
        max_age_days: float, tmp_path: Path) -> None:
    """TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS=1000000 (kept for ages) overflowed datetime: every minute's
    pass failed with a warning ("date value out of range")."""
    url = f"sqlite:///{tmp_path / 'tipstream.db'}"
    migrate.upgrade(url)
    engine = db.make_engine(url)
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [row("d-0001", datetime(1, 1, 2, tzinfo=UTC))], ["decision_id"])
    assert await TipScoresRetention(engine, max_age_days=max_age_days, clock=NOW.timestamp).prune() == 0
    assert decision_ids(engine) == {"d-0001"}
    engine.dispose()


async def test_a_pass_leaves_the_rows_a_checkpoint_holds_and_never_waits_for_them(postgres_url: str) -> None:
    """A checkpoint rewriting old rows (a rebuild from the log with a shorter bound than the streams',
    a backfill's rewards) and a pass each held rows the other went on to: PostgreSQL aborted one of
    them, deadlock detected (18 in 20 s of both at once), the checkpoint as often as the pass. A pass
    now takes only rows no one holds: the checkpoint waits for it at most, never the other way."""
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    migrate.upgrade(postgres_url)
    engine = db.make_engine(postgres_url)
    # A wait for a row lock fails at once here, instead of ending in the deadlock the checkpoint makes below.
    bounded = sa.create_engine(postgres_url, connect_args={"options": "-c lock_timeout=2000"})
    cut = NOW - timedelta(days=30)
    rows = [row(f"old-{i}", cut - timedelta(days=1, minutes=i)) for i in range(2)]
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, rows, ["decision_id"])
    try:
        with engine.begin() as checkpoint:
            rewarded = [{**r, "reward": 1.0, "rewards": {"t1": 1.0}, "rewarded_at": cut - timedelta(hours=1)}
                        for r in rows]
            db.upsert(checkpoint, db.tip_scores, rewarded[1:], ["decision_id"])  # holds old-1, not yet old-0
            retention = TipScoresRetention(bounded, max_age_days=30, clock=NOW.timestamp)
            assert await retention.prune() == 1  # old-0; old-1 is the next pass's
            db.upsert(checkpoint, db.tip_scores, rewarded[:1], ["decision_id"])  # old-0 written back whole
        assert decision_ids(engine) == {"old-0", "old-1"}
        assert await retention.prune() == 2
    finally:
        bounded.dispose()
        engine.dispose()


async def test_the_service_deletes_old_rows_and_keeps_the_decisions_it_just_made(
        start_service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import bootstrap

    monkeypatch.setattr(bootstrap, "RETENTION_EVERY_S", 0.05)
    # The decision's row is written with the checkpoint (every 5 s by default).
    running = await start_service(tip_scores_max_age_days=10, checkpoint_every_s=0.1)
    engine = running.service.engine
    now = datetime.now(UTC)
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [row("d-last-month", now - timedelta(days=31)),
                                        row("d-last-week", now - timedelta(days=7))], ["decision_id"])
    async with running.http() as client:
        answer = await client.post("/score", json={"user_id": "u1", "candidates": [
            {"tip_id": "tip-a"}, {"tip_id": "tip-b"}]})
    assert answer.status_code == 200, answer.text
    made_now = answer.json()["decision_id"]

    await eventually(lambda: made_now in decision_ids(engine) and "d-last-month" not in decision_ids(engine))
    assert "d-last-week" in decision_ids(engine)


async def test_a_pass_with_nothing_to_delete_reads_no_row_kept_for_a_reward_after_the_cut(database_url: str) -> None:
    """Rows made before the cut and rewarded after it (up to the join window later) cannot go yet. They sat at
    the front of both walks, `created_at`'s index and the primary key's, and every pass, each minute, read them
    all again before it found nothing to delete: ~1.8 million at 5,000 answers a second with a tenth rewarded an
    hour later (bench/retention.py, 100,000 of them: 1.4 s a pass on SQLite, 85 ms on PostgreSQL). Read off the
    index of when each row may go (0009), the pass reads what it deletes."""
    migrate.upgrade(database_url)
    engine = db.make_engine(database_url)
    if engine.dialect.name == "sqlite":
        count_sqlite_steps(engine)
    cut = NOW - timedelta(days=30)

    def late(i: int) -> dict[str, Any]:
        made = cut - timedelta(minutes=i + 1)
        return {**row(served_before_bound(to_ms(made)) + f"{i:016x}", made), "reward": 1.0, "rewards": {"t1": 1.0},
                "rewarded_at": cut + timedelta(minutes=1)}

    def read_by_a_pass() -> int:
        with engine.begin() as conn:
            before = rows_read(conn)
            assert delete_before(conn, cut, 100) == 0
            return rows_read(conn) - before

    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [row("young", NOW)], ["decision_id"])
    read_by_a_pass()  # statements prepared, statistics read
    alone = read_by_a_pass()
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, [late(i) for i in range(2_000)], ["decision_id"])
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE tip_scores"))  # as autovacuum does: the planner's estimates
    assert read_by_a_pass() - alone < 100  # SQLite: ~10 steps a row read; before, 2,000 rows were, twice
    engine.dispose()

"""What a transaction has read of `tip_scores`, on PostgreSQL and SQLite: how a test tells that a query went
through the index meant for it (it reads about the rows it returns), not past rows it leaves."""

from __future__ import annotations

import sqlalchemy as sa


def rows_read(conn: sa.Connection) -> int:
    """What this transaction has read of tip_scores so far: PostgreSQL's count of its rows read (by scans and
    through indexes); SQLite's, of the steps of its statements (each row read takes a few)."""
    if conn.dialect.name == "postgresql":
        return conn.execute(sa.text("SELECT seq_tup_read + idx_tup_fetch FROM pg_stat_xact_user_tables "
                                    "WHERE relname = 'tip_scores'")).scalar_one()
    return conn.info.get("steps", 0)


def count_sqlite_steps(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "begin")
    def _count(conn: sa.Connection) -> None:
        conn.info["steps"] = 0

        def step() -> int:
            conn.info["steps"] += 1
            return 0

        conn.connection.driver_connection.set_progress_handler(step, 1)

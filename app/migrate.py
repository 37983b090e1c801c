"""Apply alembic migrations from code (on start, and in tests)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import migrations

log = logging.getLogger("tipstream.migrate")

# How long one attempt waits for a table lock on PostgreSQL. A DDL statement waiting for its lock
# makes every later query on that table queue behind it: behind a session holding a transaction
# open on `tip_scores` (a backup, a psql left in BEGIN), the running service's writes and
# checkpoints stopped for as long as that session lasted, not just the migration.
LOCK_TIMEOUT_S = 5.0
LOCK_ATTEMPTS = 5
LOCK_NOT_AVAILABLE = "55P03"


class MigrationBlocked(Exception):
    """Another session held a table the migration must lock, through every attempt."""


def alembic_config(url: str) -> Config:
    config = Config()
    # The package path, not a relative one, so it works from any working directory.
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def revisions() -> list[str]:
    """The known revisions, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def upgrade(url: str, revision: str = "head", *, lock_timeout_s: float = LOCK_TIMEOUT_S,
            attempts: int = LOCK_ATTEMPTS, pause_s: float = 1.0) -> None:
    _with_lock_retries(command.upgrade, url, revision, lock_timeout_s, attempts, pause_s)


def downgrade(url: str, revision: str = "base", *, lock_timeout_s: float = LOCK_TIMEOUT_S,
              attempts: int = LOCK_ATTEMPTS, pause_s: float = 1.0) -> None:
    _with_lock_retries(command.downgrade, url, revision, lock_timeout_s, attempts, pause_s)


def _with_lock_retries(step: Callable[[Config, str], None], url: str, revision: str, lock_timeout_s: float,
                       attempts: int, pause_s: float) -> None:
    """Run `step`, again after a pause (doubling) each time a lock wait timed out. An attempt that
    timed out rolled back whole (one transaction on PostgreSQL), so the next starts where it did."""
    config = alembic_config(url)
    config.attributes["lock_timeout_ms"] = max(1, round(lock_timeout_s * 1000))  # read by migrations/env.py
    for attempt in range(1, attempts + 1):
        try:
            step(config, revision)
            return
        except DBAPIError as error:
            if getattr(getattr(error.orig, "diag", None), "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            holders = lock_holders(url, held_for_s=lock_timeout_s)
            if attempt == attempts:
                pids = ", ".join(str(holder["pid"]) for holder in holders) or "<pid>"
                raise MigrationBlocked(
                    f"The migration to {revision} waited for a table lock {attempts} times, {lock_timeout_s:g} s "
                    f"each, and gave up: {describe(holders)}. It waits no longer than that so that the running "
                    f"service's queries do not queue behind it. Let that transaction finish, or end it "
                    f"(`SELECT pg_terminate_backend({pids})`), then try again.") from None
            pause = pause_s * 2 ** (attempt - 1)
            log.warning("The migration to %s waited %g s for a table lock: %s. Trying again in %g s "
                        "(attempt %d of %d).", revision, lock_timeout_s, describe(holders), pause, attempt + 1,
                        attempts)
            time.sleep(pause)


def lock_holders(url: str, held_for_s: float) -> list[dict[str, object]]:
    """The other sessions of this PostgreSQL database holding a lock on one of tipstream's tables
    within a transaction open for at least `held_for_s`: those a migration's lock wait timed out on
    (a shorter transaction began after the wait did)."""
    from app.db import make_engine, metadata

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT DISTINCT a.pid, a.application_name, a.state, a.xact_start,"
                " extract(epoch FROM now() - a.xact_start) AS open_s, left(a.query, 80) AS query"
                " FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                # This schema's tables only: a service on another schema of the database is not in the way.
                " AND c.relname = ANY(:tables) AND c.relnamespace = to_regnamespace(current_schema())"
                " AND a.pid <> pg_backend_pid()"
                " AND a.xact_start <= now() - make_interval(secs => :held_for_s)"
                " ORDER BY a.xact_start"),
                {"tables": [*metadata.tables, "alembic_version"], "held_for_s": held_for_s})
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def describe(holders: list[dict[str, object]]) -> str:
    """
    >>> describe([{"pid": 7, "application_name": "psql", "state": "idle in transaction", "open_s": 135.2,
    ...            "query": "SELECT count(*) FROM tip_scores"}])
    "held by pid 7 (psql, idle in transaction, its transaction open 135 s; last query: 'SELECT count(*) FROM tip_scores')"
    >>> describe([])
    'no session holds it any longer'
    """
    if not holders:
        return "no session holds it any longer"
    return "held by " + "; ".join(
        f"pid {h['pid']} ({h['application_name'] or 'no application name'}, {h['state']}, its transaction open "
        f"{_seconds(float(h['open_s']))} s; last query: {h['query']!r})" for h in holders)


def current(url: str) -> str | None:
    """The revision the database is at; None for an empty database, or an SQLite file that does
    not exist (which this does not create)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.engine import make_url

    from app.db import make_engine

    # SQLAlchemy's reading of the path, as make_engine's: cut from the text, `sqlite:///t.db?timeout=60`
    # named no file (a database at head read as none: `models list` said there was none, and `migrate`
    # refused beside a running service), and `sqlite+pysqlite:///t.db` was opened, creating the file.
    parsed = make_url(url)
    if (parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
            and not Path(parsed.database).exists()):
        return None
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"

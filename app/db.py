"""SQL tables (SQLAlchemy Core) and the engine. Migrations in `migrations/` create them."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TextClause,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

metadata = MetaData()

stream_positions = Table(
    "stream_positions",
    metadata,
    Column("stream", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

user_state = Table(
    "user_state",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("state", LargeBinary, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

user_features = Table(
    "user_features",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("as_of", DateTime(timezone=True), nullable=False),
    Column("features", JSON, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


# -- learning (issue 4): the decision log, the model registry, the learner's state ----------

# One row per decision (a /score answer): what was served, and the rewards credited to it;
# once rewarded, also the decision event itself (JSON text, as published to `decisions.>`),
# which evaluation reads. Unrewarded, the event is only in the stream: its ~2 KB was ~60% of
# the SQL work of a row (measured: 50 us a row with it, 17 without).
tip_scores = Table(
    "tip_scores",
    metadata,
    Column("decision_id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("shadow_version", String(64)),
    Column("prompt_version", String(64)),
    Column("policy", String(32), nullable=False),
    Column("tip_id", String(128), nullable=False),  # ranked first
    Column("score", Float, nullable=False),
    Column("propensity", Float, nullable=False),
    Column("decision", Text),  # set once rewarded
    Column("rewards", JSON),  # {tip_id: reward} for every tip of the decision credited so far
    Column("reward", Float),  # the reward of `tip_id`, once credited
    Column("rewarded_at", DateTime(timezone=True)),
    Index("ix_tip_scores_created_at", "created_at"),
    Index("ix_tip_scores_user_id", "user_id"),
)

# Registry: every version with its latest serialised model; roles and the rollout history.
model_versions = Table(
    "model_versions",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("params", JSON, nullable=False),
    Column("feature_names", JSON, nullable=False),
    Column("card", JSON, nullable=False),  # inputs, offline metrics, fairness (history: model_rollouts)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("model", LargeBinary),
    Column("n_learned", BigInteger, nullable=False, default=0),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

model_roles = Table(  # a view of the history, for SQL readers: who serves now
    "model_roles",
    metadata,
    Column("role", String(16), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("since", DateTime(timezone=True), nullable=False),
)

model_rollouts = Table(  # the source of truth for roles: replayed on load
    "model_rollouts",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("action", String(16), nullable=False),
    Column("version", String(64), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("note", Text, nullable=False),
    Column("cards", JSON, nullable=False),
)

learner_state = Table(
    "learner_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("state", LargeBinary, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def make_engine(url: str) -> Engine:
    """An engine tuned for the dialect: SQLite in WAL mode (readers never block the checkpoint)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def upsert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Iterable[str]) -> None:
    """Insert or update `rows` (dicts with the same columns); `keys` name the unique columns.

    A table without binary columns gets every row in one statement: the rows travel as one
    JSON array that the database expands itself (`json_each` in SQLite, `json_populate_recordset`
    in PostgreSQL). That is for the thread that writes checkpoints beside the event loop:
    SQLite's driver releases and retakes the GIL around every row of an `executemany`, and
    each retake waits for the busy loop to yield, so 5,000 rows took 3.5 ms each there
    (`bench/row_writes.py`); one statement releases the GIL once for all of them.
    """
    if not rows:
        return
    keys = list(keys)
    names = list(rows[0])
    if not any(isinstance(table.c[name].type, LargeBinary) for name in names):
        statement = _json_upsert(conn.dialect.name, table.name, tuple(names), tuple(keys))
        for start in range(0, len(rows), JSON_ROWS_PER_STATEMENT):
            conn.execute(statement, {"rows": orjson.dumps(rows[start : start + JSON_ROWS_PER_STATEMENT]).decode()})
        return
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    statement = insert(table)
    updates = {name: statement.excluded[name] for name in names if name not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates), list(rows))


# Encoding a statement's rows holds the GIL throughout (~1 us a row): 500 rows keep the event
# loop's longest wait for it near half a millisecond, the switch interval.
JSON_ROWS_PER_STATEMENT = 500

# SQLAlchemy's own text form of a datetime in SQLite (microseconds), here always in UTC.
_SQLITE_DATETIME = "strftime('%Y-%m-%d %H:%M:%f', {}) || '000'"


@functools.cache
def _json_upsert(dialect: str, table_name: str, column_names: tuple[str, ...], keys: tuple[str, ...]) -> TextClause:
    table = metadata.tables[table_name]
    columns = [table.c[name] for name in column_names]
    names = ", ".join(column_names)
    updates = ", ".join(f"{c.name} = excluded.{c.name}" for c in columns if c.name not in keys)
    conflict = f"ON CONFLICT ({', '.join(keys)}) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING")
    if dialect == "sqlite":
        values = []
        for c in columns:
            value = f"json_extract(value, '$.{c.name}')"  # a JSON null: NULL
            if isinstance(c.type, DateTime):
                value = _SQLITE_DATETIME.format(value)
            elif isinstance(c.type, JSON):
                value = f"json_quote({value})"  # JSON text, as SQLAlchemy stores it (None: 'null')
            values.append(value)
        # "WHERE true": without it, SQLite would read ON CONFLICT as part of the SELECT's join.
        return text(f"INSERT INTO {table_name} ({names}) SELECT {', '.join(values)} "
                    f"FROM json_each(:rows) WHERE true {conflict}")
    return text(f"INSERT INTO {table_name} ({names}) SELECT {names} "
                f"FROM json_populate_recordset(NULL::{table_name}, CAST(:rows AS json)) {conflict}")

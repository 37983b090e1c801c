"""SQL tables (SQLAlchemy Core) and the engine. Migrations in `migrations/` create them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
    create_engine,
    event,
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
    """Insert or update `rows` (a list passed to execute: executemany, the fast path)."""
    if not rows:
        return
    keys = list(keys)
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    statement = insert(table)
    updates = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates), list(rows))

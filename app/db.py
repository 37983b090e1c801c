"""SQL tables (SQLAlchemy Core) and the engine. Migrations in `migrations/` create them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
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

"""Alembic environment: the URL comes from tipstream's settings unless the caller set one."""

from __future__ import annotations

import logging

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from app.db import make_engine, metadata
from app.settings import get_settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().sqlalchemy_url
log = logging.getLogger("tipstream.migrate")

# PostgreSQL advisory lock key ("tipstrm"): one migration at a time per database. Alembic takes
# none: two services starting on a new release (or `tipstream migrate` beside a start) both read
# the old revision and both ran the next one, and the second failed on the first's tables.
MIGRATION_LOCK = 0x7469707374726D


def hold_migration_lock(connection: Connection) -> None:
    """Wait for any other migration of this PostgreSQL database, inside the migration's
    transaction: the lock goes with its commit or rollback, or with the connection if the
    process dies, and the revision is read only once it is held."""
    if connection.dialect.name != "postgresql":
        return
    if connection.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}).scalar_one():
        return
    log.warning("Another tipstream is migrating this database; waiting for it to finish.")
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=metadata)
            with context.begin_transaction():
                hold_migration_lock(connection)
                context.run_migrations()
    finally:
        engine.dispose()

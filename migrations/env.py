"""Alembic environment: the URL comes from tipstream's settings unless the caller set one."""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from app.db import make_engine, metadata
from app.service_lock import ServiceLock, ServiceLockTaken
from app.settings import get_settings
from migrations import DowngradeRefused

config = context.config
if config.config_file_name is not None:
    # Alembic's own command line (`.venv/bin/alembic downgrade 0006`, as docs/operations.md has it for going
    # back a release), reading alembic.ini: its logging sections say which revisions ran. Unread, the
    # command said nothing, whether it had downgraded or not. `tipstream migrate` passes no file.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
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


def bound_lock_waits(connection: Connection) -> None:
    """Give up a table lock wait after app.migrate's timeout (retried there). Set after the
    advisory lock: another migration may rightly take longer than that."""
    if connection.dialect.name != "postgresql" or "lock_timeout_ms" not in config.attributes:
        return
    connection.execute(text(f"SET LOCAL lock_timeout = {int(config.attributes['lock_timeout_ms'])}"))


def own_sqlite_transactions(engine: Engine) -> None:
    """An upgrade (or downgrade) in one SQLite transaction, as on PostgreSQL. The driver (pysqlite)
    opens none before DDL, so a revision cut short (an error, a kill) left the tables it had created
    at the older revision, and every later upgrade failed on them. BEGIN IMMEDIATE takes the write
    lock first: a second migrator waits (the 30 s busy timeout), then reads the new revision."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: object, _record: object) -> None:
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


# Alembic's commands that change the revision. The others (`current`, `history`, `check`) read it, also
# beside a running service.
REVISION_CHANGES = ("upgrade", "downgrade", "stamp")


def hold_service_lock() -> ServiceLock | None:
    """Under alembic's own command line (`.venv/bin/alembic downgrade <revision>`, docs/operations.md's way back a
    release), the lock a running service holds on its database: taken, no service starts meanwhile; held by
    one, the command ends naming it. Run beside a service, a downgrade dropped what the service writes (0008
    -> 0007: its requests to forget a user got 503s saying the database was away), where `tipstream migrate`
    refuses. tipstream's own commands and the service's start take that lock themselves, or look first."""
    cmd = getattr(config.cmd_opts, "cmd", None)
    if config.config_file_name is None or not cmd or getattr(cmd[0], "__name__", None) not in REVISION_CHANGES:
        return None
    lock = ServiceLock(url)
    try:
        lock.acquire()
    except ServiceLockTaken as taken:
        raise CommandError(f"A tipstream service runs against this database ({taken.holder}): stop it before "
                           f"`alembic {cmd[0].__name__}`, then run it again.") from None
    return lock


if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    service_lock = hold_service_lock()
    engine = make_engine(url)
    own_sqlite_transactions(engine)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=metadata, transactional_ddl=True)
            with context.begin_transaction():
                hold_migration_lock(connection)
                bound_lock_waits(connection)
                context.run_migrations()
    except DowngradeRefused as refused:
        if config.config_file_name is None:  # tipstream's own commands and tests take the exception
            raise
        raise CommandError(str(refused)) from None  # alembic's command line: "FAILED: <message>", exit code 1
    finally:
        engine.dispose()
        if service_lock is not None:
            service_lock.release()

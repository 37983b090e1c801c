"""SQL tables (SQLAlchemy Core) and the engine. Migrations in `migrations/` create them."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
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
    Select,
    String,
    Table,
    Text,
    TextClause,
    cast,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

metadata = MetaData()

stream_positions = Table(
    "stream_positions",
    metadata,
    Column("stream", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # When NATS stored the message at `seq` (µs, its own clock; null: not known): at a start, the
    # same message there says the stream is the one this position was read from.
    Column("stored_us", BigInteger, nullable=True),
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
    # The names of `features` that hold their fallback, not the user's data (null: written before 0006).
    Column("fallbacks", JSON, nullable=True),
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
    Index("ix_tip_scores_user_id", "user_id"),
)
# Evaluation's read (`evaluation.rewarded_decisions`), its only reader: the newest rewarded rows, in its order. The
# rewarded rows only (0010): nine in ten never are, and each row the checkpoint writes paid the index before.
tip_scores_rewarded = tip_scores.c.rewarded_at.is_not(None)
Index("ix_tip_scores_rewarded", tip_scores.c.created_at, tip_scores.c.decision_id, sqlite_where=tip_scores_rewarded,
      postgresql_where=tip_scores_rewarded)


class _GoesAt(FunctionElement[Any]):
    """When a `tip_scores` row may go (app/retention.py): the earlier of when its decision was made (`created_at`)
    and when it was served (the time in an id of ours, `decision_ids`; another publisher's has none), or its
    last reward if that came later. A row goes once this is before the cut (`retention.goes_at_key`). Indexed
    (0009): walking `created_at` or the ids, a pass read every row kept for a reward after the cut again, every
    minute, before any it deleted. PostgreSQL's is a time; SQLite's the milliseconds as 12 hex digits, as in
    our ids: its text times to those cost the checkpoint's row writes less than half what an id's digits to a
    text time did (bench/row_writes.py --against 0008)."""

    inherit_cache = True


@compiles(_GoesAt, "sqlite")
def _goes_at_sqlite(element: _GoesAt, compiler: Any, **kw: Any) -> str:
    return _SQLITE_GOES_AT


@compiles(_GoesAt, "postgresql")
def _goes_at_postgresql(element: _GoesAt, compiler: Any, **kw: Any) -> str:
    return _POSTGRESQL_GOES_AT


# Inline SQL, no parameters: a query uses an expression's index only when it spells the expression the same.
# julianday keeps milliseconds (rounded); 'g' is after every hex time, '' before them.
_SQLITE_MS = "printf('%012x', max(0, CAST(round((julianday({}) - 2440587.5) * 86400000) AS INTEGER)))"
_SQLITE_SERVED = ("CASE WHEN length(decision_id) = 30 AND substr(decision_id, 1, 2) = 'd-' AND "
                  "substr(decision_id, 3, 12) NOT GLOB '*[^0-9a-f]*' THEN substr(decision_id, 3, 12) ELSE 'g' END")
_SQLITE_GOES_AT = (f"max(min({_SQLITE_MS.format('created_at')}, {_SQLITE_SERVED}), "
                   f"CASE WHEN rewarded_at IS NULL THEN '' ELSE {_SQLITE_MS.format('rewarded_at')} END)")
# ltrim, not a regular expression: a third of the expression's cost to each row written.
_POSTGRESQL_SERVED = ("CASE WHEN length(decision_id) = 30 AND substr(decision_id, 1, 2) = 'd-' AND "
                      "ltrim(substr(decision_id, 3, 12), '0123456789abcdef') = '' THEN "
                      "to_timestamp(CAST(CAST(CAST('x' || substr(decision_id, 3, 12) AS bit(48)) AS bigint) AS "
                      "double precision) / 1000) END")
_POSTGRESQL_GOES_AT = f"GREATEST(LEAST(created_at, {_POSTGRESQL_SERVED}), rewarded_at)"  # both pass over NULLs
tip_scores_goes_at = _GoesAt(tip_scores.c.decision_id, tip_scores.c.created_at, tip_scores.c.rewarded_at)
Index("ix_tip_scores_goes_at", tip_scores_goes_at)

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
    Column("n_learned", BigInteger, nullable=False, server_default="0"),  # as 0002 creates it
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

# Requests to forget a user (`app/erasure.py`): one row a user, the record that it was done. `status`
# goes requested -> dropped (their state and rows deleted, in a checkpoint's transaction, with the
# stream positions read to then: `bounds`) -> done (their messages deleted from the streams too).
erasures = Table(
    "erasures",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("requested_by", String(128), nullable=False),
    Column("dropped_at", DateTime(timezone=True)),
    Column("bounds", JSON),  # {stream: the last sequence whose messages of theirs are deleted}
    Column("report", JSON),  # what was deleted, by where
    Column("done_at", DateTime(timezone=True)),
)
# A request done, moved here when its user is asked for again (events of theirs came since): the
# record that they were forgotten then, which the new request's row would replace.
erasures_earlier = Table(
    "erasures_earlier",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("requested_at", DateTime(timezone=True), primary_key=True),
    Column("requested_by", String(128), nullable=False),
    Column("dropped_at", DateTime(timezone=True)),
    Column("bounds", JSON),
    Column("report", JSON),
    Column("done_at", DateTime(timezone=True)),
)


WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024


def make_engine(url: str) -> Engine:
    """An engine tuned for the dialect: SQLite in WAL mode (readers never block the checkpoint).

    Its errors leave out the statement's parameters (`hide_parameters`): a failed checkpoint's warning
    listed the user ids and states it was writing, and a forgotten user's id could stay in the log
    that way, beyond the erasure's reach."""
    if url.startswith("sqlite"):
        path = make_url(url).database  # None or ":memory:" for a database in memory ("sqlite://")
        if path and path != ":memory:":
            try:
                # Its user's only, as a data directory the service creates: `tipstream migrate` run first
                # made it with the umask's mode (0755), which the service then kept, users' data readable.
                Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # The file too, before SQLite makes it with the umask's mode: in a data directory that
                # already existed (0755, say), the users' events and features were readable by every
                # local user. SQLite gives its -wal and -shm files the database file's mode.
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as error:  # as the database failing to open, which app.start_errors.explain tells the operator
                raise OperationalError(f"create {path}", None, error) from None
        # No statement cache (`cached_statements`, 128 a connection): a statement kept prepared keeps the values
        # last bound to it until it runs again, so each connection held a copy of the last checkpoint's users'
        # states and model (SQLite's memory grew with them, 17 MB an hour in bench/soak.py). Prepared at each
        # run instead: a checkpoint of few users takes 0.1-0.6 ms longer (bench/checkpoint_check.py).
        engine = create_engine(url, connect_args={"timeout": 30, "cached_statements": 0}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Deleted rows' bytes are zeroed, not left in the file's free space: forgetting a user deletes theirs.
            # Most builds of SQLite do so by default (Debian's, Python's here), not every one.
            cursor.execute("PRAGMA secure_delete=ON")
            # A burst of large checkpoints grows the WAL file, and SQLite keeps it that size after
            # (18 MB in a soak, for good); past this it is cut back once a checkpoint resets it.
            cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            cursor.close()

        return engine
    try:
        engine = create_engine(url, pool_pre_ping=True, connect_args=_network_bounds(url), hide_parameters=True)
    except ImportError as error:  # e.g. mysql://: SQLAlchemy knows the dialect, but its driver is not installed
        raise ArgumentError(f"its driver, {error.name}, is not installed; tipstream runs on PostgreSQL (psycopg) "
                            "and SQLite") from None
    if engine.dialect.name == "postgresql":
        # Before SQLAlchemy's own first query (insert=True), which a SQL_ASCII database fails with a TypeError.
        event.listen(engine, "first_connect", _refuse_other_encodings, insert=True)
        event.listen(engine, "connect", _in_utc)
        event.listen(engine, "handle_error", _renew_connections_on_setting_refusals)
    return engine


def disk_full(error: BaseException) -> bool:
    """The database's disk (or the user's quota on it) is full: a wait for the database to answer again, which
    the messages for an outage say, mends nothing until someone frees space.

    >>> import sqlite3
    >>> disk_full(sqlite3.OperationalError("database or disk is full")), disk_full(OSError(errno.ENOSPC, "full"))
    (True, True)
    >>> disk_full(sqlite3.OperationalError("database is locked"))
    False
    """
    orig = getattr(error, "orig", None) or error  # SQLAlchemy's error, or the driver's own
    if getattr(orig, "sqlstate", None) == "53100":  # PostgreSQL's disk_full
        return True
    if isinstance(orig, OSError) and orig.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(orig)  # SQLite's SQLITE_FULL


def one_line(error: BaseException, url: Any = None) -> str:
    """`error` for a line of the log: a full disk named with where to free space (`url`, the database's, names
    the disk of a SQLite file), else the driver's first line. SQLAlchemy's next lines are the statement and its
    parameters: users' ids and features, in the log of a step that failed.

    >>> import sqlite3
    >>> one_line(sqlite3.OperationalError("database or disk is full"), "sqlite:////srv/tipstream/tipstream.db")
    "the database's disk is full (database or disk is full): free space on the disk of /srv/tipstream (`df` names it)"
    >>> one_line(ValueError("bad\\n[SQL: INSERT ...]")), one_line(TimeoutError())
    ('bad', 'TimeoutError')
    """
    first = (str(getattr(error, "orig", None) or error).strip().splitlines() or [type(error).__name__])[0]
    if not disk_full(error):
        return first
    return f"the database's disk is full ({first}): " + (
        disk_full_fix(url) if url is not None else "free space on the database's disk")


def briefly(error: BaseException, url: Any = None) -> str:
    """`error`'s type and `one_line`, for a line of the log.

    >>> from sqlalchemy.exc import OperationalError
    >>> briefly(OperationalError("DELETE FROM user_state WHERE user_id = ?", ("u-1",), Exception("database is locked")))
    'OperationalError: database is locked'
    """
    return f"{type(error).__name__}: {one_line(error, url)}"


def disk_full_fix(url: Any) -> str:
    """Where to free space, for a `disk_full` error of the database at `url` (a SQLAlchemy URL)."""
    url = make_url(url) if isinstance(url, str) else url
    if url.get_backend_name() == "sqlite" and url.database:
        return f"free space on the disk of {Path(url.database).resolve().parent} (`df` names it)"
    return "free space on the database server's data disk"


_SQLITE_SCHEMA_REFUSALS = ("no such table:", "no such column:")


def tables_not_this_releases(error: BaseException) -> bool:
    """A statement refused for a table or column missing: the database's schema is not the one this release
    migrates to (`refused_by_setting` names the fix). SQLite says so with an OperationalError, as it says
    'database is locked', so the driver's words tell it from an outage.

    >>> import sqlite3
    >>> tables_not_this_releases(sqlite3.OperationalError("no such table: model_rollouts"))
    True
    >>> tables_not_this_releases(sqlite3.OperationalError("table tip_scores has no column named greedy"))
    True
    >>> tables_not_this_releases(sqlite3.OperationalError("database is locked"))
    False
    """
    orig = getattr(error, "orig", None) or error
    if getattr(orig, "sqlstate", None) in ("42P01", "42703"):  # PostgreSQL's undefined_table, undefined_column
        return True
    if type(orig).__module__ != "sqlite3":
        return False
    text = str(orig)
    return text.startswith(_SQLITE_SCHEMA_REFUSALS) or " has no column named " in text


def away(error: BaseException) -> bool:
    """Whether `error` says the database did not answer (down, unreachable, its connection lost, no pooled
    connection free in time), which a wait may mend. Not a refusal by a database that answered: an
    IntegrityError or DataError (a constraint or trigger the operator added, or a bug of tipstream's) is met
    again by every retry. Ask `refused_by_setting` and `disk_full` first: SQLite says those, and 'database is
    locked', with an OperationalError too.

    >>> import sqlite3
    >>> from sqlalchemy.exc import IntegrityError
    >>> away(OperationalError("COMMIT", None, sqlite3.OperationalError("database is locked")))
    True
    >>> away(IntegrityError("INSERT", None, sqlite3.IntegrityError("a trigger refused it")))
    False
    """
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError))


def refusal(error: BaseException) -> str:
    """`error`, a SQLAlchemy error that is not the database `away` (nor a setting's refusal or a full disk, which
    are told with their fix), as told: its type, which says the database answered and refused (IntegrityError,
    DataError), and the database's first line. `NOT_AN_OUTAGE` goes after.

    >>> import sqlite3
    >>> from sqlalchemy.exc import IntegrityError
    >>> refusal(IntegrityError("INSERT INTO model_rollouts ...", None, sqlite3.IntegrityError("no promotions today")))
    'the database refused it (IntegrityError: no promotions today)'
    """
    what = "the database refused it" if isinstance(error, DBAPIError) else "it failed"  # else a StatementError: ours
    return f"{what} ({type(error).__name__}: {one_line(error)})"


NOT_AN_OUTAGE = ("Not an outage: trying again meets the same refusal until what refuses it changes (a constraint or "
                 "trigger added to tipstream's tables; else a bug of tipstream's to report)")


def refused_by_setting(error: BaseException, user: str | None = None) -> str | None:
    """What a PostgreSQL session setting of the operator's, or a right its user lacks, made the server refuse, and
    the fix; None for anything else. A role's or database's settings (`ALTER ROLE ... SET`) are read as a
    connection opens; a GRANT holds at once."""
    orig = getattr(error, "orig", error)  # SQLAlchemy's error, or the driver's own
    sqlstate = getattr(orig, "sqlstate", None)
    user = user or "<user>"
    if tables_not_this_releases(error):
        # Told as an outage ('the database is away; try again once it is back'), which no wait mended.
        return ("the database's tables are not this tipstream release's (a table or column missing: a downgrade, a "
                "restore of an older backup, a table dropped by hand, or DATABASE_URL naming another database): stop "
                "the service, run `tipstream migrate`, and start it again (docs/operations.md, \"Upgrading\")")
    if sqlstate == "42501":  # insufficient_privilege: a least-privilege user, on a table made after its grants
        # Told as an outage ('the database is away; try again once it is back'), which no wait mended.
        return ("tipstream's user lacks a right on its tables (a least-privilege user, and a table made after the "
                "grants, by a new release's migration or a rebuild): the tables' owner runs `GRANT SELECT, INSERT, "
                f"UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {user}` and `GRANT USAGE ON ALL SEQUENCES IN SCHEMA "
                f"public TO {user}` (another schema than public: its name), and `ALTER DEFAULT PRIVILEGES` for the "
                "tables made later (docs/operations.md, \"On PostgreSQL\")")
    if sqlstate == "25006":  # read_only_sql_transaction
        return ("the database takes no writes from tipstream's user: it is a standby (a failover's old primary, or "
                "DATABASE_URL naming a replica), or default_transaction_read_only is on for the user or the database. "
                "Point DATABASE_URL at the primary (with several hosts, `?target_session_attrs=read-write` picks it), "
                f"or `ALTER ROLE {user} SET default_transaction_read_only = off`")
    if sqlstate == "57014" and "statement timeout" in str(orig):  # query_canceled, by the setting (not a cancel)
        return ("PostgreSQL canceled one of tipstream's statements at statement_timeout, set for its user or the "
                "database (`SHOW statement_timeout`): a checkpoint writes up to 500 rows a statement (one cut short "
                "is written again whole, with what came since), a model's registration reads the decision log. "
                "Raise it for tipstream's user "
                f"(`ALTER ROLE {user} SET statement_timeout = '30s'`, or `?options=-cstatement_timeout%3D30s` in "
                "DATABASE_URL)")
    return None


def _renew_connections_on_setting_refusals(context: Any) -> None:
    """A refusal a session setting made (`refused_by_setting`) ends the pool's connections, as a
    disconnect does: a setting is read once, as a connection opens, so the pool kept connections
    with the old one, and an operator who mended it (`ALTER ROLE ... RESET statement_timeout`, or
    `default_transaction_read_only`) saw every checkpoint fail until a restart."""
    if refused_by_session_setting(context.original_exception):
        context.is_disconnect = True


def refused_by_session_setting(error: BaseException) -> bool:
    """Whether `refused_by_setting` names a setting a connection reads as it opens: not a right its user lacks
    (a GRANT holds on the connections open) nor tables not this release's (a migration's are seen by them).

    >>> import sqlite3
    >>> refused_by_session_setting(sqlite3.OperationalError("no such table: tip_scores"))
    False
    """
    orig = getattr(error, "orig", error)
    return (refused_by_setting(error) is not None and getattr(orig, "sqlstate", None) != "42501"
            and not tables_not_this_releases(error))


def _in_utc(dbapi_connection: Any, _record: Any) -> None:
    """Times read back in UTC, as SQLite's are and as everything else tipstream shows: PostgreSQL gives
    a timestamptz in the session's zone, which initdb sets to the host's, so model cards and their
    rollout history read back as '2026-11-25T20:31:00-03:30' beside entries added since in UTC. A SET,
    not the `options` startup parameter, which PgBouncer refuses."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
    dbapi_connection.commit()  # else the pool's rollback on the connection's return undoes it


class DatabaseReadOnlyError(Exception):
    """A PostgreSQL database that takes no writes from tipstream's user."""


def refuse_read_only(engine: Engine) -> None:
    """Raise DatabaseReadOnlyError, naming why and the fix, if the database takes no writes from this
    user: a start on a standby (a failover's old primary, a replica's address) or with
    `default_transaction_read_only` on migrated nothing, served, and failed every checkpoint, so
    nothing it read or served was saved.

    >>> refuse_read_only(make_engine("sqlite://"))
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        name, user, read_only, standby, source = conn.execute(text(
            "SELECT current_database(), current_user, current_setting('transaction_read_only'), pg_is_in_recovery(), "
            "(SELECT source FROM pg_settings WHERE name = 'default_transaction_read_only')")).one()
    if read_only != "on":
        return
    database, role = quoted(name), quoted(user)
    if standby:
        why = ("The server is a standby (in recovery): point DATABASE_URL at the primary (with several hosts, "
               "`?target_session_attrs=read-write` picks it)")
    elif source == "client":
        why = "DATABASE_URL sets default_transaction_read_only (`options=-cdefault_transaction_read_only=on`): remove it"
    else:
        fix = {"database": f"ALTER DATABASE {database} RESET default_transaction_read_only",
               "user": f"ALTER ROLE {role} RESET default_transaction_read_only",
               "database user": f"ALTER ROLE {role} IN DATABASE {database} RESET default_transaction_read_only",
               }.get(source, f"ALTER ROLE {role} SET default_transaction_read_only = off")
        where = {"database": "the database's", "user": "the user's", "database user": "the user's in this database",
                 "configuration file": "the server's"}.get(source, source)
        why = f"It has default_transaction_read_only on ({where} setting): `{fix}`"
    raise DatabaseReadOnlyError(
        f"The PostgreSQL database {name} takes no writes from tipstream's user {user}: tipstream writes its "
        f"checkpoints, decision log and models there, and would run saving none of them. {why}.")


_POSTGRES_NAMES = postgresql.dialect().identifier_preparer


def quoted(name: str) -> str:
    """A PostgreSQL identifier as a statement must spell it, by SQLAlchemy's own rules: its case, its
    characters and the reserved words (a role named `user` is `"user"`).

    >>> quoted("tipstream"), quoted("Tips-Prod"), quoted("user")
    ('tipstream', '"Tips-Prod"', '"user"')
    """
    return _POSTGRES_NAMES.quote(name)


class DatabaseEncodingError(Exception):
    """A PostgreSQL database not encoded in UTF8."""


def _refuse_other_encodings(dbapi_connection: Any, _record: Any) -> None:
    """Ids, tip ids and features are any Unicode text. A LATIN1 database took the tables and every
    row, until the first user id outside LATIN1 failed its checkpoint, and every checkpoint after
    it, as that user's state was retried with the rest; a SQL_ASCII one failed the migration with
    a TypeError (the driver hands its text back as bytes)."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), current_setting('server_encoding'), "
                       "to_regclass('stream_positions') IS NOT NULL")
        name, encoding, serving = (value.decode("ascii", "replace") if isinstance(value, bytes) else value
                                   for value in cursor.fetchone())
    dbapi_connection.rollback()  # as the pool hands it over: no transaction open
    if encoding.upper() != "UTF8" and serving and encoding.upper() != "SQL_ASCII":
        # A service already runs on it, and has met no id the encoding cannot hold (or its checkpoints
        # would be failing): refused, an upgrade would stop it over what may never come. Said instead.
        logging.getLogger("tipstream").warning(
            "The PostgreSQL database %s is encoded %s, not UTF8: the first user id, tip id or feature %s cannot hold "
            "will fail every checkpoint from then on. Move to a UTF8 database (`createdb -E UTF8 -T template0 "
            "<name>`, `pg_dump %s | psql <name>`, then DATABASE_URL) before one comes.", name, encoding, encoding, name)
    elif encoding.upper() != "UTF8":
        raise DatabaseEncodingError(
            f"The PostgreSQL database {name} is encoded {encoding}, not UTF8: tipstream keeps user ids, tip ids and "
            f"features as Unicode text, and the first one {encoding} cannot hold would fail every checkpoint from "
            f"then on. Create a UTF8 database (`createdb -E UTF8 -T template0 <name>`) and set DATABASE_URL to it; "
            f"to keep what this one holds, copy it over first (`pg_dump {name} | psql <name>`).")


# How long a PostgreSQL host may stay silent before a call gives up (and the caller treats the
# database as away). libpq by default waits for ever for a server that accepts the connection
# and never answers, ~15 minutes (TCP's retries) for one that stops acknowledging what is sent,
# and ~2 hours (the first keepalive) for a link that dies while an answer is awaited: a start
# hung that long, and a checkpoint, and what waited on a user's read (`app/thaw.py`, which gives
# up waiting after 10 s, but whose worker thread stays busy). A server whose kernel still
# acknowledges while the server itself is wedged is not bounded here; nothing in libpq can tell
# it from a slow query: checkpoints tell it after `checkpoints.SLOW_CHECKPOINT_S`, and the stop
# gives it `bootstrap.STOP_DATABASE_ANSWER_S` before it ends without the threads it holds.
NETWORK_BOUNDS = {"connect_timeout": 10, "tcp_user_timeout": 10_000,
                  "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def autovacuum_is_off(engine: Engine) -> bool:
    """Whether the database is a PostgreSQL server whose autovacuum is off (SQLite has none to turn off).

    >>> autovacuum_is_off(make_engine("sqlite://"))
    False
    """
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        return conn.execute(text("SHOW autovacuum")).scalar() == "off"


def _network_bounds(url: str) -> dict[str, int]:
    """libpq's timeouts that `url` does not set itself (its query may: `?connect_timeout=30`).

    >>> _network_bounds("postgresql+psycopg://db/tipstream")["connect_timeout"]
    10
    >>> "connect_timeout" in _network_bounds("postgresql+psycopg://db/tipstream?connect_timeout=30")
    False
    """
    given = make_url(url).query
    return {name: value for name, value in NETWORK_BOUNDS.items() if name not in given}


def json_as_text(table: Table) -> Select:
    """Every column of `table`, its JSON ones as their text, for the caller to decode row by row: decoded as the rows
    were fetched, one cut short (a disk fault, a hand's UPDATE) failed the whole read, naming no row."""
    return select(*(cast(column, Text).label(column.name) if isinstance(column.type, JSON) else column
                    for column in table.columns))


def upsert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Iterable[str],
           replace: bool = True) -> None:
    """Insert or update `rows` (dicts with the same columns); `keys` name the unique columns.
    `replace=False`: insert only the rows whose keys the table does not hold yet, leave the others as they are
    (a table without binary columns only).

    Many rows go in each statement, never one statement per row: checkpoints are written from
    a thread beside the event loop, and SQLite's driver releases and retakes the GIL around
    every row of an `executemany`; each retake waits for the busy loop's switch interval, so
    a row took 195-347 us there instead of ~12 (`bench/row_writes.py`). A table without
    binary columns sends its rows as one JSON array that the database expands (`json_each`,
    `json_populate_recordset`): encoding it is one fast call. A table with binary columns
    (user states) gets multi-row VALUES with the driver's own parameters.
    """
    if not rows:
        return
    names, keys = tuple(rows[0]), tuple(keys)
    if any(isinstance(table.c[name].type, LargeBinary) for name in names):
        if not replace:
            raise ValueError(f"{table.name}: rows with binary columns are always replaced (replace=False is for "
                             "tables without them)")
        _values_upsert(conn, table, names, keys, rows)
        return
    statement = _json_upsert(conn.dialect.name, table.name, names, keys, replace)
    for start in range(0, len(rows), JSON_ROWS_PER_STATEMENT):
        # numpy scalars too, as SQLAlchemy's JSON columns (the stdlib's json) took them
        encoded = orjson.dumps(rows[start : start + JSON_ROWS_PER_STATEMENT], option=orjson.OPT_SERIALIZE_NUMPY)
        conn.execute(statement, {"rows": encoded.decode()})


# Encoding a statement's rows, or binding its parameters, holds the GIL throughout (~1 us a
# row, ~0.4 us a parameter): these bounds keep the event loop's longest wait for it near
# half a millisecond, the switch interval.
JSON_ROWS_PER_STATEMENT = 500
PARAMETERS_PER_STATEMENT = 1_500


def _values_upsert(conn: Connection, table: Table, names: tuple[str, ...], keys: tuple[str, ...],
                   rows: Sequence[dict[str, Any]]) -> None:
    dialect = conn.dialect
    # SQLAlchemy's own conversions, so the rows read back as if it had written them.
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
    in_utc = dialect.name == "sqlite"  # SQLite keeps a datetime as text: the same instant must sort the same
    start = 0
    for count in statement_sizes(len(rows), max(1, PARAMETERS_PER_STATEMENT // len(names))):
        chunk = rows[start : start + count]
        start += count
        params: list[Any] = []
        for row in chunk:
            for name, process in zip(names, processors):
                value = row[name]
                if in_utc and isinstance(value, datetime) and value.tzinfo is not None:
                    value = value.astimezone(UTC)
                params.append(process(value) if process is not None and value is not None else value)
        conn.exec_driver_sql(_values_sql(dialect.name, table.name, names, keys, len(chunk)), tuple(params))


def statement_sizes(total: int, most: int) -> Iterator[int]:
    """The row counts of the statements that write `total` rows, `most` at most each: as many of `most` as
    fit, then powers of two. Each count is a statement of its own text, which SQLite's driver prepared and
    kept (128 a connection, before `make_engine` turned its cache off) and psycopg prepares on the server
    after a few runs: a checkpoint's users,
    any number from 1 to `most`, made as many statements, and the service's resident memory grew ~70 MB a
    connection over its first ~20 minutes (bench/soak.py). At most log2(`most`) + 2 texts now.

    >>> list(statement_sizes(1234, 500)), list(statement_sizes(7, 500)), list(statement_sizes(3, 1))
    ([500, 500, 128, 64, 32, 8, 2], [4, 2, 1], [1, 1, 1])
    """
    full, rest = divmod(total, most)
    yield from [most] * full
    size = 1 << (rest.bit_length() - 1) if rest else 0
    while rest:
        if size <= rest:
            yield size
            rest -= size
        size >>= 1


@functools.cache
def _values_sql(dialect: str, table_name: str, names: tuple[str, ...], keys: tuple[str, ...], count: int) -> str:
    mark = "?" if dialect == "sqlite" else "%s"
    row = "(" + ", ".join([mark] * len(names)) + ")"
    return f"INSERT INTO {table_name} ({', '.join(names)}) VALUES {', '.join([row] * count)} {_on_conflict(names, keys)}"


def _on_conflict(names: Iterable[str], keys: tuple[str, ...], replace: bool = True) -> str:
    updates = ", ".join(f"{name} = excluded.{name}" for name in names if name not in keys) if replace else ""
    return f"ON CONFLICT ({', '.join(keys)}) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING")


# SQLAlchemy's own text form of a datetime in SQLite (microseconds), here always in UTC.
_SQLITE_DATETIME = "strftime('%Y-%m-%d %H:%M:%f', {}) || '000'"


@functools.cache
def _json_upsert(dialect: str, table_name: str, column_names: tuple[str, ...], keys: tuple[str, ...],
                 replace: bool = True) -> TextClause:
    table = metadata.tables[table_name]
    columns = [table.c[name] for name in column_names]
    names = ", ".join(column_names)
    conflict = _on_conflict(column_names, keys, replace)
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

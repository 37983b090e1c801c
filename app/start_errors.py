"""Each start-up failure the operator can fix, told as one message: what failed, which setting, what
to do (`explain`). The database's and JetStream's refusals each get their own fix; a URL in a message
is shown without its password or token."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.settings import Settings


class StartupError(RuntimeError):
    """A start that cannot go on: the message names what failed, the setting and the fix."""


# What mends a database holding a row damaged (cut short, or overwritten by hand or by a disk fault) that the service
# cannot do without; a sentence left open, for what to do after.
DAMAGED_DATABASE_FIXES = (
    "Restore the database from a backup (docs/operations.md, 'Backups and restores'), or rebuild it from the streams "
    "(docs/operations.md, 'Rebuilding from the log'; registry changes are lost, make them again)")

# The learner's rows in `learner_state`, by name (a minute's credits: `credits:<minute>`), as a message names them.
_LEARNER_ROWS = {"prior": "the popularity prior", "learner": "the learner's stream positions and waiting feedback",
                 "credits:": "the credits given in one minute"}


class UnreadableLearnerState(StartupError):
    """A `learner_state` row that cannot be decoded, read at the start (`Learner.restore`): an UnpicklingError,
    ValueError or orjson traceback named neither the row nor a fix. None has a stand-in that loses nothing (the
    prior and the credits are what was learned from feedback the streams are no longer read from again; the
    positions are where to read them from), so the start stops.

    >>> str(UnreadableLearnerState("credits:29000000", "JSONDecodeError: unexpected end of data"))[:118]
    "The learner_state row 'credits:29000000' (the credits given in one minute) cannot be read (JSONDecodeError: unexpected"
    """

    def __init__(self, name: str, cause: str) -> None:
        what = next((held for row, held in _LEARNER_ROWS.items() if name.startswith(row)), "the learner's")
        super().__init__(f"The learner_state row {name!r} ({what}) cannot be read ({cause}): the database holds it "
                         f"damaged. {DAMAGED_DATABASE_FIXES}, then start tipstream again.")
        self.name, self.cause = name, cause


@contextmanager
def reading_learner_row(name: str) -> Iterator[None]:
    """What fails in the block, as the `learner_state` row `name` damaged (`UnreadableLearnerState`): whatever the
    bytes decode to, cut short or overwritten they fail as pickle, numpy, JSON or a missing key do."""
    try:
        yield
    except UnreadableLearnerState:
        raise
    except Exception as error:  # noqa: BLE001 - a dozen types, as above
        raise UnreadableLearnerState(name, f"{type(error).__name__}: {error}") from None


def shown_url(url: str) -> str:
    """`url` for a message or the log: without the password or token it may carry, as the
    database's is left out.

    >>> shown_url("nats://tipstream:hunter2@nats.internal:4222"), shown_url("nats://s3cret@h:4222")
    ('nats://tipstream:***@nats.internal:4222', 'nats://***@h:4222')
    >>> shown_url("nats://127.0.0.1:4222")
    'nats://127.0.0.1:4222'

    A password may hold an '@' (nats-py, as urllib, reads the host after the last one):

    >>> shown_url("nats://tipstream:p@ss@nats.internal:4222,nats://b:pw@h2:4222")
    'nats://tipstream:***@nats.internal:4222,nats://b:***@h2:4222'
    """
    return re.sub(r"(?<=://)([^/@:]*:)?[^/]*@", lambda found: f"{found.group(1) or ''}***@", url)


def shown_database_url(url: str) -> str:
    """A database URL for a message, without its password.

    >>> shown_database_url("postgresql+psycopg://tipstream:hunter2@db/tipstream")
    'postgresql+psycopg://tipstream:***@db/tipstream'

    libpq also takes the password as a query parameter, which `hide_password` leaves as it is:

    >>> shown_database_url("postgresql+psycopg://tipstream@db/tipstream?password=hunter2&sslmode=require")
    'postgresql+psycopg://tipstream@db/tipstream?password=***&sslmode=require'
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    secret = {key: "***" for key in parsed.query if key.lower() in _SECRET_QUERY_KEYS}
    if secret:
        parsed = parsed.update_query_dict(secret)
    return parsed.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


_SECRET_QUERY_KEYS = ("password", "sslpassword")


def data_dir_is_a_file(data_dir: Path) -> str | None:
    """Why TIPSTREAM_DATA_DIR cannot be made a directory when a file stands in its way (itself or one
    of its parents): the OS said only "File exists" or "Not a directory". None otherwise."""
    for part in (data_dir, *data_dir.parents):
        if part.exists():
            if part.is_dir():
                return None
            return (f"{part} is a file, not a directory. Set TIPSTREAM_DATA_DIR to a directory (one that does not "
                    "exist yet is made), or move that file away.")
    return None


def explain(error: BaseException, settings: Settings) -> StartupError | None:
    """A start-up failure the operator can fix, as a message; None for anything else (a bug: its
    traceback is the useful report)."""
    if isinstance(error, StartupError):
        return error
    from app.embedded_nats import EmbeddedNatsError

    if isinstance(error, EmbeddedNatsError):
        return StartupError(f"{str(error)[:1].upper()}{str(error)[1:]}. Or set NATS_URL to a NATS server with "
                            "JetStream, and tipstream uses it instead of starting its own.")
    from nats.js.errors import APIError
    from sqlalchemy.exc import ArgumentError, DBAPIError

    if (isinstance(error, (ArgumentError, DBAPIError, ValueError)) and settings.database_url
            and _at_in_userinfo(settings.database_url)):
        # Neither the URL nor the error shown: both hold what followed the password's '@', read as the host.
        return StartupError(
            "DATABASE_URL has an '@' in its user or password: a URL ends them at the first '@', so the rest of "
            "the password was read as the host (and the port), the database could not be reached, and what the "
            "driver said would show that rest. Percent-encode the password's reserved characters (@ %40, : %3A, / %2F, "
            "? %3F, # %23, % %25, [ %5B, ] %5D): `python3 -c 'import urllib.parse, getpass; "
            "print(urllib.parse.quote(getpass.getpass(), safe=\"\"))'` prints it so.")
    if isinstance(error, ArgumentError):  # not echoed: the URL may hold a password
        url = settings.database_url or ""
        # SQLAlchemy's "Could not parse" for a URL with a space or line break around it said nothing of them.
        spaced = " It has spaces or a line break around it: remove them." if url != url.strip() else ""
        return StartupError(f"DATABASE_URL is not a database URL tipstream can use ({error}).{spaced} Write it as "
                            "`postgresql+psycopg://user:password@host/database`, or unset it for SQLite under "
                            "TIPSTREAM_DATA_DIR.")
    if isinstance(error, DBAPIError):
        return _database_error(error, settings)
    from app.db import DatabaseEncodingError, DatabaseReadOnlyError

    if isinstance(error, (DatabaseEncodingError, DatabaseReadOnlyError)):
        return StartupError(str(error))
    from alembic.util import CommandError

    from app.migrate import MigrationBlocked

    if isinstance(error, MigrationBlocked):
        return StartupError(f"Cannot migrate the database {shown_database_url(settings.sqlalchemy_url)}: {error}")
    if isinstance(error, CommandError):  # e.g. a revision this release does not know: a newer one migrated it
        from app.migrate import revisions

        where, other = ("DATABASE_URL", "database") if settings.database_url else ("TIPSTREAM_DATA_DIR", "directory")
        # A release rolled back finds the database its successor migrated: "run that release" is no fix
        # for a rollback, and the downgrade only that release's migrations know how to do was not named.
        head = revisions()[-1]
        return StartupError(f"Cannot migrate the database {shown_database_url(settings.sqlalchemy_url)} ({where}): "
                            f"{error}. Another release of tipstream wrote it (a newer one, if this one does not know "
                            f"its revision): run that release on it, or set {where} to another {other}. To go back "
                            f"to this release on it, stop the service, then take the database down to this release's "
                            f"schema with the newer release's migrations: `.venv/bin/alembic downgrade {head}` in its "
                            "directory (docs/operations.md, \"Upgrading\").")
    if isinstance(error, ValueError) and not _parses(settings.sqlalchemy_url):  # e.g. a port that is not a number
        return StartupError(f"DATABASE_URL cannot be read ({error}). Write it as "
                            "`postgresql+psycopg://user:password@host:5432/database`, or unset it for SQLite under "
                            "TIPSTREAM_DATA_DIR.")
    if isinstance(error, APIError):
        return _jetstream_error(error, settings)
    return None


def _at_in_userinfo(url: str) -> bool:
    """Whether the URL has an '@' before the one that ends its user and password, which is how a password
    holding '@' reads unencoded.

    >>> _at_in_userinfo("postgresql+psycopg://tipstream:p@ss@db/tipstream")
    True
    >>> _at_in_userinfo("postgresql+psycopg://tipstream:p@ss#w/rd:1?@db:5432/tipstream")
    True
    >>> _at_in_userinfo("postgresql+psycopg://tipstream:p%40ss@db/tipstream?options=-csearch_path%3Dtips")
    False
    >>> _at_in_userinfo("postgresql+psycopg:///tipstream?host=/run/postgresql&user=tips")
    False
    """
    rest = url.split("://", 1)[-1]
    return not rest.startswith("/") and rest.count("@") > 1


def _parses(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        make_url(url)
    except ValueError:
        return False
    return True


# PostgreSQL's SQLSTATEs for a user without the right to create in a schema or write a table
# (insufficient_privilege), or without USAGE on any schema of its search_path (invalid_schema_name:
# "no schema has been selected to create in").
NOT_ALLOWED = ("42501", "3F000")


def _database_error(error: Any, settings: Settings) -> StartupError:
    from sqlalchemy.engine import make_url

    url = shown_database_url(settings.sqlalchemy_url)
    cause = _cause(error)
    if getattr(getattr(error.orig, "diag", None), "sqlstate", None) in NOT_ALLOWED:
        user = make_url(settings.sqlalchemy_url).username or "<user>"
        if owned := re.fullmatch(r"must be owner of \w+ (.+)", cause):
            # A GRANT gives no right to drop or alter a table: telling one did nothing for a migration (or
            # `tipstream migrate base`) run as a user that may only read and write tables the owner made.
            owner = _owner_of(settings.sqlalchemy_url, owned.group(1))
            return StartupError(
                f"The database {url} (DATABASE_URL) refused tipstream's user: {cause}. Creating, changing and "
                f"dropping tipstream's tables (a migration, `tipstream migrate base`) is for their owner"
                f"{f', {owner}' if owner else ''}: run `tipstream migrate` (or `migrate base`) with DATABASE_URL "
                f"naming {owner or 'that user'}. A user that only reads and writes them (SELECT, INSERT, UPDATE, "
                "DELETE, and USAGE on their sequences) runs the service once the owner has migrated them to its "
                "release.")
        schema, exists = _schema_to_grant(settings.sqlalchemy_url, cause)
        if not exists:
            return StartupError(
                f"The database {url} (DATABASE_URL) refused tipstream's user: {cause}. Schema {schema}, the first of "
                f"the user's search_path, does not exist: create it (`CREATE SCHEMA {schema} AUTHORIZATION {user}`), "
                "or name one that does in DATABASE_URL (`?options=-csearch_path%3D<schema>`).")
        where = ("PostgreSQL 15 and later let only the database's owner create in `public`: " if schema == "public"
                 else f"schema {schema} is the first of the user's search_path: ")
        return StartupError(
            f"The database {url} (DATABASE_URL) refused tipstream's user: {cause}. tipstream creates and "
            f"writes its own tables: grant that ({where}`GRANT USAGE, CREATE ON SCHEMA {schema} TO {user}`, and on "
            f"tables another user made, `GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {user}` and the same ON ALL "
            "SEQUENCES), or set DATABASE_URL to the owner's user.")
    from app.db import refused_by_setting

    # A migration on a read-only database: why, and the fix, as a start at head is told.
    if getattr(error.orig, "sqlstate", None) == "25006" and (why := _read_only(settings.sqlalchemy_url)):
        return StartupError(why)
    if (setting := refused_by_setting(error, make_url(settings.sqlalchemy_url).username)) is not None:
        return StartupError(f"The database {url} (DATABASE_URL) refused tipstream: {cause}: {setting}.")
    if cause == "database is locked":  # SQLite, after its 30 s busy timeout: the path is fine
        where = "DATABASE_URL" if settings.database_url else "SQLite under TIPSTREAM_DATA_DIR"
        return StartupError(f"The database {url} ({where}) stayed locked by another process for 30 s: a "
                            "migration, a tool holding a write transaction open, or another tipstream on a copy "
                            "of this data directory. Stop it (or let it finish) and start again.")
    if cause in ("attempt to write a readonly database", "unable to open database file"):
        # Files another user made (`sudo tipstream migrate` once): "a directory this user can write" missed them.
        database = Path(make_url(settings.sqlalchemy_url).database or "")
        theirs = [path for path in (database, *(database.with_name(database.name + end) for end in ("-wal", "-shm")))
                  if path.exists() and not os.access(path, os.R_OK | os.W_OK)]
        if theirs:
            owners = ", ".join(f"{path.name} (uid {path.stat().st_uid}, mode {path.stat().st_mode & 0o777:o})"
                               for path in theirs)
            fix = (f"Make them writable (`chmod u+rw {database}*`)" if all(p.stat().st_uid == os.getuid() for p in theirs)
                   else f"Give them to it (`chown {os.getuid()} {database}*`), or run tipstream as the user that "
                        "owns them")
            return StartupError(f"Cannot write the database {url}: {cause}; this user (uid {os.getuid()}) may not "
                                f"write {owners}. {fix}.")
    # SQLite's SQLITE_FULL: "a directory this user can write" is no fix. A full disk is also a "disk I/O error"
    # when the -wal or -shm file (gone after a clean stop) cannot be made (a restart with DATABASE_URL on a full
    # tmpfs).
    if cause == "database or disk is full" or (cause == "disk I/O error" and _sqlite_disk_full(settings)):
        where, elsewhere = (("DATABASE_URL", "DATABASE_URL to a file") if settings.database_url else
                            ("SQLite under TIPSTREAM_DATA_DIR", "TIPSTREAM_DATA_DIR to a directory"))
        return StartupError(f"Cannot write the database {url} ({where}): its disk is full. Free space on it (`df` "
                            f"names the disk), or set {elsewhere} on another disk.")
    if settings.database_url and settings.database_url.startswith("sqlite"):
        fix = "Set DATABASE_URL to a file in a directory this user can write, or unset it for TIPSTREAM_DATA_DIR's."
        return StartupError(f"Cannot open the database {url} (DATABASE_URL): {cause}. {fix}")
    if settings.database_url:
        fix = _connection_fix(cause, make_url(settings.sqlalchemy_url).username or "<user>") or (
            "Check that the server runs and the database exists (e.g. `createdb`), or unset DATABASE_URL "
            "for SQLite under TIPSTREAM_DATA_DIR.")
        return StartupError(f"Cannot open the database {url} (DATABASE_URL): {cause}. {fix}")
    if (in_the_way := data_dir_is_a_file(settings.data_dir)) is not None:
        return StartupError(f"Cannot use the data directory {settings.data_dir} (TIPSTREAM_DATA_DIR): {in_the_way}")
    return StartupError(f"Cannot open the database {url} (SQLite under TIPSTREAM_DATA_DIR): {cause}. "
                        "Set TIPSTREAM_DATA_DIR to a directory this user can write, or DATABASE_URL to PostgreSQL.")


def _sqlite_disk_full(settings: Settings) -> bool:
    import shutil

    from sqlalchemy.engine import make_url

    url = make_url(settings.sqlalchemy_url)
    database = url.database
    if url.get_backend_name() != "sqlite" or not database:
        return False
    try:
        return shutil.disk_usage(Path(database).resolve().parent).free < 1 << 20
    except OSError:
        return False


def _connection_fix(cause: str, user: str) -> str | None:
    """The fix for a connection PostgreSQL (or libpq) refused for a reason other than the server or the
    database being away, which is all the message used to say: 'check that the server runs and the
    database exists' after a wrong password or a connection limit sent the operator the wrong way.

    >>> print(_connection_fix('connection failed: connection to server at "db" (10.0.0.5), port 5432 failed: '
    ...                       'FATAL:  password authentication failed for user "tipstream"', "tipstream"))
    The server refused the password of tipstream (or has no such user, which it does not tell): write the right user and password in DATABASE_URL (`postgresql+psycopg://tipstream:<password>@host/database`, with @ : / % ? # in it written %40 %3A %2F %25 %3F %23), or in ~/.pgpass.
    >>> _connection_fix("connection failed: connection to server at ... failed: Connection refused", "t") is None
    True
    """
    from app.db import quoted

    if "password authentication failed" in cause:
        return (f"The server refused the password of {user} (or has no such user, which it does not tell): write "
                "the right user and password in DATABASE_URL "
                f"(`postgresql+psycopg://{user}:<password>@host/database`, with @ : / % ? # in it written %40 %3A %2F "
                "%25 %3F %23), or in ~/.pgpass.")
    if "no password supplied" in cause:
        return (f"The server asks for {user}'s password and DATABASE_URL gives none: add it "
                f"(`postgresql+psycopg://{user}:<password>@host/database`), or put it in ~/.pgpass.")
    if "server does not support SSL, but SSL was required" in cause:
        return ("DATABASE_URL asks for SSL (`sslmode=require`, `verify-ca` or `verify-full`) and the server offers "
                "none: turn on `ssl` in the server's postgresql.conf, or, on a network where the link needs no "
                "encryption, take sslmode out of DATABASE_URL.")
    if re.search(r'root certificate file ".*" does not exist', cause):
        return ("DATABASE_URL asks to check the server's certificate (`sslmode=verify-full` or `verify-ca`) against "
                "a CA file that is not there: name the CA that signed it (`sslrootcert=/path/to/ca.pem`), or "
                "`sslrootcert=system` for the system's CAs.")
    if "does not match host name" in cause:
        return ("The server's certificate names another host than DATABASE_URL's: write the host as the certificate "
                "names it, or use `sslmode=verify-ca`, which checks who signed the certificate but not the name.")
    if "certificate verify failed" in cause:
        return ("The server's certificate is not signed by the CA DATABASE_URL names (`sslrootcert`, else "
                "~/.postgresql/root.crt): name the CA that signed it.")
    if "no pg_hba.conf entry" in cause:
        return (f"The server's pg_hba.conf has no line that lets {user} in from this host to this database: add "
                "one (then `SELECT pg_reload_conf()`), or connect as a user it lets in.")
    if re.search(r'role ".*" does not exist', cause):
        return f"Create the user (`CREATE ROLE {user} LOGIN PASSWORD '...'`), or name one that exists in DATABASE_URL."
    limit = re.search(r"too many connections for (database|role) \"(.*)\"", cause)
    if limit or "too many clients already" in cause or "remaining connection slots are reserved" in cause:
        where = (f"`ALTER {limit.group(1).upper()} {quoted(limit.group(2))} CONNECTION LIMIT <n>`" if limit
                 else "the server's max_connections")
        return (f"The server is at its limit of connections ({where}): tipstream holds one for its lock and opens "
                "up to 15 more at a peak (its pool keeps 5). Raise the limit, or end the sessions that hold the "
                "connections (`SELECT * FROM pg_stat_activity`).")
    return None


@contextmanager
def _throwaway_engine(url: str) -> Iterator[Any]:
    """An engine for one question asked while the start fails, disposed of after it."""
    from app.db import make_engine

    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _owner_of(url: str, table: str) -> str | None:
    from sqlalchemy import text

    try:
        with _throwaway_engine(url) as engine, engine.connect() as conn:
            return conn.execute(text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(:t)"),
                                {"t": table}).scalar()
    except Exception:  # noqa: BLE001 - the message goes on without the name
        return None


def _read_only(url: str) -> str | None:
    from app.db import DatabaseReadOnlyError, refuse_read_only

    try:
        with _throwaway_engine(url) as engine:
            refuse_read_only(engine)
    except DatabaseReadOnlyError as read_only:
        return str(read_only)
    except Exception:  # noqa: BLE001 - the server's own words then
        return None
    return None


def _schema_to_grant(url: str, cause: str) -> tuple[str, bool]:
    """The schema tipstream's tables go in, which the GRANT must name, and whether it exists: the one
    the server refused, else the first of the user's search_path it may use (`options=-csearch_path=
    tipstream` in DATABASE_URL, or `ALTER ROLE ... SET search_path`), else the first it names. The
    message named `public` whatever the search_path, and the GRANT it gave changed nothing."""
    refused = re.fullmatch(r"permission denied for schema (.+)", cause)
    from sqlalchemy import text

    from app.db import quoted

    try:
        with _throwaway_engine(url) as engine, engine.connect() as conn:
            schema, path = conn.execute(text("SELECT current_schema(), current_setting('search_path')")).one()
            named = [name.strip().strip('"') for name in path.split(",")]
            schema = (refused.group(1) if refused else
                      schema or next((name for name in named if name and name != "$user"), "public"))
            exists = conn.execute(text("SELECT count(*) FROM pg_namespace WHERE nspname = :name"),
                                  {"name": schema}).scalar_one() > 0
    except Exception:  # noqa: BLE001 - the message goes on with what the server said, or PostgreSQL's default
        return (refused.group(1) if refused else "public"), True
    return quoted(schema), exists


def _cause(error: Any) -> str:
    """What failed, in one line: the server's own message when it answered (psycopg's text goes
    on with the statement's "LINE 2: ..." and a caret, or a DETAIL), else the driver's."""
    primary = getattr(getattr(error.orig, "diag", None), "message_primary", None)
    if primary:
        return primary.strip()
    return _last_failure(str(error.orig or error))


def _last_failure(text: str) -> str:
    r"""The failure in libpq's text: the last line that says what failed.

    It ends a refused connection with an indented hint ("Is the server running on that host...?"), and
    a missing root certificate with one that is not indented, which was taken for the failure: the file
    it names was left out.

    >>> _last_failure('connection failed: connection to server at "db", port 5432 failed: Connection refused\n'
    ...               '\tIs the server running on that host and accepting TCP/IP connections?')
    'connection failed: connection to server at "db", port 5432 failed: Connection refused'
    >>> _last_failure('connection failed: connection to server at "db", port 5432 failed: root certificate file '
    ...               '"/root/.postgresql/root.crt" does not exist\nEither provide the file, use the system\'s '
    ...               'trusted roots with sslrootcert=system, or change sslmode to disable server certificate '
    ...               'verification.')
    'connection failed: connection to server at "db", port 5432 failed: root certificate file "/root/.postgresql/root.crt" does not exist'
    """
    lines = [line for line in text.strip().splitlines() if not line[:1].isspace()] or text.strip().splitlines()
    return next((line for line in reversed(lines) if " failed: " in line), lines[-1]).strip()


def _storage_fix(settings: Settings) -> str:
    if settings.stream_max_bytes > 0:
        return (f"Each of tipstream's four streams reserves TIPSTREAM_STREAM_MAX_BYTES={settings.stream_max_bytes} "
                f"bytes ({4 * settings.stream_max_bytes:,} in all) of the account's JetStream file storage "
                "(`max_file` in the account's `jetstream {}` limits, or the server's `max_file_store`): lower "
                "TIPSTREAM_STREAM_MAX_BYTES to fit, or raise that limit.")
    return ("The account's or the server's JetStream file storage is full (`max_file` in the account's "
            "`jetstream {}` limits, the server's `max_file_store`, or the disk of its store_dir): free or raise it.")


# The account limits and cluster sizes (nats-server's JetStream error codes, the same from 2.9 to 2.15) a start
# can run into, and what the operator does about each; the server's own words say only what was hit.
_JETSTREAM_FIXES: dict[int | None, Callable[[Settings], str]] = {
    10039: lambda _: ("Enable JetStream for the account of NATS_URL's user (`jetstream: enabled`, or limits, in "
                      "the account's config), connect as a user of an account that has it, or unset NATS_URL to run "
                      "an embedded server."),
    10027: lambda _: ("tipstream needs four streams of its own (SIGNALS, FEEDBACK, DECISIONS, DLQ) beside the "
                      "account's others: raise `max_streams` in the account's `jetstream {}` limits, or give "
                      "tipstream an account of its own."),
    10026: lambda _: ("tipstream needs one consumer of its own on each of SIGNALS, FEEDBACK and DECISIONS: raise "
                      "`max_consumers` (nats-server counts it per stream) in the account's `jetstream {}` limits, or "
                      "remove the consumers nobody needs from those streams (`nats consumer ls`)."),
    10113: lambda _: ("This account requires every stream to have a byte limit (`max_bytes_required`): set "
                      "TIPSTREAM_STREAM_MAX_BYTES, in bytes per stream (the four streams reserve four times that of "
                      "the account's storage, and drop their oldest events at it)."),
    10047: _storage_fix,
    10074: lambda s: (f"TIPSTREAM_STREAM_REPLICAS={s.stream_replicas} asks for {s.stream_replicas} copies of each "
                      "stream, and NATS_URL names a single server (no cluster), which keeps one: set "
                      f"TIPSTREAM_STREAM_REPLICAS=1, or set NATS_URL to a NATS cluster of at least {s.stream_replicas} "
                      "nodes."),
    10005: lambda s: _replicas_fix(s, "has fewer nodes with JetStream up"),
    # A cluster without its meta leader (a majority of its nodes down) answered with its bare words, no fix.
    10008: lambda _: ("NATS_URL's cluster has no JetStream meta leader: fewer than a majority of its nodes are up, "
                      "they cannot reach each other, or they are still electing one after a start. Start the "
                      "missing nodes (the nats CLI's `nats server list`, or a node's monitoring page `/routez`, names "
                      "those up; `/jsz` says whether there is a meta leader), then start tipstream again."),
    # streams.jetstream.NO_LEADER, written out: importing it here would load nats-py for every command.
    -1: lambda s: _replicas_fix(s, "could not elect a leader for it: fewer nodes are up, or they cannot "
                                   "reach each other"),
}


# nats-server's answers to a stream it could not write to its store (2.15.1 checked, its store's disk full): 10049
# to a creation, with no cause ("error creating store for stream"), 10069 to a change, naming it ("write
# .../meta.inf.tmp: no space left on device"). The start said only those words. A consumer's re-creation, at every
# start, is refused with a code that says nothing of the store (10012, "write .../o.dat.tmp: no space left on
# device"), so the server's words decide there (`embedded_nats.STORE_FULL_WORDS`).
_STORE_WRITE_CODES = (10049, 10069)
_STORE_RESTART = ("then restart nats-server, which stores nothing more after a failed write until it is restarted, "
                  "and start tipstream again")


def _store_full(description: str) -> bool:
    from app.embedded_nats import STORE_FULL_WORDS

    return any(words in description for words in STORE_FULL_WORDS)


def _store_write_fix(description: str) -> str:
    if _store_full(description):
        return ("The disk of that nats-server's store is full: free space on it (an embedded one's store is "
                f"TIPSTREAM_DATA_DIR/nats), {_STORE_RESTART}.")
    return ("nats-server could not write the stream to its store: is its store's disk full, or the store not "
            "writable by it? Its log says which ('no space left on device', 'permission denied'). Free space on that "
            "disk (an embedded one's store is TIPSTREAM_DATA_DIR/nats) or give nats-server's user the store, "
            f"{_STORE_RESTART}.")


def _replicas_fix(settings: Settings, why: str) -> str:
    n = settings.stream_replicas
    return (f"TIPSTREAM_STREAM_REPLICAS={n} puts each stream's {n} copies on {n} nodes of the NATS cluster, which "
            f"{why}: start the missing nodes (the nats CLI's `nats server list`, or a node's monitoring page "
            "`/routez`, names those up), or set TIPSTREAM_STREAM_REPLICAS to at most the number of nodes up.")


def _jetstream_error(error: Any, settings: Settings) -> StartupError:
    from nats.js.errors import ServiceUnavailableError

    from streams.jetstream import ALL_STREAMS, SUBJECTS_OVERLAP

    where = f"{shown_url(settings.nats_url)} (NATS_URL)" if settings.nats_url else "the embedded nats-server"
    if isinstance(error, ServiceUnavailableError) and error.description is None:
        # nats-py's answer to "no responders": nothing serves the JetStream API (it read "None (error None)").
        return StartupError(f"NATS at {where} does not serve JetStream, which tipstream's streams need: start it "
                            "with JetStream (`nats-server -js`, or `jetstream {}` in its config) for this account, "
                            "or unset NATS_URL to run an embedded one.")
    code = f" (error {error.err_code})" if (error.err_code or 0) > 0 else ""  # -1: tipstream's own, no server's
    message = f"JetStream at {where} refused tipstream's start: {error.description}{code}."
    fix = _JETSTREAM_FIXES.get(error.err_code)
    if fix is not None:
        return StartupError(f"{message} {fix(settings)}")
    if error.err_code in _STORE_WRITE_CODES or _store_full(error.description or ""):
        return StartupError(f"{message} {_store_write_fix(error.description or '')}")
    if error.err_code == SUBJECTS_OVERLAP:  # its description names the streams that take them (`ensure_streams`)
        streams = ", ".join(f"{spec.name} ({' '.join(spec.subjects)})" for spec in ALL_STREAMS)
        message += (f" tipstream's streams {streams} need those subjects to themselves: remove or change the "
                    "stream that takes them (`nats stream ls`), or point NATS_URL at another server "
                    "(unset: an embedded one).")
    return StartupError(message)

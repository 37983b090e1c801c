"""`tipstream`: run the service, publish synthetic traffic, migrate, regenerate docs, manage models, forget or export a
user's data."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.log_setup import configure_logging

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from app.http_server import take_open_files
    from app.settings import get_settings, unknown_variables
    from app.startup import hold_data_dir, listen_socket, serve

    settings = get_settings()
    configure_logging(settings.log_level)
    for line in unknown_variables():
        logging.getLogger("tipstream").warning("%s", line)
    take_open_files()  # before anything opens a file: the embedded nats-server inherits it too
    held = hold_data_dir(settings.data_dir)  # first: a second service on the directory changes nothing
    sock = listen_socket(settings)
    _import_service()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(settings, sock, args.demo))
    finally:
        os.close(held)  # after the service has stopped, its embedded nats-server with it
        # The process ends next, which frees what is left: the interpreter's last collections visited the whole
        # heap (models, users, libraries) first, 0.6 s of every stop and more with many users.
        gc.freeze()


def _import_service() -> None:
    """The service's modules (River, SciPy, SQLAlchemy...), imported with the cycle collector off: the objects they
    make set off 385 of its passes as they came, 0.37 s of an import's 3.4 s here; a few passes follow instead."""
    gc.disable()
    try:
        import app.api
        import app.bootstrap  # noqa: F401
    finally:
        gc.enable()


def _simulate(args: argparse.Namespace) -> int:
    from app.simulate import simulate

    if args.count is None and args.duration is None:
        print("simulate needs --count N or --duration SECONDS.", file=sys.stderr)
        return 2
    return asyncio.run(simulate(
        users=args.users, rate=args.rate, count=args.count, duration=args.duration,
        seed=args.seed, nats_url=args.nats_url, progress=not args.quiet, pregenerate=args.pregenerate,
        user_prefix=args.user_prefix,
    ))


def _migrate(args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from app import migrate
    from app.service_lock import ServiceLock, ServiceLockTaken
    from app.service_lock import holder as service_holder
    from app.settings import get_settings
    from app.start_errors import explain, shown_database_url
    from app.startup import data_dir_holder

    settings = get_settings()
    # As `run` does: alembic's line for each revision it runs ("Running upgrade 0008 -> 0009, ..."). Unset, the
    # command said nothing until it had ended, and an upgrade that reads a large table (0009: ~3 s a million rows)
    # was minutes of silence.
    configure_logging(settings.log_level)
    url = settings.sqlalchemy_url
    known = migrate.revisions()
    if args.revision not in ("head", "base", *known):  # checked first: an attempt would create the database
        print(f"Unknown revision {args.revision!r}; known: head, base, {', '.join(known)}.", file=sys.stderr)
        return 2
    drops = args.revision == "base"
    if drops:  # The tables dropped under a running service: its checkpoints failed until it was restarted.
        command, then = "`tipstream migrate base`", "then start it again to rebuild from the log"
    else:  # An old release would not start on the new revision: docs/operations.md said not to; nothing stopped it.
        command, then = "`tipstream migrate`", ("as it would not start again on the newer revision; or start this "
                                                "release in its place, which migrates the database as it starts")
    if (holder := data_dir_holder(settings.data_dir)) is not None:
        # A service on a database at head (or an older revision asked for) finds nothing done, as before.
        was = None if drops else migrate.current(url)
        target = known[-1] if args.revision == "head" else args.revision
        if drops or was is None or (was in known and known.index(was) < known.index(target)):
            print(f"A tipstream ({holder}) runs on {settings.data_dir.resolve()} (TIPSTREAM_DATA_DIR): stop it "
                  f"before {command}, {then}.", file=sys.stderr)
            return 1
    if not drops:
        # An older release serving a PostgreSQL database from another host (or data directory) holds its lock:
        # upgraded under it, it would not start again. Looked at, not taken: two `tipstream migrate` at once
        # both go on (the migration's own lock orders them).
        was = migrate.current(url)
        target = known[-1] if args.revision == "head" else args.revision
        if was in known and known.index(was) < known.index(target) and (holder := service_holder(url)) is not None:
            print(f"A tipstream service runs against {shown_database_url(url)} ({holder}): stop it before "
                  f"{command}, {then}.", file=sys.stderr)
            return 1
    # Held while the tables go, so that no service starts meanwhile (nor runs from another data directory).
    lock = ServiceLock(url)
    try:
        if drops:
            lock.acquire()
            if unfinished := _unfinished_erasures(url):
                # Their messages are still in the streams: the rebuild would bring those users back, and the
                # requests, in the tables dropped, would be gone.
                print(f"{len(unfinished)} request(s) to forget a user are not done ({', '.join(map(repr, unfinished[:5]))}"
                      f"{', ...' if len(unfinished) > 5 else ''}): dropped now, a rebuild from the log would bring "
                      "those users back. Start the service until `tipstream users forget-status <id>` says done "
                      "(tipstream_erasures_unfinished 0), then stop it and drop the tables.", file=sys.stderr)
                return 1
        (migrate.downgrade if drops else migrate.upgrade)(url, args.revision)
    except ServiceLockTaken as taken:
        print(f"A tipstream service runs against {shown_database_url(url)} ({taken.holder}): stop it before "
              f"{command}, {then}.", file=sys.stderr)
        return 1
    except CommandError as error:  # a revision this release does not know: alembic's own words named no fix
        print(f"tipstream: {explain(error, settings)}", file=sys.stderr)
        return 1
    except migrate.MigrationBlocked as error:
        print(f"{shown_database_url(url)}: {error}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    now = migrate.current(url)
    print(f"database at {now or 'base'}: {shown_database_url(url)}")
    if args.revision not in ("head", "base", now):
        # A downgrade under a running service drops what it writes to: the hint says to stop it first.
        print(f"{args.revision} is older than {now}; migrate only upgrades. To go back (for an older release): "
              f"stop the service, then `.venv/bin/alembic downgrade {args.revision}`.", file=sys.stderr)
        return 1
    return 0


def _unfinished_erasures(url: str) -> list[str]:
    """The users whose requests to be forgotten are not done, on a database that has the table."""
    from sqlalchemy import inspect, select

    from app import migrate
    from app.db import erasures, make_engine

    if migrate.current(url) is None:  # no tables (opened, a SQLite file would be made)
        return []
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("erasures"):
                return []
            return list(conn.execute(select(erasures.c.user_id).where(erasures.c.status != "done")).scalars())
    finally:
        engine.dispose()


def _docs(args: argparse.Namespace) -> int:
    from app.docs import OWN_README, write_docs

    # Beside the README it updates, not the working directory's docs/ (from elsewhere, a stray new one);
    # installed from a wheel, there is no README beside the package, and never a docs/ to write there.
    default = OWN_README.parent / "docs" if OWN_README.exists() else Path("docs")
    # Elsewhere, only the generated files: `--out` to look at them rewrote the README in place too.
    try:
        written = write_docs(Path(args.out), readme=None) if args.out else write_docs(default)
    except OSError as error:  # `--out docs/metrics.md` (a file, not a directory) was a traceback
        hint = " --out names a directory, made if missing." if args.out else ""
        print(f"Cannot write the docs to {error.filename or args.out}: {error.strerror or error}.{hint}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


def _at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):  # float() takes "nan" and "inf": `--demo nan` was a traceback at start
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


DEMO_MAX_RATE = 100_000  # events/s: more than the service folds here (docs/architecture.md)


def _demo_rate(text: str) -> float:
    # The demo makes each tick's events (a tenth of a second's) in one go, on the service's event loop:
    # `--demo 1e9` held it for good, so that not even SIGTERM stopped the service, and grew without bound.
    rate = _at_least(0, float)(text)
    if rate > DEMO_MAX_RATE:
        raise argparse.ArgumentTypeError(f"must be at most {DEMO_MAX_RATE:,} events/s, got {text}; for more load, "
                                         "publish with `tipstream simulate --rate 0` beside the service")
    return rate


def _nats_url(text: str) -> str:
    # As NATS_URL is checked: an http:// URL read as "No NATS server answers there".
    from app.settings import nats_url_problem

    problem = nats_url_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _user_prefix(text: str) -> str:
    # User ids are at most 128 characters; the prefix leaves room for "-" and the number.
    if not text or len(text) > 64 or not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be 1 to 64 printable characters without spaces, got {text!r}")
    return text


class _PrintRelease(argparse.Action):
    """`--version`, worked out only when asked: it reads the migrations and asks git."""

    def __init__(self, option_strings: list[str], dest: str, **_: Any) -> None:
        super().__init__(option_strings, dest, nargs=0,
                         help="which release this is (package version, database schema, commit) and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from app.version import describe

        print(describe())
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tipstream", description=__doc__)
    parser.add_argument("--version", action=_PrintRelease)
    commands = parser.add_subparsers(dest="command", required=True)

    from app.settings import settings_help

    run = commands.add_parser(
        "run", help="start the service (embedded NATS when NATS_URL is unset)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings, read from the environment (or a .env file) at start; the README's table has them "
               f"in full:\n{settings_help()}",
    )
    run.add_argument("--demo", type=_demo_rate, metavar="EVENTS_PER_S", default=0,
                     help="also run a synthetic app at this many events/s: its users' signals, and tips "
                          "picked by /score whose reactions the learner learns from")
    run.set_defaults(func=_run)

    sim = commands.add_parser("simulate", help="publish synthetic user traffic through JetStream")
    sim.add_argument("--users", type=_at_least(1), default=1000, help="simulated users (default: %(default)s)")
    sim.add_argument("--rate", type=_at_least(0, float), default=1000.0,
                     help="events per second (default: %(default)g; 0: as fast as possible)")
    sim.add_argument("--count", type=_at_least(1), help="stop after this many events")
    sim.add_argument("--duration", type=_at_least(0, float), help="stop after this many seconds")
    sim.add_argument("--seed", type=int, default=1,
                     help="draws the users and what they do; each run's event ids are its own, so a run can repeat")
    sim.add_argument("--user-prefix", type=_user_prefix, default="sim",
                     help="simulated users are PREFIX-0, PREFIX-1, ...: pick one no real user id starts with "
                          "(default: sim), as their events fold into the same tables")
    sim.add_argument("--nats-url", type=_nats_url, help="default: NATS_URL, else the running embedded server's")
    sim.add_argument("--quiet", action="store_true", help="no progress display")
    sim.add_argument("--pregenerate", action="store_true",
                     help="make every event before publishing (load generation that costs the least CPU)")
    sim.set_defaults(func=_simulate)

    mig = commands.add_parser("migrate", help="apply migrations (alembic)")
    mig.add_argument("revision", nargs="?", default="head",
                     help="head (default), a newer revision, or base (drops every table: stop the service first)")
    mig.set_defaults(func=_migrate)

    docs = commands.add_parser("docs", help="regenerate docs/events.schema.json, docs/features.md, "
                                            "docs/metrics.md and the README's settings table")
    docs.add_argument("--out", help="where the generated files go (default: the docs/ beside the README); "
                                    "with --out, the README's settings table is left as it is")
    docs.set_defaults(func=_docs)

    from app.models_cli import add_models_commands

    add_models_commands(commands)
    from app.users_cli import add_users_commands

    add_users_commands(commands)

    args = parser.parse_args(argv)
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import DatabaseEncodingError
    from app.settings import SettingsError, get_settings
    from app.start_errors import StartupError, explain

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at the exit, where a reader gone is "Exception ignored ... BrokenPipeError"
        return code
    except BrokenPipeError:  # `tipstream models card v1 --json | head`: a traceback for a reader that had enough
        # The interpreter flushes stdout again as it exits: what is left goes nowhere, as the reader wants.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # as a shell reports a writer the closed pipe ended
    except KeyboardInterrupt:  # Ctrl-C while migrating or reading the registry: a traceback before
        print("tipstream: interrupted", file=sys.stderr)
        return 130
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    except StartupError as error:
        print(f"tipstream: {error}", file=sys.stderr)
        return 1
    # `models list`/`card` open (and migrate) the database as `run` does
    except (SQLAlchemyError, ValueError, CommandError, DatabaseEncodingError) as error:
        told = explain(error, get_settings())
        if told is None:
            raise
        print(f"tipstream: {told}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


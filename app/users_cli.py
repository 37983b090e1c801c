"""`tipstream users forget ID`: a request to forget a user, through the running service's admin
endpoint with `TIPSTREAM_ADMIN_TOKEN` (the service holds their state and models; see app/erasure.py);
`tipstream users forget-status ID`, where that request is, the same way.
`tipstream users export ID`: what tipstream holds of them, read from NATS and the database
(`app/export.py`)."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import stat
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from app.models_cli import _default_actor, admin_call, no_database
from models.registry import escaped

WAIT_EVERY_S = 1.0


def _path(user_id: str) -> str:
    # Quoted whole: a user id may hold '/', '?' or '#', which would name another path, or another user.
    return f"/admin/users/{urllib.parse.quote(user_id, safe='')}/forget"


def _shown(row: dict[str, Any]) -> str:
    # Escaped, as `models` shows an actor: `requested_by` is any admin request's `actor`, and its ESC codes
    # (or a line break) acted on the terminal; a user id may hold them too.
    line = (f"{escaped(row['user_id'])}: {row['status']} (asked {row['requested_at']} by "
            f"{escaped(row['requested_by'])})")
    if row.get("report"):
        line += "\n  " + ", ".join(f"{key} {value}" for key, value in row["report"].items())
        if row["status"] == "done" and not any(row["report"].values()):
            # A mistyped id is "done" too: forgetting a user tipstream never saw is no error (their events may
            # come later, and are a new user's), but the operator meant someone.
            line += ("\n  nothing was held of this id (no state, decisions or messages): if you meant a user your "
                     "app knows, check the id as it sends it (`tipstream users export ID` shows what is held)")
    if row.get("stuck"):
        line += f"\n  stuck: {row['stuck']}"
    elif row.get("damaged"):  # done: its report shown as none, and nothing said why
        line += f"\n  damaged: {row['damaged']}"
    for done in row.get("earlier", ()):
        line += (f"\n  forgotten before: done {done['done_at']} (asked {done['requested_at']} by "
                 f"{escaped(done['requested_by'])})")
        if done.get("damaged"):
            line += f"\n    damaged: {done['damaged']}"
    return line


def _forget(args: argparse.Namespace) -> int:
    see = f"`tipstream users forget-status {args.user_id}`"
    answer = admin_call(args.url, _path(args.user_id), {"actor": args.actor}, "forget a user", see)
    if isinstance(answer, int):
        return answer
    print(_shown(answer))
    if not args.wait and answer["status"] != "done":  # the service does the work after it answers
        # Quoted as a shell would take it back, and escaped as `_shown` escapes the id.
        print(f"  `tipstream users forget-status {escaped(shlex.quote(args.user_id))}` says when it is done "
              "(`--wait`: this command waits for it)")
    while args.wait and answer["status"] != "done":
        if answer.get("stuck"):  # waited for for good: it goes on only after a start
            print(_shown(answer), file=sys.stderr)
            return 1
        time.sleep(WAIT_EVERY_S)
        answer = admin_call(args.url, _path(args.user_id), None, "see the request", see, method="GET")
        if isinstance(answer, int):
            return answer
    if args.wait:
        print(_shown(answer))
    return 0


def _status(args: argparse.Namespace) -> int:
    see = f"`tipstream users forget-status {args.user_id}`"
    answer = admin_call(args.url, _path(args.user_id), None, "see the request", see, method="GET")
    if isinstance(answer, int):
        return answer
    print(_shown(answer))
    return 0


def _out_problem(out: str) -> str | None:
    """Why `--out` cannot be written, found without creating it; None when it can."""
    path = Path(out)
    if path.is_dir():
        return "it is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else "this user may not write it"
    parent = path.parent
    if not parent.is_dir():
        return f"there is no directory {parent}"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"this user may not create files in {parent}"


def _export(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from app import migrate
    from app.db import make_engine
    from app.export import export_user
    from app.nats_auth import NatsAuthError, NatsUnanswered, connect_for_command, nats_options
    from app.registry_store import UnreadableModel
    from app.settings import get_settings
    from app.simulate import _nats_url_and_source
    from app.start_errors import shown_url
    from streams.events import is_user_id
    from streams.scrub import ScrubError
    from streams.store import UnreadableState

    # What an event's user_id may be, as `forget` (a 422) and /users/{id}/features refuse others: every stream
    # was read for "" and the export said nothing is held of them, exit 0.
    if not is_user_id(args.user_id):
        print(f"No user can have the id {args.user_id!r:.60}: a user id is 1 to 128 characters without NUL "
              f"(this one has {len(args.user_id)}). Nothing exported.", file=sys.stderr)
        return 2
    # Checked first: told only once written, after every stream had been read (minutes for a large one),
    # a bad --out was a FileNotFoundError or IsADirectoryError traceback and the export was lost.
    if args.out is not None and (problem := _out_problem(args.out)) is not None:
        print(f"Cannot write the export to {args.out}: {problem}. --out names a file this user can write, in a "
              "directory that exists.", file=sys.stderr)
        return 2
    url = get_settings().sqlalchemy_url
    if migrate.current(url) is None:  # opened, an empty SQLite file would be made where none was
        print(no_database(get_settings()), file=sys.stderr)
        return 1
    nats_url, where = _nats_url_and_source(args.nats_url, "read the user's events from")
    try:
        options = nats_options(get_settings())
    except NatsAuthError as error:
        print(f"{error}.", file=sys.stderr)
        return 2
    last = [0.0]

    def progress(stream: str, scanned: int, of: int) -> None:
        if time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            print(f"{stream}: read to #{scanned:,} of #{of:,}", file=sys.stderr)

    async def run() -> dict[str, Any]:
        try:
            nc = await connect_for_command(nats_url, options, allow_reconnect=False)
        except NatsUnanswered as error:  # shown without its token: the embedded server's nats.url holds one
            raise SystemExit(f"No NATS server answering at {shown_url(nats_url)} ({error}): {where}") from None
        try:
            return await export_user(nc.jetstream(timeout=10), engine, args.user_id, progress)
        except ScrubError as error:  # a stream refused the reader (its consumers' limit): a traceback said it
            raise SystemExit(f"Nothing exported: {error}") from None
        finally:
            await nc.close()

    engine = make_engine(url)
    try:
        found = asyncio.run(run())
    except UnreadableState as error:  # a ValueError traceback once every stream had been read
        print(f"Nothing exported: {error.damaged(error.user_id, error.cause)} {error.fixes(error.user_id)}, then "
              "export again.", file=sys.stderr)
        return 1
    except UnreadableModel as error:  # a traceback, naming neither the version nor a fix
        print(f"Nothing exported: {error}, then export again.", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    text = json.dumps(found, indent=2, ensure_ascii=False)
    try:
        _write_export(text, args.out)
    except OSError as error:  # the disk full: a traceback, and half an export left in the file
        if isinstance(error, BrokenPipeError) and args.out is None:
            raise  # `users export ID | head`: the reader had enough, no failure to tell (app.cli.main ends quietly)
        print(f"Nothing exported: cannot write {args.out or 'to stdout'}: {error.strerror or error}. "
              + ("Free space on its disk, or give --out a file on another." if error.errno in (errno.ENOSPC, errno.EDQUOT)
                 else "--out names a file this user can write."), file=sys.stderr)
        return 1
    counts = ", ".join(f"{stream} {len(messages)}" for stream, messages in found["streams"].items())
    kept = sum(map(len, (found["user_state"] or {}).get("events", {}).values()))
    print(f"{args.user_id}: messages {counts}; tip_scores {len(found['tip_scores'])}; user_state events {kept}; user_features "
          f"{'1' if found['user_features'] else '0'}; model versions with their weights {len(found['model_weights'])}",
          file=sys.stderr)
    return 0


def _write_export(text: str, out_path: str | None) -> None:
    if out_path is None:
        print(text)
        sys.stdout.flush()  # a full disk under a redirect fails here, not at the exit, where it is a traceback
        return
    # Their data: readable by the one who exports it only.
    with open(os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as out:
        # A file that already existed kept its mode (0644, say), which O_CREAT's applies only to a new one.
        # Not a device or a pipe (`--out /dev/stdout`): its mode is not the export's to change.
        regular = stat.S_ISREG(os.fstat(out.fileno()).st_mode)
        if regular:
            os.fchmod(out.fileno(), 0o600)
        try:
            out.write(text + "\n")
            out.flush()
        except OSError:
            if regular:  # a cut export reads as a user holding less than they do
                os.unlink(out_path)
            raise


def add_users_commands(commands: Any) -> None:
    users = commands.add_parser("users", help="a user's data: forget (their state, rows, model features and "
                                              "messages), forget-status, export (what is held of them)")
    sub = users.add_subparsers(dest="users_command", required=True)
    forget = sub.add_parser("forget", help="forget a user: everything tipstream holds of them goes, their messages "
                                           "in the streams too (through the running service)")
    forget.add_argument("user_id")
    forget.add_argument("--actor", default=_default_actor(), help="who asks (default: user@host), for the record")
    forget.add_argument("--wait", action="store_true", help="until it is done, their messages deleted")
    status = sub.add_parser("forget-status", help="where a request to forget a user is (through the running service)")
    status.add_argument("user_id")
    for parser in (forget, status):
        parser.add_argument("--url", help="the service (default: http://TIPSTREAM_HOST:TIPSTREAM_PORT)")
    forget.set_defaults(func=_forget)
    status.set_defaults(func=_status)
    export = sub.add_parser("export", help="what tipstream holds of a user, as JSON: their events and decisions in "
                                           "the streams, their rows, their model weights (read from NATS and the "
                                           "database, not through the service)")
    export.add_argument("user_id")
    export.add_argument("--out", help="write it to this file (made readable by you only), not to stdout")
    export.add_argument("--nats-url", help="default: NATS_URL, else the running embedded server's")
    export.set_defaults(func=_export)

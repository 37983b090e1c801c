"""`tipstream users forget ID`: a request to forget a user, through the running service's admin
endpoint with `TIPSTREAM_ADMIN_TOKEN` (the service holds their state and models; see app/erasure.py)."""

from __future__ import annotations

import argparse
import time
import urllib.parse
from typing import Any

from app.models_cli import _default_actor, admin_call

WAIT_EVERY_S = 1.0


def _path(user_id: str) -> str:
    # Quoted whole: a user id may hold '/', '?' or '#', which would name another path, or another user.
    return f"/admin/users/{urllib.parse.quote(user_id, safe='')}/forget"


def _shown(row: dict[str, Any]) -> str:
    line = f"{row['user_id']}: {row['status']} (asked {row['requested_at']} by {row['requested_by']})"
    if row.get("report"):
        line += "\n  " + ", ".join(f"{key} {value}" for key, value in row["report"].items())
    return line


def _forget(args: argparse.Namespace) -> int:
    see = f"`tipstream users forget-status {args.user_id}`"
    answer = admin_call(args.url, _path(args.user_id), {"actor": args.actor}, "forget a user", see)
    if isinstance(answer, int):
        return answer
    print(_shown(answer))
    while args.wait and answer["status"] != "done":
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


def add_users_commands(commands: Any) -> None:
    users = commands.add_parser("users", help="forget a user: their state, rows, model features and messages")
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

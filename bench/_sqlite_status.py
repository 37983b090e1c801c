"""`tipstream run` with SQLite's own memory written out every few seconds (`bench/soak.py --sqlite-status`).

    python bench/_sqlite_status.py run --demo 200    # as `tipstream run --demo 200`

Every connection the service opens through `sqlite3.connect` is followed; every `EVERY_S`
seconds `$TIPSTREAM_DATA_DIR/sqlite_status.json` is replaced with the library's memory in use
(`sqlite3_memory_used`) and, per connection, what `sqlite3_db_status` counts (its page cache,
schema and prepared statements) and the statements it holds prepared, through ctypes on the
libsqlite3 that Python's `_sqlite3` links. A prepared statement keeps the values last bound to
it until it runs again or is finalized, and Python's driver keeps up to `cached_statements`
(128) of them a connection: the largest is named.
"""

from __future__ import annotations

import _sqlite3
import ctypes
import json
import os
import runpy
import sqlite3
import sqlite3.dbapi2
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

EVERY_S = 5.0
DB_STATUS = {"cache": 1, "schema": 2, "stmt": 3}  # SQLITE_DBSTATUS_CACHE_USED, SCHEMA_USED, STMT_USED
STMTSTATUS_MEMUSED = 99


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(_sqlite3.__file__)  # the libsqlite3 Python links (or SQLite built into it), not another
    for name, restype, argtypes in (
            ("sqlite3_memory_used", ctypes.c_int64, []),
            ("sqlite3_db_status", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                                 ctypes.POINTER(ctypes.c_int), ctypes.c_int]),
            ("sqlite3_db_filename", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_char_p]),
            ("sqlite3_db_mutex", ctypes.c_void_p, [ctypes.c_void_p]),
            ("sqlite3_mutex_enter", None, [ctypes.c_void_p]),
            ("sqlite3_mutex_leave", None, [ctypes.c_void_p]),
            ("sqlite3_next_stmt", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
            ("sqlite3_sql", ctypes.c_char_p, [ctypes.c_void_p]),
            ("sqlite3_stmt_status", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int])):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


LIB = _library()
CONNECTIONS: weakref.WeakSet[sqlite3.Connection] = weakref.WeakSet()


class _Connection(sqlite3.Connection):
    """A connection a weak set can hold (the base class takes no weak references)."""


def handle(conn: sqlite3.Connection) -> int | None:
    """The `sqlite3 *` of a connection: CPython 3.11's `pysqlite_Connection` holds it first after its header."""
    return ctypes.c_void_p.from_address(id(conn) + 16).value


def _connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
    kwargs.setdefault("factory", _Connection)
    conn = _ORIGINAL_CONNECT(*args, **kwargs)
    db = handle(conn)
    name = (LIB.sqlite3_db_filename(db, b"main") or b"").decode() if db else ""
    if not db or (name and Path(name).name != Path(str(args[0] if args else kwargs["database"])).name):
        raise RuntimeError(f"a connection's handle, read as CPython 3.11 lays it out, is not the database {name!r}")
    CONNECTIONS.add(conn)
    return conn


def connection_status(db: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, op in DB_STATUS.items():
        current, highest = ctypes.c_int(), ctypes.c_int()
        LIB.sqlite3_db_status(db, op, ctypes.byref(current), ctypes.byref(highest), 0)
        figures[name] = current.value
    mutex = LIB.sqlite3_db_mutex(db)  # held so no statement is finalized while it is read
    if mutex is None:
        return figures
    largest, statements = (0, ""), 0
    LIB.sqlite3_mutex_enter(mutex)
    try:
        stmt = LIB.sqlite3_next_stmt(db, None)
        while stmt:
            statements += 1
            largest = max(largest, (LIB.sqlite3_stmt_status(stmt, STMTSTATUS_MEMUSED, 0),
                                    (LIB.sqlite3_sql(stmt) or b"")[:60].decode("utf-8", "replace")))
            stmt = LIB.sqlite3_next_stmt(db, stmt)
    finally:
        LIB.sqlite3_mutex_leave(mutex)
    return {**figures, "statements": statements, "largest_statement_bytes": largest[0],
            "largest_statement": largest[1]}


def status() -> dict[str, Any]:
    connections = [connection_status(db) for db in map(handle, list(CONNECTIONS)) if db]
    return {"memory_used": LIB.sqlite3_memory_used(), "connections": connections}


def _write_every(path: Path, every_s: float) -> None:
    while True:
        time.sleep(every_s)
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(status()))
        staged.replace(path)


_ORIGINAL_CONNECT = sqlite3.connect

if __name__ == "__main__":
    if sys.version_info[:2] != (3, 11):  # else `handle` reads another layout's field
        sys.exit(f"bench/_sqlite_status.py reads CPython 3.11's connection objects; this is {sys.version.split()[0]}")
    sqlite3.connect = sqlite3.dbapi2.connect = _connect  # SQLAlchemy's pysqlite dialect calls the latter
    out = Path(os.environ.get("TIPSTREAM_DATA_DIR", ".")) / "sqlite_status.json"
    threading.Thread(target=_write_every, args=(out, EVERY_S), name="sqlite-status", daemon=True).start()
    runpy.run_module("app.cli", run_name="__main__", alter_sys=True)

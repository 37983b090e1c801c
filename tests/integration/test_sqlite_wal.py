"""SQLite under `db.make_engine`: its WAL cut back after a burst, its file's mode, the memory it keeps."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlalchemy as sa

from app import db


def test_the_wal_file_shrinks_back_after_a_large_transaction(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'tipstream.db'}")
    wal = tmp_path / "tipstream.db-wal"
    with engine.begin() as conn:
        conn.execute(sa.text("create table blobs (id integer primary key, data blob)"))
    with engine.begin() as conn:  # a checkpoint writing many users' states at once
        conn.execute(sa.text("insert into blobs (data) values (:data)"), [{"data": b"x" * 100_000}] * 400)
    burst = wal.stat().st_size
    assert burst > 2 * db.WAL_SIZE_LIMIT_BYTES
    for i in range(5):  # ordinary small transactions after it: the WAL is checkpointed, then reset
        with engine.begin() as conn:
            conn.execute(sa.text("update blobs set data = :data where id = :id"), {"data": b"y", "id": i + 1})
    assert wal.stat().st_size <= db.WAL_SIZE_LIMIT_BYTES, f"the WAL kept {wal.stat().st_size} bytes (burst: {burst})"
    engine.dispose()


def test_the_database_file_is_its_user_s_only_in_a_data_directory_that_already_existed(tmp_path: Path) -> None:
    """The directory keeps its mode (the README says so), but the file holding the users' events and
    features was made with the umask's, readable by every local user."""
    import os
    import stat

    from app import migrate

    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    old_umask = os.umask(0o022)
    try:
        url = f"sqlite:///{data_dir / 'tipstream.db'}"
        migrate.upgrade(url)
        engine = db.make_engine(url)
        with engine.begin() as conn:  # a write: the -wal and -shm files exist while the engine is open
            conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            made = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.iterdir()}
        engine.dispose()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o755
    assert made["tipstream.db"] == 0o600 and made["tipstream.db-wal"] == 0o600, made


def _documented_command(tail: str) -> str:
    """The Python code of docs/operations.md's SQLite one-liner ending in `tail` (its arguments)."""
    import re

    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    found = re.search(r"`\.venv/bin/python -c '([^']+)' " + re.escape(tail) + "`", guide)
    assert found, f"docs/operations.md has no `.venv/bin/python -c '...' {tail}`"
    return found.group(1)


def test_the_documented_restore_puts_the_backup_back_over_a_wal_a_crash_left(tmp_path: Path) -> None:
    """The README said how to back SQLite up, not how to restore: a copy of the backup over the file, the
    obvious way, took the WAL a crash had left beside it on top, and the start resumed from that WAL's
    checkpoint, not the backup's (or found the file malformed)."""
    import shutil
    import subprocess
    import sys

    live, backup = tmp_path / "tipstream.db", tmp_path / "backup.db"
    engine = db.make_engine(f"sqlite:///{live}")
    with engine.begin() as conn:
        conn.execute(sa.text("create table positions (seq integer)"))
        conn.execute(sa.text("insert into positions values (470)"))
    engine.dispose()
    backup_code = _documented_command("<db> <file>")
    subprocess.run([sys.executable, "-c", backup_code, str(live), str(backup)], check=True)
    # A service's last commit, then its process killed: the commit is in the WAL only.
    crash = ("import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('update positions set seq = 1470'); "
             "c.commit(); os._exit(0)")
    subprocess.run([sys.executable, "-c", crash, str(live)], check=True)
    assert (tmp_path / "tipstream.db-wal").stat().st_size > 0

    def seq(path: Path) -> int:
        with sqlite3.connect(path) as conn:
            return conn.execute("select seq from positions").fetchone()[0]

    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("tipstream.db-wal", "tipstream.db-shm"):
        shutil.copy(tmp_path / name, copied / name)
    shutil.copy(backup, copied / "tipstream.db")
    assert seq(copied / "tipstream.db") == 1470, "a plain copy: the WAL's commit read on top of the backup"

    restore_code = _documented_command("<file> <TIPSTREAM_DATA_DIR>/tipstream.db")
    mistyped = subprocess.run([sys.executable, "-c", restore_code, str(tmp_path / "backpu.db"), str(live)],
                              capture_output=True)
    assert mistyped.returncode != 0 and not (tmp_path / "backpu.db").exists(), "no empty backup made, none restored"
    assert seq(live) == 1470
    subprocess.run([sys.executable, "-c", restore_code, str(backup), str(live)], check=True)
    assert seq(live) == 470


def test_a_checkpoint_s_states_are_not_kept_by_sqlite_after_it(tmp_path: Path) -> None:
    """A prepared statement keeps the values last bound to it until it runs again or is finalized, and
    Python's driver kept 128 statements a connection: each connection held a copy of the last checkpoint's
    users' states, SQLite's memory grew as they did (bench/soak.py: 17 MB an hour) and never gave it back."""
    import _sqlite3
    import ctypes
    import os
    from datetime import UTC, datetime

    from app import migrate
    from app.checkpoint_rows import write_states

    library = ctypes.CDLL(_sqlite3.__file__)  # finds the libsqlite3 it links, or SQLite built into it
    library.sqlite3_memory_used.restype = ctypes.c_int64
    url = f"sqlite:///{tmp_path / 'tipstream.db'}"
    migrate.upgrade(url)
    engine = db.make_engine(url)
    with engine.begin() as conn:  # the connection open, its page cache and the schema read
        conn.execute(sa.text("select count(*) from user_state")).scalar()
    before = library.sqlite3_memory_used()
    with engine.begin() as conn:  # 500 users' states, 20 MB: one multi-row statement
        write_states(conn, [(f"user-{i}", os.urandom(40_000)) for i in range(500)], datetime.now(UTC))
    held = library.sqlite3_memory_used() - before
    engine.dispose()
    assert held < 5_000_000, f"SQLite still holds {held / 1e6:.1f} MB after the checkpoint (its page cache: 2 MB)"

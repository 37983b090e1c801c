"""SQLite's WAL file is cut back after a burst (`db.WAL_SIZE_LIMIT_BYTES`), not kept at its largest."""

from __future__ import annotations

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

"""Decisions served but not yet in JetStream when the service stops: kept in a file, published first
at the next start.

/score never waits for JetStream, so at shutdown some answers may still be queued or waiting for
their acknowledgement (NATS away, or slow). Dropping them would break the decision log's promise
that every answer is logged. A copy that had landed after all is dropped by JetStream's duplicate
window (`Nats-Msg-Id`) when the restart comes within it.

The next start reads the file but leaves it in place until JetStream has acknowledged every
decision in it (the publisher's `put_back`): removed as it was read, a crash of that run before
then (NATS still away) lost what the clean stop had kept.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / SPOOL_NAME
>>> save(path, [("decisions.score", "d-1", b'{"id":"d-1"}')])
>>> read(path), path.exists(), oct(path.stat().st_mode & 0o777)
([('decisions.score', 'd-1', b'{"id":"d-1"}')], True, '0o600')
>>> path.unlink(); read(path)
[]
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from pathlib import Path

import orjson

log = logging.getLogger("tipstream")
SPOOL_NAME = "unpublished-decisions.jsonl"
Item = tuple[str, str, bytes]  # subject, decision id, the event's bytes
# Space held in the data directory for the spool: with the disk full (the NATS store's too, as JetStream then
# acknowledges nothing) the decisions waiting at a stop are those most in need of the spool, and it could not
# be written (27 lost at a stop on a full 40 MB tmpfs). ~3,600 decisions of 2.2 KB.
RESERVE_NAME = "spool-reserve"
RESERVE_BYTES = 8 << 20


def hold_reserve(data_dir: Path, size: int = RESERVE_BYTES) -> bool:
    """Make the reserve (again) if it is not there whole; False when the disk has no room for it."""
    path = data_dir / RESERVE_NAME
    try:
        if path.stat().st_size == size:
            return True
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # blocks allocated, not a sparse file's promise
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.write(fd, bytes(size))  # a file system without fallocate
        finally:
            os.close(fd)
    except OSError:
        path.unlink(missing_ok=True)
        return False
    return True


async def hold_reserve_once_room(data_dir: Path, every_s: float = 30.0, size: int = RESERVE_BYTES) -> None:
    """`hold_reserve`, tried until it succeeds, once the disk has room besides: not held at a start on a full
    disk (or given up at the last stop), it stayed so until the next start, when space was freed meanwhile.
    Taken only with 16 MB to spare, as the streams and the database need the room first."""
    while True:
        try:
            room = shutil.disk_usage(data_dir).free >= size + (16 << 20)
        except OSError:
            room = False
        if room and await asyncio.to_thread(hold_reserve, data_dir, size):
            return
        await asyncio.sleep(every_s)


def save(path: Path, items: list[Item]) -> None:
    """Write `items` whole or not at all (a temporary file renamed over the spool). On a full disk the
    reserve is given up for it, and as many of the oldest as that room holds are kept: `items` is cut to
    those, and what is left out is for the caller to tell as lost."""
    try:
        _save(path, items)
    except OSError as error:
        reserve = path.with_name(RESERVE_NAME)
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or not reserve.exists():
            raise
        room = reserve.stat().st_size
        reserve.unlink()
        kept, size = 0, 0
        for _, decision_id, payload in items:
            size += len(payload) + len(decision_id) + 64  # its JSON line: the event escaped, say, a little larger
            if size > room * 3 // 4:
                break
            kept += 1
        del items[kept:]
        _save(path, items)


def keep_at_stop(path: Path, items: list[Item]) -> list[Item]:
    """Save the decisions a stop found not acknowledged by JetStream, and say how many were kept, and where;
    those kept."""
    served = len(items)
    try:
        save(path, items)  # cut to what the reserve holds, on a full disk
    except OSError as error:  # the disk full: the rest of the stop (checkpoint, NATS, lock) goes on
        log.error("%d decisions served are not acknowledged by JetStream yet (is NATS away?) and could "
                  "not be kept in %s (%s): they are lost. Free space in TIPSTREAM_DATA_DIR before "
                  "the next start.", served, path, error.strerror or error)
        return []
    if len(items) < served:
        log.error("%d decisions served are not acknowledged by JetStream yet (is NATS away?), and the disk is full: "
                  "the oldest %d are kept in %s (in the space held for them), the other %d lost. Free space in "
                  "TIPSTREAM_DATA_DIR before the next start.", served, len(items), path, served - len(items))
    else:
        log.warning("%d decisions served are not acknowledged by JetStream yet (is NATS away?); kept in %s, the "
                    "next start publishes them first", len(items), path)
    return items


def drop_acknowledged(path: Path, kept: list[Item], unpublished: list[Item]) -> None:
    """Once the stop's connection is drained: the spool `keep_at_stop` wrote (`kept`), without those JetStream
    acknowledged since (not in `unpublished`). The acknowledgements of decisions in flight keep coming while the
    stop goes on; left in the spool, those decisions were published again by the next start, and stored twice
    when it came after the duplicate window (TIPSTREAM_DUPLICATE_WINDOW_S)."""
    waiting = {decision_id for _, decision_id, _ in unpublished}
    left = [item for item in kept if item[1] in waiting]
    if len(left) == len(kept):
        return
    try:
        if left:
            _save(path, left)  # smaller than the spool it replaces; not cut: it was kept whole once
        else:
            path.unlink(missing_ok=True)
    except OSError as error:  # the spool stays as it was: the duplicate window drops what the next start sends again
        log.warning("%d decisions kept in %s were acknowledged by JetStream since, and could not be taken out of it "
                    "(%s): the next start publishes them again", len(kept) - len(left), path, error.strerror or error)
        return
    log.info("%d of the decisions kept in %s were acknowledged by JetStream since; %d stay there",
             len(kept) - len(left), path, len(left))


def _save(path: Path, items: list[Item]) -> None:
    temporary = path.with_suffix(".tmp")
    try:
        # The service's user's only, as the SQLite file: decisions hold users' ids and features, and a data
        # directory that already existed keeps its mode (0755, say); made with the umask's, every local user
        # could read them. fchmod: a temporary file left by a crash keeps the mode it was made with.
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.writelines(orjson.dumps({"subject": subject, "id": decision_id, "event": payload.decode()}) + b"\n"
                           for subject, decision_id, payload in items)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError:  # a full disk: no half-written file left behind
        temporary.unlink(missing_ok=True)
        raise


def read(path: Path) -> list[Item]:
    """The spooled decisions, oldest first; the file stays until JetStream has them all."""
    if not path.exists():
        return []
    items = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            row = orjson.loads(line)
            items.append((row["subject"], row["id"], row["event"].encode()))
    return items

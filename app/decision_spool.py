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
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from streams.log_throttle import counted

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


def keep_at_stop(path: Path, items: list[Item], why: str = "is NATS away?") -> list[Item]:
    """Save the decisions a stop found not acknowledged by JetStream, and say how many were kept, where, and `why`
    they wait (the publisher's words: what JetStream last answered, or the question of an outage); those kept."""
    served = len(items)
    waiting = f"{counted(served, 'decision served is', 'decisions served are')} not acknowledged by JetStream yet: {why}"
    try:
        save(path, items)  # cut to what the reserve holds, on a full disk
    except OSError as error:  # the disk full: the rest of the stop (checkpoint, NATS, lock) goes on
        log.error("%s They could not be kept in %s (%s): they are lost. Free space in TIPSTREAM_DATA_DIR before "
                  "the next start.", waiting, path, error.strerror or error)
        return []
    if len(items) < served:
        log.error("%s The disk is full: the oldest %d are kept in %s (in the space held for them), the other %d lost. "
                  "Free space in TIPSTREAM_DATA_DIR before the next start.", waiting, len(items), path,
                  served - len(items))
    else:
        log.warning("%s Kept in %s, the next start publishes them first", waiting, path)
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
    error = rewrite(path, left)
    if error is not None:  # the spool stays as it was: the duplicate window drops what the next start sends again
        log.warning("%d decisions kept in %s were acknowledged by JetStream since, and could not be taken out of it "
                    "(%s): the next start publishes them again", len(kept) - len(left), path, error.strerror or error)
        return
    log.info("%d of the decisions kept in %s were acknowledged by JetStream since; %d stay there",
             len(kept) - len(left), path, len(left))


def rewrite(path: Path, items: list[Item]) -> OSError | None:
    """The spool made `items` (fewer than it holds: those gone are published, or not to be), whole, none: no
    file; else, failing, left as it was, and the error. Not `save`, which gives up the reserve and cuts `items`
    to what it holds: those cut were neither published nor kept."""
    try:
        if items:
            _save(path, items)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        return error
    return None


def _save(path: Path, items: list[Item]) -> None:
    _write_whole(path, [orjson.dumps({"subject": subject, "id": decision_id, "event": payload.decode()}) + b"\n"
                        for subject, decision_id, payload in items])


def _write_whole(path: Path, lines: list[bytes]) -> None:
    temporary = path.with_suffix(".tmp")
    try:
        # The service's user's only, as the SQLite file: decisions hold users' ids and features, and a data
        # directory that already existed keeps its mode (0755, say); made with the umask's, every local user
        # could read them. fchmod: a temporary file left by a crash keeps the mode it was made with.
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError:  # a full disk: no half-written file left behind
        temporary.unlink(missing_ok=True)
        raise
    # The rename is the directory's to keep: not synced, a power cut after the stop could undo it (the old spool,
    # or none, and the decisions said kept were lost).
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that syncs no directory
            raise
    finally:
        os.close(directory)


def read(path: Path) -> list[Item]:
    """The spooled decisions, oldest first; the file stays until JetStream has them all. Lines that are no
    spooled decision are left out (`read_at_start` keeps them aside)."""
    try:
        return _parsed(path.read_bytes(), _item)[0]
    except FileNotFoundError:
        return []


def read_at_start(path: Path) -> list[Item]:
    """`read`, for a start. The lines that are no spooled decision (the file damaged, or edited) are moved to a
    file beside it, `<spool>.unreadable-<time>`, and the log names it: one such line ended every start with a
    traceback, and the service stayed down until the spool was removed, every decision in it with it. A spool
    that cannot be read at all ends the start (StartupError): given up, its decisions would be lost."""
    from app.start_errors import StartupError

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise StartupError(
            f"Cannot read {path} ({error.strerror or error}): it holds the decisions served before the last stop "
            "that JetStream had not stored, which this start publishes first. Make it a file this service's user can "
            "read, or move it out of TIPSTREAM_DATA_DIR to give those decisions up.") from None
    items, unreadable = _parsed(data, _decision)
    if unreadable:
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        try:
            _write_whole(aside, [line + b"\n" for line in unreadable])
        except OSError as error:
            log.error("%d lines of %s are no decision spooled (the file damaged?), and could not be copied to %s (%s): "
                      "they are lost once JetStream has the %d decisions read, as the spool then goes. Free space in "
                      "TIPSTREAM_DATA_DIR, and copy them out of the spool before then.", len(unreadable), path,
                      aside, error.strerror or error, len(items))
            return items
        log.error("%d lines of %s are no decision spooled (the file damaged?): moved to %s, not published. The "
                  "%d decisions read are published first.", len(unreadable), path, aside, len(items))
        # Without them, so that the next start does not put them aside again (harmless if it does: a copy more).
        if (error := rewrite(path, items)) is not None:
            log.warning("could not write %s again without those lines (%s): they stay in it too", path,
                        error.strerror or error)
    return items


def _parsed(data: bytes, read_line: Callable[[bytes], Item | None]) -> tuple[list[Item], list[bytes]]:
    """The spooled decisions in `data`, and the lines that are none."""
    items, unreadable = [], []
    for line in data.splitlines():
        if line.strip():
            item = read_line(line)
            if item is None:
                unreadable.append(line)
            else:
                items.append(item)
    return items, unreadable


def _item(line: bytes) -> Item | None:
    """A line as `save` writes it; else None."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if row.__class__ is not dict:
        return None
    subject, decision_id, event = row.get("subject"), row.get("id"), row.get("event")
    if subject.__class__ is not str or decision_id.__class__ is not str or event.__class__ is not str:
        return None
    return subject, decision_id, event.encode()


def _decision(line: bytes) -> Item | None:
    """`_item` as /score spools one: on its subject, an id of ours (it goes into the publish's header line), its
    event a decision of that id that can be logged (`decision_problem`); else None. Another was published all the
    same, and the start failed on it (the learner holds it as served)."""
    from app.decision_ids import decision_time_ms
    from app.decisions import SUBJECT_SCORE, LoggedDecision, decode_decision

    item = _item(line)
    if item is None or item[0] != SUBJECT_SCORE or decision_time_ms(item[1]) is None:
        return None
    decoded = decode_decision(item[0], item[2])
    return item if isinstance(decoded, LoggedDecision) and decoded.id == item[1] else None

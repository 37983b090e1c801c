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

import os
from pathlib import Path

import orjson

SPOOL_NAME = "unpublished-decisions.jsonl"
Item = tuple[str, str, bytes]  # subject, decision id, the event's bytes


def save(path: Path, items: list[Item]) -> None:
    """Write `items` whole or not at all (a temporary file renamed over the spool)."""
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

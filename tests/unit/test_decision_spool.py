"""The spool file itself (`app.decision_spool`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from app import decision_spool


def test_a_saved_spool_is_on_disk_once_save_returns(tmp_path: Path, monkeypatch) -> None:
    """The spool is written to a temporary file, synced, then renamed over the old one: the rename is a change of
    the directory, which was not synced, so a power cut after a stop (the stop done, its spool said kept) could
    leave the old spool, or none, and the decisions kept there were lost."""
    spool = tmp_path / decision_spool.SPOOL_NAME
    synced: list[tuple[bool, bool]] = []  # (a directory, the spool there by its name), at each sync
    fsync = os.fsync

    def recorded(fd: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), spool.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    decision_spool.save(spool, [("decisions.score", "d-1", b'{"id":"d-1"}')])
    assert synced and synced[-1] == (True, True), synced

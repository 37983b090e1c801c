"""The resident memory and the event loop's longest stall of a checkpoint that saves every user, as a
catch-up that changed each leaves it to do.

    python bench/checkpoint_memory.py --users 300000                    # SQLite, the writer in a thread
    python bench/checkpoint_memory.py --users 300000 --writer process   # in the writer process
    python bench/checkpoint_memory.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/mybench

The users are copies of 2,000 typical users' states (as bench/memory.py makes them), held in an
online store as a service holds them, every one changed, the offline writer told of those saved.
Memory is sampled every 10 ms from /proc: the service's (this process) and the writer process's, if
any. The loop's stalls are reported over the whole checkpoint and once it has committed.
Last line: {"bench": "checkpoint_memory", "users": ..., "rss_before_mb": ..., "rss_peak_mb": ..., ...}
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import typical_users

from app import migrate
from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoint_writer import CheckpointWriter
from app.checkpoints import Checkpointer
from app.db import make_engine
from app.offline import OfflineFeatureWriter
from streams.store import OnlineStore


def rss_mb(pid: int | str = "self") -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process ended
        return 0.0
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


class Peaks:
    """The largest resident memory of this process and of its children, sampled in a thread."""

    def __init__(self) -> None:
        self.service = self.worker = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.service = max(self.service, rss_mb())
            for child in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
                for pid in child.read_text().split():
                    self.worker = max(self.worker, rss_mb(pid))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def stalls(until: asyncio.Event, found: list[tuple[float, float]]) -> None:
    """(when it ended, how long) of each 1 ms sleep of the event loop that took longer, beyond its 1 ms."""
    while not until.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        ended = time.perf_counter()
        found.append((ended, ended - started - 0.001))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=300_000)
    parser.add_argument("--typical", type=int, default=2_000, help="distinct users' states the users copy")
    parser.add_argument("--writer", choices=["thread", "process"], default="thread")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary directory")
    args = parser.parse_args()

    workdir = tempfile.TemporaryDirectory(prefix="checkpoint-memory-")
    url = args.database_url or f"sqlite:///{Path(workdir.name) / 'c.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    typical, _ = typical_users(args.typical)
    blobs = [state.to_bytes() for state in typical.users.values()]
    del typical
    store = OnlineStore()
    store.load({"SIGNALS": args.users}, ((f"r-{i:07d}", blobs[i % len(blobs)]) for i in range(args.users)))
    store.abort_checkpoint(list(store.users))  # every user changed since the last checkpoint
    gc.collect()
    gc.freeze()  # as the service's collector keeps the users out of full passes (app/collector.py)
    writer = CheckpointWriter(url) if args.writer == "process" else None
    checkpointer = Checkpointer(store, SqlCheckpointStore(engine), every_events=1, every_s=60, writer=writer)
    committed_at: list[float] = []
    checkpointer.on_saved.append(lambda _: committed_at.append(time.perf_counter()))
    checkpointer.on_saved.append(OfflineFeatureWriter(store, engine, every_s=60).saved)  # as the service does
    before = rss_mb()
    done = asyncio.Event()
    found: list[tuple[float, float]] = []
    with Peaks() as peaks:
        sampling = asyncio.create_task(stalls(done, found))
        started = time.perf_counter()
        await checkpointer.checkpoint()
        seconds = time.perf_counter() - started
        done.set()
        await sampling
    if writer is not None:
        writer.close()
    engine.dispose()
    print(json.dumps({"bench": "checkpoint_memory", "users": args.users, "writer": args.writer,
                      "dialect": engine.dialect.name, "state_bytes": round(sum(map(len, blobs)) / len(blobs)),
                      "rss_before_mb": round(before), "rss_peak_mb": round(peaks.service),
                      "rss_added_mb": round(peaks.service - before), "worker_peak_mb": round(peaks.worker),
                      "seconds": round(seconds, 2), "longest_stall_ms": round(max(s for _, s in found) * 1000, 1),
                      # once committed: the users saved told to the service's listeners, idle ones let go of
                      "after_commit_stall_ms": round(max((s for at, s in found if at >= committed_at[0]), default=0.0) * 1000, 1)}))


if __name__ == "__main__":
    asyncio.run(main())

"""Resident memory per user, and the time to restart and serve from a checkpoint of many users.

    python bench/memory.py                                   # 2,000 typical users; restart with 1M users
    python bench/memory.py --users 500 --restart-users 100000  # a quick run

1. Folds `--users` typical users (about 20 events a day for 30 days, from the simulator)
   and measures the process's resident memory before and after: everything the fold
   keeps, the memory that remembers event ids included, divided by the user count.
2. Writes a checkpoint of `--restart-users` users (copies of those typical users' state
   under new ids) to SQLite, then times a cold start of the service from it until the
   first /users/{id}/features answer.
Last line: {"bench": "memory", "bytes_per_user": ..., "restart_s_1m_users": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import orjson

from app import migrate
from app.checkpoint_stores import SqlCheckpointStore
from app.db import make_engine
from app.settings import Settings
from streams.events import parse_event
from streams.fold import to_ms
from streams.simulator import Population
from streams.store import OnlineStore
from tests.in_process import served


def typical_users(count: int) -> tuple[OnlineStore, float]:
    """Fold the users, then measure what their state holds once restored from a checkpoint.

    tracemalloc counts every byte Python allocates for the store (objects, dict slots,
    array buffers), which RSS cannot isolate from the freed event objects around it.
    """
    population = Population(users=count, seed=8)
    start = to_ms(datetime(2026, 10, 1, tzinfo=UTC))
    folded = OnlineStore()
    for _, event in population.history(days=30, start_ms=start):
        folded.apply(parse_event(orjson.dumps(event)))
    blobs = [(user, state.to_bytes()) for user, state in folded.users.items()]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = OnlineStore()
    store.load({}, ((user, blob) for user, blob in blobs))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return store, held / count


async def restart_time(store: OnlineStore, users: int, workdir: Path) -> tuple[float, float]:
    import uvicorn

    from app.api import create_app
    from app.embedded_nats import EmbeddedNats

    url = f"sqlite:///{workdir / 'restart.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    target = SqlCheckpointStore(engine)
    blobs = [state.to_bytes() for state in store.users.values()]
    written, started = 0, time.perf_counter()
    while written < users:
        batch = [(f"r-{written + i}", blobs[(written + i) % len(blobs)]) for i in range(min(50_000, users - written))]
        target.save({"SIGNALS": 0, "FEEDBACK": 0}, batch)
        written += len(batch)
        print(f"\r  checkpoint written: {written:,}/{users:,} users ({time.perf_counter() - started:.0f}s)",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    engine.dispose()
    del blobs
    gc.collect()

    nats = EmbeddedNats(workdir / "nats")
    nats_url = nats.start()
    try:
        settings = Settings(data_dir=workdir, nats_url=nats_url, database_url=url, port=0,
                            offline_features_every_s=0)
        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        started = time.perf_counter()
        task = asyncio.create_task(served(server))  # a failed start raised, not sys.exit(3) out of the loop
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient() as http:
            body = (await http.get(f"http://127.0.0.1:{port}/users/r-{users - 1}/features")).json()
        elapsed = time.perf_counter() - started
        assert body["known"], "the last user of the checkpoint must be served"
        while not app.state.service.warm:
            await asyncio.sleep(0.05)
        warm = time.perf_counter() - started
        server.should_exit = True
        await task
        return elapsed, warm
    finally:
        nats.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--restart-users", type=int, default=1_000_000)
    args = parser.parse_args()

    store, per_user = typical_users(args.users)
    blob = sum(len(s.to_bytes()) for s in store.users.values()) / args.users
    kept = sum(s.events_kept for s in store.users.values()) / args.users
    print(f"typical user: {kept:.0f} events kept, {per_user:,.0f} bytes resident, "
          f"{blob:,.0f} bytes in a checkpoint (goal: < 4,096 resident)")
    with tempfile.TemporaryDirectory() as tmp:
        seconds, warm = await restart_time(store, args.restart_users, Path(tmp))
    scale = 1_000_000 / args.restart_users
    note = "" if args.restart_users == 1_000_000 else " (scaled linearly to 1M)"
    print(f"restart and serve with {args.restart_users:,} users: {seconds:.1f}s; "
          f"all users loaded after {warm:.1f}s (goal: serving in < 30 s at 1M)")
    print(json.dumps({"bench": "memory", "bytes_per_user": round(per_user), "checkpoint_bytes_per_user": round(blob),
                      "restart_users": args.restart_users, "restart_s_1m_users": round(seconds * scale, 2),
                      "warm_s_1m_users": round(warm * scale, 1), "scaled": bool(note)}))


if __name__ == "__main__":
    asyncio.run(main())

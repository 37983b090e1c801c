"""A restart from a checkpoint of many users, as `tipstream run` does it: when /score answers, when
the warm-up ends, /score's latency meanwhile, the event loop's stalls and the peak memory.

    python bench/restart.py                                    # 1M users on SQLite
    python bench/restart.py --users 100000                     # a quick run
    python bench/restart.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/mybench

1. Writes a checkpoint of `--users` users (copies of 2,000 typical users' states, as
   bench/memory.py makes them) to the database, unless it holds that many already.
2. Starts `tipstream run` on it (its own embedded nats-server) and, from the moment the process
   starts, asks `GET /healthz` every 20 ms on one connection (the longest answer is the longest
   stall a request met) and `POST /score` for a random checkpointed user on another, one at a time.
3. Stops once the log says every user is loaded and /readyz answers 200.
Last line: {"bench": "restart", "users": ..., "score_s": ..., "warm_s": ..., "score_p99_ms": ..., ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (
    ROOT,
    add_settings_option,
    connect,
    encode_request,
    free_port,
    metric,
    percentile,
    service_environment,
    settings_given,
)
from memory import typical_users
from sqlalchemy import func, select

from app import db, migrate
from app.checkpoint_stores import SqlCheckpointStore
from app.db import make_engine

LOADED = re.compile(rb"all ([\d,]+) users? loaded in ([\d.]+)s")  # the count with thousands marks


def build(url: str, users: int) -> None:
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        held = conn.execute(select(func.count()).select_from(db.user_state)).scalar_one()
    if held >= users:
        engine.dispose()
        return
    store, _ = typical_users(2_000)
    blobs = [state.to_bytes() for state in store.users.values()]
    target, started = SqlCheckpointStore(engine), time.perf_counter()
    for first in range(held, users, 50_000):
        batch = [(f"r-{i}", blobs[i % len(blobs)]) for i in range(first, min(first + 50_000, users))]
        target.save({"SIGNALS": 0, "FEEDBACK": 0}, batch)
        print(f"\r  checkpoint written: {first + len(batch):,}/{users:,} users ({time.perf_counter() - started:.0f}s)",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    engine.dispose()


def start(url: str, data_dir: Path, port: int, **settings: str) -> subprocess.Popen:
    env = service_environment(**{"data_dir": data_dir, "port": port, "log_level": "info", **settings})
    env["DATABASE_URL"] = url
    log = open(data_dir / "service.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "run"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


async def probe(port: int, path: str, body: bytes, every_s: float, until: asyncio.Event,
                samples: list[tuple[float, float, int]], t0: float) -> None:
    """(time since start, latency, status) of each request, one at a time, on one connection."""
    raw = encode_request("POST" if body else "GET", path, body)
    client = None
    while not until.is_set():
        try:
            client = client or await connect(port)
            sent = time.perf_counter()
            status, _ = await asyncio.wait_for(client.send(raw), 30)
            samples.append((sent - t0, time.perf_counter() - sent, status))
        except (OSError, ConnectionError):
            client = None
        await asyncio.sleep(every_s)


def log_since(path: Path, offset: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stalls(text: str) -> dict[str, float]:
    """Event loop lag samples by bucket, from the histogram's cumulative counts."""
    name = "tipstream_event_loop_lag_seconds"
    over = {le: metric(text, f"{name}_count") - metric(text, f"{name}_bucket", f'le="{le}"') for le in ("0.1", "0.5")}
    return {"lag_samples": metric(text, f"{name}_count"), "lag_over_100ms": over["0.1"], "lag_over_500ms": over["0.5"]}


async def restart(url: str, users: int, data_dir: Path, score_every_s: float, timeout_s: float,
                  settings: dict[str, str]) -> dict:
    port, rng = free_port(), random.Random(1)
    log_path = data_dir / "service.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0  # earlier runs' lines are not this one's
    t0 = time.perf_counter()
    process = start(url, data_dir, port, **settings)
    done, health, scores = asyncio.Event(), [], []
    tasks = [asyncio.create_task(probe(port, "/healthz", b"", 0.02, done, health, t0))]
    result: dict = {"bench": "restart", "users": users, "database": url.split(":", 1)[0]}
    try:
        score_task = None
        while time.perf_counter() - t0 < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited; see {data_dir / 'service.log'}")
            if score_task is None and health:
                score_task = asyncio.create_task(score_loop(port, users, rng, score_every_s, done, scores, t0))
            loaded = LOADED.search(log_since(log_path, log_start))
            if loaded and "warm_s" not in result:
                result["warm_s"] = round(time.perf_counter() - t0, 2)
                result["warm_logged_s"] = float(loaded.group(2))
            if "ready_s" not in result:
                try:
                    reader = await connect(port)
                    status, _ = await asyncio.wait_for(reader.send(encode_request("GET", "/readyz")), 30)
                    reader.transport.close()
                    if status == 200:
                        result["ready_s"] = round(time.perf_counter() - t0, 2)
                except (OSError, ConnectionError):
                    pass
            if "warm_s" in result and "ready_s" in result:
                break
            await asyncio.sleep(0.2)
        else:
            result["timed_out"] = True
        await asyncio.sleep(1.0)  # a few requests after the warm-up, and the lag watcher's last samples
        client = await connect(port)
        _, text = await client.send(encode_request("GET", "/metrics"))
        client.transport.close()
        result.update(stalls(text.decode()))
        result["peak_rss_mb"] = round(peak_rss_mb(process.pid))
    finally:
        done.set()
        await asyncio.gather(*tasks, *([score_task] if score_task else []), return_exceptions=True)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    ok = [s for s in scores if s[2] == 200]
    warm = result.get("warm_s", float("inf"))
    during = sorted(s[1] * 1000 for s in ok if s[0] < warm)
    result["score_s"] = round(ok[0][0] + ok[0][1], 2) if ok else None
    result["score_requests_during_warm_up"] = len(during)
    result["score_p50_ms"] = round(percentile(during, 0.5), 2)
    result["score_p99_ms"] = round(percentile(during, 0.99), 2)
    result["score_max_ms"] = round(during[-1], 1) if during else None
    result["score_non_200"] = len([s for s in scores if s[2] != 200])
    answered = [s for s in health if s[2] == 200]
    result["healthz_s"] = round(answered[0][0] + answered[0][1], 2) if answered else None
    slowest = max(answered, key=lambda s: s[1], default=None)
    result["healthz_max_ms"] = round(slowest[1] * 1000, 1) if slowest else None
    result["healthz_max_at_s"] = round(slowest[0], 2) if slowest else None
    return result


async def score_loop(port: int, users: int, rng: random.Random, every_s: float, done: asyncio.Event,
                     samples: list[tuple[float, float, int]], t0: float) -> None:
    client = None
    while not done.is_set():
        body = json.dumps({"user_id": f"r-{rng.randrange(users)}",
                           "candidates": [{"tip_id": f"tip-{i}"} for i in range(10)]}).encode()
        try:
            client = client or await connect(port)
            sent = time.perf_counter()
            status, _ = await asyncio.wait_for(client.send(encode_request("POST", "/score", body)), 30)
            samples.append((sent - t0, time.perf_counter() - sent, status))
        except (OSError, ConnectionError):
            client = None
        await asyncio.sleep(every_s)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="", help="default: SQLite in the data directory")
    parser.add_argument("--data-dir", default="", help="kept between runs (the SQLite checkpoint is built once)")
    parser.add_argument("--score-every-s", type=float, default=0.02)
    parser.add_argument("--timeout-s", type=float, default=280.0)
    add_settings_option(parser)
    args = parser.parse_args()
    settings = settings_given(parser, args.set)
    tmp = None if args.data_dir else tempfile.TemporaryDirectory(prefix="tipstream-bench-")
    data_dir = Path(args.data_dir or tmp.name)  # type: ignore[union-attr]
    data_dir.mkdir(parents=True, exist_ok=True)
    url = args.database_url or f"sqlite:///{data_dir / 'tipstream.db'}"
    started = time.perf_counter()
    build(url, args.users)
    print(f"checkpoint of {args.users:,} users ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    result = await restart(url, args.users, data_dir, args.score_every_s, args.timeout_s, settings)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())

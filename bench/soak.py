"""A soak: the service under steady demo traffic and a bounded /score load, sampled for what grows.

    python bench/soak.py                        # 20 minutes, a sample every 30 s
    python bench/soak.py --minutes 1 --every-s 5  # a quick run

1. Starts `tipstream run --demo <--demo>` as a user does (its own embedded nats-server, SQLite in a
   temporary data directory; `--data-dir` keeps it).
2. Drives `POST /score` at `--rps` on loopback for users `soak-0`, `soak-1`, ...: a new user joins
   every `1 / --new-users-per-s` seconds during the first half of the run, then the set stays as it
   is, so the second half is a steady state where growth is a leak rather than more users. A new tip
   id joins the candidates every `--new-tip-every-s` seconds; a reaction to one answer in
   `--react-every` is published to FEEDBACK, so the learner joins and learns as it does for an app.
3. Every `--every-s` seconds, writes a row to `--csv`: the resident memory, open fds and threads of
   the service and of each of its child processes (the embedded nats-server, a checkpoint writer),
   the sizes of the data directory's files (SQLite db, WAL, the NATS store, the spool), the number of
   /metrics series and the gauges that hold things (users, caches, pending feedback, queues), the
   mean checkpoint time and the longest event loop stall since the last sample.
   With `--sqlite-status`, the service runs under bench/_sqlite_status.py and each row adds SQLite's
   own memory (`sqlite3_memory_used`), its connections, their page caches and prepared statements,
   and the largest statement with the values last bound to it.
4. Stops the service with SIGTERM, as a supervisor does.
Steady figures are least-squares slopes over the second half (at least two samples).
Last line: {"bench": "soak", "minutes": ..., "rss_mb_start": ..., "rss_mb_end": ..., "rss_mb_per_hour_steady": ...,
"rss_anon_mb_per_hour_steady": ...,
"fds_start": ..., "fds_end": ..., "metrics_series_start": ..., "metrics_series_end": ...,
"checkpoint_s_first": ..., "checkpoint_s_last": ..., ...}
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (
    REACTIONS,
    ServiceProcess,
    add_settings_option,
    connect,
    encode_request,
    metric,
    react,
    request_once,
    settings_given,
)

GAUGES = ("tipstream_users", "tipstream_users_dormant", "tipstream_join_cache_decisions", "tipstream_join_cache_bytes",
          "tipstream_feedback_pending", "tipstream_decision_queue", "tipstream_candidate_cache_items",
          "tipstream_offline_pending_users", "tipstream_tip_scores_rows_total", "tipstream_checkpoint_users_total",
          "tipstream_users_at_event_cap")
LAG_BOUNDS_LABEL = "tipstream_event_loop_lag_seconds_bucket{le="


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (the embedded nats-server, a checkpoint writer), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def process_figures(pid: int) -> dict[str, Any]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    name = Path(f"/proc/{pid}/comm").read_text().strip()
    # Anonymous memory apart: it is what a leak grows; file-backed pages (code, the libraries) are
    # the kernel's to drop.
    return {"name": name, "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
            "rss_anon_mb": int(status["RssAnon"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def tree_size(path: Path) -> int:
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:  # a JetStream block removed while walking
                pass
    return total


def data_figures(data_dir: Path) -> dict[str, float]:
    def mb(name: str) -> float:
        path = data_dir / name
        return path.stat().st_size / 1e6 if path.exists() else 0.0

    spool = sum(p.stat().st_size for p in data_dir.glob("spool*") if p.is_file() and p.name != "spool-reserve")
    return {"db_mb": mb("tipstream.db"), "wal_mb": mb("tipstream.db-wal"), "nats_mb": tree_size(data_dir / "nats") / 1e6,
            "spool_mb": spool / 1e6, "data_dir_mb": tree_size(data_dir) / 1e6}


def lag_buckets(text: str) -> list[tuple[float, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(LAG_BOUNDS_LABEL):
            bound = line[len(LAG_BOUNDS_LABEL) + 1:].split('"', 1)[0]
            out.append((float(bound), float(line.rsplit(" ", 1)[1])))
    return out


def longest_stall(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    """The longest stall between two scrapes, as the bound of the lowest (cumulative) lag bucket that
    holds every wake-up since: past the last finite bound, that bound.

    >>> longest_stall([(0.01, 5), (0.1, 5), (float("inf"), 5)], [(0.01, 9), (0.1, 10), (float("inf"), 10)])
    0.1
    """
    earlier = dict(before)
    total = dict(after).get(float("inf"), 0.0) - earlier.get(float("inf"), 0.0)
    below = 0.0
    for bound, count in after:
        if count - earlier.get(bound, 0.0) >= total:
            return bound if bound != float("inf") else below
        below = bound
    return 0.0


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """The least-squares growth per hour of (seconds, value) samples.

    >>> slope_per_hour([(0, 10.0), (1800, 11.0), (3600, 12.0)])
    2.0
    """
    times = [t for t, _ in points]
    if len(set(times)) < 2:
        return 0.0
    return 3600 * statistics.linear_regression(times, [v for _, v in points]).slope


class Load:
    """Closed-loop clients paced to `rps` in all, over a user set that grows for `grow_s` seconds."""

    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port, self.args = port, args
        self.rng = random.Random(args.seed)
        self.users = 1
        self.tips = [f"soak-tip-{i}" for i in range(12)]
        self.sent = self.failed = self.reactions = 0
        self.statuses: dict[int, int] = {}

    def body(self) -> tuple[str, bytes]:
        rng = self.rng
        user = f"soak-{rng.randrange(self.users)}"
        tips = rng.sample(self.tips[-30:], 8)  # the newest tips: older ones go out of use, as in an app
        return user, json.dumps({"user_id": user, "candidates": [
            {"tip_id": t, "category": f"cat-{int(t.rsplit('-', 1)[1]) % 5}"} for t in tips]}).encode()

    async def grow(self, t0: float, grow_s: float) -> None:
        next_tip = t0 + self.args.new_tip_every_s
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if now - t0 < grow_s:
                self.users = 1 + int((now - t0) * self.args.new_users_per_s)
            if now >= next_tip:
                self.tips.append(f"soak-tip-{len(self.tips)}")
                next_tip += self.args.new_tip_every_s

    async def client(self, js: Any, interval: float) -> None:
        conn = await connect(self.port)
        due = time.monotonic()
        while True:
            due += interval
            user, request = self.body()
            status, body = await asyncio.wait_for(conn.send(encode_request("POST", "/score", request)), 30)
            self.sent += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200:
                self.failed += 1
            elif self.sent % self.args.react_every == 0:
                await self.react(js, user, json.loads(body))
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def react(self, js: Any, user: str, answer: dict[str, Any]) -> None:
        await react(js, user, answer, self.rng.choice(REACTIONS))
        self.reactions += 1


async def scrape(port: int) -> str:
    status, body = await request_once(port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return body.decode()


async def soak(args: argparse.Namespace, out: Any) -> dict[str, Any]:
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    launcher = (str(Path(__file__).resolve().parent / "_sqlite_status.py"),) if args.sqlite_status else ("-m", "app.cli")
    service = ServiceProcess(data_dir, cli_args=("--demo", str(args.demo)), launcher=launcher,
                             **{"log_level": "info", "admin_token": "soak-bench-admin-token-0123", **args.settings})
    try:
        await service.wait_ready(120)
        given = "".join(f", {name}={value}" for name, value in args.settings.items())
        print(f"service pid {service.process.pid} on port {service.port}, data in {service.data_dir}{given}",
              file=sys.stderr)
        return await drive_and_sample(service, args, out)
    finally:
        if service.process.poll() is None:  # as a supervisor stops it
            service.process.send_signal(signal.SIGTERM)
            service.process.wait(60)
        service.stop() if args.data_dir is None else service.shutdown()


async def drive_and_sample(service: Any, args: argparse.Namespace, out: Any) -> dict[str, Any]:
    """The load and the samples against a running `service` (its `process.pid`, `port`, `data_dir`, `nats_url`)."""
    import nats

    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    load = Load(service.port, args)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    duration = args.minutes * 60
    tasks = [asyncio.create_task(load.client(js, args.clients / args.rps)) for _ in range(args.clients)]
    tasks.append(asyncio.create_task(load.grow(t0, duration / 2)))
    previous_text = await scrape(service.port)
    writer: csv.DictWriter | None = None
    try:
        while True:
            elapsed = time.monotonic() - t0
            for task in tasks:
                if task.done():
                    task.result()  # a load client's failure ends the soak with its error
            row = await sample(service, load, elapsed, previous_text)
            previous_text = row.pop("_text")
            rows.append(row)
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(row), extrasaction="ignore", restval="")
                writer.writeheader()
            writer.writerow(row)
            out.flush()
            print(f"  {elapsed / 60:5.1f} min  rss {row['rss_mb']:.0f} MB  fds {row['fds']}  series "
                  f"{row['metrics_series']}  users {row['users_sent']}  db {row['db_mb']:.1f} MB "
                  f"wal {row['wal_mb']:.1f} MB  nats {row['nats_mb']:.1f} MB  checkpoint "
                  f"{row['checkpoint_s']:.3f} s  stall {row['stall_s']:.3f} s"
                  + (f"  sqlite {row['sqlite_mb']:.1f} MB" if "sqlite_mb" in row else ""), file=sys.stderr)
            if elapsed >= duration:
                break
            await asyncio.sleep(min(args.every_s, max(0.0, duration - elapsed)))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await nc.close()
    return summary(rows, load)


async def sample(service: Any, load: Load, elapsed: float, previous_text: str) -> dict[str, Any]:
    text = await scrape(service.port)
    row: dict[str, Any] = {"t_s": round(elapsed, 1), "users_sent": load.users, "tips_sent": len(load.tips),
                           "requests": load.sent, "failed": load.failed, "reactions": load.reactions}
    pids = process_tree(service.process.pid)
    main = process_figures(pids[0])
    row.update(rss_mb=main["rss_mb"], rss_anon_mb=main["rss_anon_mb"], fds=main["fds"], threads=main["threads"])
    for pid in pids[1:]:
        try:
            child = process_figures(pid)
        except OSError:  # exited between listing and reading
            continue
        for key in ("rss_mb", "rss_anon_mb", "fds", "threads"):
            row[f"{child['name']}_{key}"] = child[key]
    row.update(data_figures(service.data_dir))
    row["metrics_series"] = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    for name in GAUGES:
        row[name.removeprefix("tipstream_")] = metric(text, name)
    ck_sum = metric(text, "tipstream_checkpoint_seconds_sum") - metric(previous_text, "tipstream_checkpoint_seconds_sum")
    ck_n = metric(text, "tipstream_checkpoint_seconds_count") - metric(previous_text, "tipstream_checkpoint_seconds_count")
    row["checkpoints"] = ck_n
    row["checkpoint_s"] = ck_sum / ck_n if ck_n else 0.0
    row["stall_s"] = longest_stall(lag_buckets(previous_text), lag_buckets(text))
    if load.args.sqlite_status:
        row.update(sqlite_figures(service.data_dir))
    row["_text"] = text
    return row


def sqlite_figures(data_dir: Path) -> dict[str, Any]:
    """SQLite's own memory as bench/_sqlite_status.py last wrote it (zeros before its first write)."""
    try:
        status = json.loads((data_dir / "sqlite_status.json").read_text())
    except FileNotFoundError:
        status = {"memory_used": 0, "connections": []}
    connections = status["connections"]
    largest = max(connections, key=lambda c: c.get("largest_statement_bytes", 0), default={})
    return {"sqlite_mb": status["memory_used"] / 1e6, "sqlite_connections": len(connections),
            "sqlite_cache_mb": sum(c["cache"] for c in connections) / 1e6,
            "sqlite_stmt_mb": sum(c["stmt"] for c in connections) / 1e6,
            "sqlite_statements": sum(c.get("statements", 0) for c in connections),
            "sqlite_largest_statement": f"{largest.get('largest_statement_bytes', 0) / 1e6:.2f} MB "
                                        f"{largest.get('largest_statement', '')}"}


def summary(rows: list[dict[str, Any]], load: Load) -> dict[str, Any]:
    first, last = rows[0], rows[-1]
    steady = [r for r in rows if r["t_s"] >= rows[-1]["t_s"] / 2] or rows[-1:]

    def steady_slope(key: str) -> float:
        return round(slope_per_hour([(r["t_s"], float(r[key])) for r in steady]), 3)

    checkpoints = [r["checkpoint_s"] for r in rows if r["checkpoints"]]
    return {"bench": "soak", "minutes": round(last["t_s"] / 60, 2), "requests": load.sent, "failed": load.failed,
            "users": load.users, "tips": len(load.tips),
            "rss_mb_start": round(first["rss_mb"], 1), "rss_mb_end": round(last["rss_mb"], 1),
            "rss_mb_per_hour_steady": steady_slope("rss_mb"), "rss_anon_mb_per_hour_steady": steady_slope("rss_anon_mb"),
            "fds_start": first["fds"], "fds_end": last["fds"], "threads_start": first["threads"],
            "threads_end": last["threads"],
            "metrics_series_start": first["metrics_series"], "metrics_series_end": last["metrics_series"],
            "checkpoint_s_first": round(checkpoints[0], 4) if checkpoints else 0.0,
            "checkpoint_s_last": round(checkpoints[-1], 4) if checkpoints else 0.0,
            "stall_s_max": max(r["stall_s"] for r in rows),
            "db_mb_end": round(last["db_mb"], 2), "wal_mb_max": round(max(r["wal_mb"] for r in rows), 2),
            "nats_mb_end": round(last["nats_mb"], 2), "db_mb_per_hour_steady": steady_slope("db_mb"),
            **({"sqlite_mb_start": round(next((r["sqlite_mb"] for r in rows if r["sqlite_mb"]), 0.0), 2), "sqlite_mb_end": round(last["sqlite_mb"], 2),
                "sqlite_mb_per_hour_steady": steady_slope("sqlite_mb"),
                "sqlite_stmt_mb_per_hour_steady": steady_slope("sqlite_stmt_mb")} if "sqlite_mb" in last else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every-s", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--rps", type=float, default=100.0, help="/score requests per second, in all")
    parser.add_argument("--clients", type=int, default=4, help="connections the requests share")
    parser.add_argument("--demo", type=float, default=200.0, help="the demo's events/s (`tipstream run --demo`)")
    parser.add_argument("--new-users-per-s", type=float, default=2.0, help="while the user set grows")
    parser.add_argument("--new-tip-every-s", type=float, default=60.0)
    parser.add_argument("--react-every", type=int, default=3, help="a reaction to one answer in this many")
    parser.add_argument("--csv", default="soak.csv", help="where the samples go")
    parser.add_argument("--data-dir", help="keep the service's data here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sqlite-status", action="store_true",
                        help="add SQLite's own memory (bench/_sqlite_status.py; CPython 3.11)")
    add_settings_option(parser)
    args = parser.parse_args()
    args.settings = settings_given(parser, args.set)
    if args.minutes <= 0 or args.every_s <= 0 or args.rps <= 0 or args.clients < 1 or args.react_every < 1:
        parser.error("--minutes, --every-s and --rps must be above 0; --clients and --react-every at least 1")
    with open(args.csv, "w", newline="") as out:
        figures = asyncio.run(soak(args, out))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Forgetting users under faults, on the real service: kill -9 at moments of an erasure, and a NATS stall.

    python bench/forget_soak.py                          # 13 kills, SQLite in a temporary data directory
    python bench/forget_soak.py --rounds 2 --warm-s 20   # a quick run
    python bench/forget_soak.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/mysoak

1. Starts `tipstream run --demo 100` (its own embedded nats-server; `--database-url`: PostgreSQL, an empty
   database of yours) and drives its own load at `--rps`: for an active user, an event to SIGNALS, `POST /score`
   and, for half the answers, a reaction to FEEDBACK. Six kept users get a little of it first, then none: their
   `tip_scores`, `user_features` and `user_state` rows are the reference the rest of the run compares with.
2. Each round stops the traffic of two active users (their last request answered), asks to forget both (one by
   `tipstream users forget`, one by `POST /admin/users/{id}/forget`), kills the service with SIGKILL at a moment
   of the erasure (a delay after the requests, or a log line: step 2's, the SIGNALS scan's end, the request done),
   starts it again and waits for both to be done. Halfway, one round stalls the embedded nats-server instead
   (SIGSTOP for `--stall-s` seconds, then SIGCONT) once step 2 is logged.
3. After each round, checks that every user forgotten so far is `done`, held by no SQL table but the requests'
   own (each cell searched, the models' and the learner's saved bytes too), unknown to `/users/{id}/features`
   (fallbacks, `"known": false`) and in no message of SIGNALS, FEEDBACK, DECISIONS or the DLQ (bodies and
   headers, read whole with nats-py); and that the kept users' rows match the reference.
4. At the end: events of a forgotten user published after the request (a new user's, the docs say), `tipstream
   users export` of a few, and a rebuild from the log (`tipstream migrate base`, then a start) checked the same.
Last line: {"bench": "forget_soak", "kills": ..., "forgotten": ..., "problems": ..., ...}; exit code 1 if any.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import sqlalchemy as sa
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO := Path(__file__).resolve().parents[1]))

from _harness import REACTIONS, add_settings_option, free_port, react, service_environment, settings_given

PY = sys.executable
TOKEN = "forget-soak-admin-token-0123456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STREAMS = ("SIGNALS", "FEEDBACK", "DECISIONS", "DLQ")
TIPS = [f"h-tip-{i}" for i in range(12)]


def say(*parts) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}]", *parts, file=sys.stderr, flush=True)


class Svc:
    def __init__(self, data_dir: Path, port: int, db: str | None, settings: dict[str, str]) -> None:
        self.data_dir, self.port, self.db, self.settings = data_dir, port, db, settings
        self.proc: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "service.log"

    def env(self) -> dict[str, str]:
        """The service's, and the CLI's run beside it (`users forget`, `users export`, `migrate base`)."""
        return service_environment(**{"log_level": "info", **self.settings}, data_dir=self.data_dir, port=self.port,
                                   admin_token=TOKEN, **({"database_url": self.db} if self.db else {}))

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PY, "-m", "app.cli", "run", "--demo", "100"], cwd=REPO, env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        say("service pid", self.proc.pid)

    async def ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited {self.proc.returncode}: {self.tail(3000)}")
                try:
                    if (await http.get(self.url + "/readyz")).status_code == 200:
                        await asyncio.sleep(0.5)
                        if self.proc.poll() is not None or not (self.data_dir / "nats.url").exists():
                            raise RuntimeError(f"another process answers on {self.port}: {self.tail(500)}")
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("not ready in time")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def nats_url(self) -> str:
        return (self.data_dir / "nats.url").read_text().strip()

    def nats_pid(self) -> int:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"nats-server" in cmd:
                return int(entry)
        raise RuntimeError("no embedded nats-server child")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def term(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def tail(self, n: int) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


class Load:
    """Signal event, /score and (half the time) a reaction, for the active users, paced to `rps`."""

    def __init__(self, svc: Svc, rps: float) -> None:
        self.svc, self.rps = svc, rps
        self.active: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.events: dict[str, int] = {}  # user -> events published to SIGNALS
        self.sent = self.failed = self.reactions = 0
        self.failures: Counter[str] = Counter()  # what failed: an HTTP status, or the exception's class
        self.rng = random.Random(194)
        self.task: asyncio.Task | None = None
        # Of the run going on: a run of an older one ends at its next request. nats-py swallows a cancellation where
        # it waits to flush (`_flush_pending`), so a run cancelled there by `stop` went on, on the killed service's
        # connection, failing 5 requests a second beside the next start's run for the rest of the soak.
        self.generation = 0

    async def one(self, js, http, user: str) -> None:
        event = {"id": f"h-{uuid.uuid4().hex}", "type": "task.completed", "user_id": user,
                 "ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "v": 1, "data": {"task_id": "t-1"}}
        await js.publish("signals.task.completed", json.dumps(event).encode(), headers={"Nats-Msg-Id": event["id"]})
        self.events[user] = self.events.get(user, 0) + 1
        tips = self.rng.sample(TIPS, 6)
        r = await http.post("/score", json={"user_id": user, "candidates": [
            {"tip_id": t, "category": f"cat-{int(t.rsplit('-', 1)[1]) % 4}"} for t in tips]})
        self.sent += 1
        if r.status_code != 200:
            self.fail(str(r.status_code))
            return
        if self.rng.random() < 0.5:
            await react(js, user, r.json(), self.rng.choice(REACTIONS))
            self.reactions += 1

    def fail(self, kind: str) -> None:
        self.failed += 1
        self.failures[kind] += 1

    async def run(self) -> None:
        generation = self.generation
        nc = await nats.connect(self.svc.nats_url(), allow_reconnect=False)
        js = nc.jetstream(timeout=5)
        async with httpx.AsyncClient(base_url=self.svc.url, timeout=10) as http:
            due = time.monotonic()
            try:
                while generation == self.generation:
                    due += 1 / self.rps
                    users = sorted(self.active)
                    if users:
                        user = self.rng.choice(users)
                        self.in_flight[user] = self.in_flight.get(user, 0) + 1
                        try:
                            await self.one(js, http, user)
                        except Exception as error:  # noqa: BLE001 - the service killed or NATS stalled
                            self.fail(type(error).__name__)
                            await asyncio.sleep(0.2)
                        finally:
                            self.in_flight[user] -= 1
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    due = max(due, time.monotonic() - 1)
            finally:
                await nc.close()

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        self.generation += 1
        if self.task is not None:
            self.task.cancel()
            # A close that hangs on a dead server is left to the loop's end.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self.task), 5)
            self.task = None

    async def retire(self, users: list[str]) -> None:
        """No more traffic for `users`: the last iteration of theirs ended."""
        self.active.difference_update(users)
        while any(self.in_flight.get(u, 0) for u in users):
            await asyncio.sleep(0.005)


def pattern(user: str) -> re.Pattern[bytes]:
    return re.compile(re.escape(user.encode()) + rb"(?![0-9])")


@contextlib.contextmanager
def connected(url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def sql_hits(url: str, users: list[str]) -> dict[str, list[str]]:
    """user -> tables (columns) whose cells hold their id, every table but the erasure records."""
    hits: dict[str, list[str]] = {u: [] for u in users}
    pats = {u: pattern(u) for u in users}
    with connected(url) as conn:
        names = [t for t in sa.inspect(conn).get_table_names()
                 if t not in ("erasures", "erasures_earlier", "alembic_version")]
        for table in names:
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')).mappings():
                for column, cell in row.items():
                    if cell is None:
                        continue
                    raw = bytes(cell if isinstance(cell, bytes | memoryview) else
                                (cell if isinstance(cell, str) else json.dumps(cell, default=str)).encode())
                    for u, p in pats.items():
                        if p.search(raw):
                            hits[u].append(f"{table}.{column}")
    return {u: sorted(set(h)) for u, h in hits.items() if h}


def erasure_rows(url: str) -> dict[str, str]:
    with connected(url) as conn:
        return dict(conn.execute(sa.text("SELECT user_id, status FROM erasures")).all())


def kept_reference(url: str, users: list[str]) -> dict[str, object]:
    """The kept users' `tip_scores`, `user_features` and `user_state` rows, as compared."""
    def of(query: str) -> list[Any]:
        return conn.execute(sa.text(query).bindparams(sa.bindparam("u", expanding=True)), {"u": users}).all()

    with connected(url) as conn:
        scores = of("SELECT decision_id, user_id, tip_id, score, reward, rewards FROM tip_scores WHERE user_id IN :u "
                    "ORDER BY decision_id")
        feats = of("SELECT user_id, features FROM user_features WHERE user_id IN :u ORDER BY user_id")
        states = of("SELECT user_id, state FROM user_state WHERE user_id IN :u ORDER BY user_id")

    def norm(value: Any) -> Any:  # SQLite's JSON comes back as text
        return json.loads(value) if isinstance(value, str) else value

    return {"tip_scores": [(r[0], r[1], r[2], round(r[3], 9), r[4], norm(r[5])) for r in scores],
            "user_features": [(r[0], norm(r[1])) for r in feats],
            "user_state": [(r[0], bytes(r[1]).hex()) for r in states]}


async def stream_hits(nats_url: str, users: list[str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """user -> streams whose messages (body or headers) hold their id; and how many messages each stream holds."""
    pats = {u: pattern(u) for u in users}
    hits: dict[str, set[str]] = {u: set() for u in users}
    counts = {}
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=10)
        for stream in STREAMS:
            info = await js.stream_info(stream)
            last, n = info.state.last_seq, 0
            counts[stream] = info.state.messages
            if info.state.messages == 0:
                continue
            sub = await js.pull_subscribe("", stream=stream, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30,
                filter_subjects=list(info.config.subjects)))
            seq, idle = 0, 0
            while seq < last:
                try:
                    msgs = await sub.fetch(1000, timeout=5)
                    idle = 0
                except nats.errors.TimeoutError:
                    idle += 1
                    if idle >= 6:  # 30 s without a message: say so, it is not all read
                        raise RuntimeError(f"{stream}: read to #{seq} of #{last} only")
                    continue
                for m in msgs:
                    seq = m.metadata.sequence.stream
                    n += 1
                    raw = m.data + json.dumps(m.headers or {}).encode()
                    for u, p in pats.items():
                        if p.search(raw):
                            hits[u].add(stream)
            await sub.unsubscribe()
            counts[stream] = n
            if n != info.state.messages:  # more stored meanwhile (the demo), never fewer
                counts[stream + "_at_start"] = info.state.messages
    finally:
        await nc.close()
    return {u: sorted(h) for u, h in hits.items() if h}, counts


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.tmp = tempfile.TemporaryDirectory(prefix="tipstream-forget-soak-") if args.data_dir is None else None
        data_dir = Path(args.data_dir or self.tmp.name)  # type: ignore[union-attr]
        self.db = args.database_url or f"sqlite:///{data_dir / 'tipstream.db'}"
        self.svc = Svc(data_dir, args.port or free_port(), args.database_url, args.settings)
        self.load = Load(self.svc, args.rps)
        self.forgotten: list[str] = []
        self.kept = [f"kept-{i}" for i in range(6)]
        self.next_user = 0
        self.kills: list[dict] = []
        self.problems: list[str] = []

    def new_users(self, n: int) -> list[str]:
        users = [f"forget-{self.next_user + i}" for i in range(n)]
        self.next_user += n
        return users

    def db_url_for_sql(self) -> str:
        return self.db

    async def forget(self, user: str, via_cli: bool) -> None:
        if via_cli:
            proc = await asyncio.create_subprocess_exec(
                PY, "-m", "app.cli", "users", "forget", user, "--url", self.svc.url, cwd=REPO, env=self.svc.env(),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"users forget {user}: {proc.returncode} {out.decode()}")
        else:
            async with httpx.AsyncClient(base_url=self.svc.url, timeout=30) as http:
                r = await http.post(f"/admin/users/{user}/forget", headers=AUTH, json={"actor": "forget-soak"})
                if r.status_code != 202:
                    raise RuntimeError(f"forget {user}: {r.status_code} {r.text}")

    async def restart(self) -> float:
        started = time.monotonic()
        self.svc.start()
        await self.svc.ready()
        self.load.start()
        return time.monotonic() - started

    async def wait_done(self, users: list[str], timeout: float = 300) -> float:
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=self.svc.url, timeout=30) as http:
            while True:
                statuses = {}
                for u in users:
                    r = await http.get(f"/admin/users/{u}/forget", headers=AUTH)
                    statuses[u] = r.json().get("status") if r.status_code == 200 else r.status_code
                if all(s == "done" for s in statuses.values()):
                    return time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"not done: {statuses}")
                await asyncio.sleep(0.5)

    async def verify(self, label: str, streams: bool = True) -> dict:
        users = list(self.forgotten)
        result: dict = {"label": label, "forgotten": len(users)}
        rows = erasure_rows(self.db_url_for_sql())
        not_done = {u: rows.get(u) for u in users if rows.get(u) != "done"}
        if not_done:
            self.problems.append(f"{label}: not done {not_done}")
        hits = sql_hits(self.db_url_for_sql(), users)
        if hits:
            self.problems.append(f"{label}: SQL holds {hits}")
        result["sql_hits"] = len(hits)
        async with httpx.AsyncClient(base_url=self.svc.url, timeout=30) as http:
            bad = {}
            for u in users:
                r = await http.get(f"/users/{u}/features")
                answer = r.json() if r.status_code == 200 else {}
                if r.status_code != 200 or answer.get("known") is not False or not all(
                        f.get("fallback") for f in answer.get("features", {}).values()):
                    bad[u] = (r.status_code, r.text[:300])
            if bad:
                self.problems.append(f"{label}: /users/{{id}}/features answered {bad}")
        if streams:
            shits, counts = await stream_hits(self.svc.nats_url(), users)
            if shits:
                self.problems.append(f"{label}: streams hold {shits}")
            result["stream_hits"], result["messages"] = len(shits), counts
        ref = kept_reference(self.db_url_for_sql(), self.kept)
        if ref != self.reference:
            diff = {k: (len(self.reference[k]), len(ref[k])) for k in ref if ref[k] != self.reference[k]}
            self.problems.append(f"{label}: kept users differ from the reference: {diff}")
            result["kept_differs"] = diff
        say("verify", json.dumps(result), "problems so far:", len(self.problems))
        return result

    async def kept_rows(self) -> dict[str, object]:
        """The kept users' rows once a checkpoint and a `user_features` pass (every 30 s) hold all of them."""
        t = time.monotonic()
        while time.monotonic() - t < 120:
            await asyncio.sleep(2)
            ref = kept_reference(self.db_url_for_sql(), self.kept)
            if len(ref["user_features"]) == len(self.kept) and len(ref["user_state"]) == len(self.kept):
                break
        await asyncio.sleep(5)
        return kept_reference(self.db_url_for_sql(), self.kept)

    async def setup(self) -> None:
        # Kept users: a few events, scores and reactions, then never touched: their rows are the reference.
        self.load.active = set(self.kept)
        self.load.start()
        t = time.monotonic()
        while self.load.reactions < 40 and time.monotonic() - t < 60:
            await asyncio.sleep(0.2)
        await self.load.retire(self.kept)
        self.reference = await self.kept_rows()
        say("reference:", {k: len(v) for k, v in self.reference.items()})
        self.load.active = set(self.new_users(14))
        await asyncio.sleep(self.args.warm_s)
        say("load", self.load.sent, "sent", self.load.failed, "failed", self.load.reactions, "reactions")

    async def kill_round(self, i: int, moment: str) -> None:
        victims = sorted(self.load.active)[:2]
        self.load.active.update(self.new_users(2))  # others join, so there is always someone active
        await self.load.retire(victims)
        offset = self.svc.log_size()
        t0 = time.monotonic()
        await self.forget(victims[0], via_cli=(i % 2 == 0))
        await self.forget(victims[1], via_cli=False)
        self.forgotten.extend(victims)
        reached = await self.wait_moment(moment, victims, offset)
        self.svc.kill9()
        killed_at = time.monotonic() - t0
        await self.load.stop()
        text = self.svc.log_since(offset)
        phase = ("done" if "forgot user" in text else "scrubbing" if "tipstream.scrub: scrubbed" in text
                 else "dropped" if "are gone" in text else "requested")
        restart_s = await self.restart()
        done_s = await self.wait_done(victims)
        entry = {"round": i, "moment": moment, "reached": reached, "killed_after_s": round(killed_at, 2),
                 "phase_in_log": phase, "restart_s": round(restart_s, 1), "done_after_restart_s": round(done_s, 1)}
        self.kills.append(entry)
        say("kill", json.dumps(entry))
        await self.verify(f"round {i} ({moment})", streams=True)

    async def wait_moment(self, moment: str, victims: list[str], offset: int) -> bool:
        if moment.startswith("delay:"):
            await asyncio.sleep(float(moment.split(":")[1]))
            return True
        needle = {"dropped": "are gone", "scrubbing": "tipstream.scrub: scrubbed SIGNALS", "finished": "forgot user",
                  "deleting": "are gone"}[moment]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if needle in self.svc.log_since(offset):
                if moment == "deleting":  # well into the erase of their messages
                    await asyncio.sleep(2.0)
                return True
            await asyncio.sleep(0.01)
        return False

    async def stall_round(self) -> None:
        victims = sorted(self.load.active)[:2]
        self.load.active.update(self.new_users(2))
        await self.load.retire(victims)
        offset = self.svc.log_size()
        await self.forget(victims[0], via_cli=False)
        await self.forget(victims[1], via_cli=True)
        self.forgotten.extend(victims)
        reached = await self.wait_moment("dropped", victims, offset)
        pid = self.svc.nats_pid()
        os.kill(pid, signal.SIGSTOP)
        say("nats-server", pid, "stopped for", self.args.stall_s, "s; reached", reached)
        try:
            await asyncio.sleep(self.args.stall_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        done_s = await self.wait_done(victims)
        say("stall round: done", round(done_s, 1), "s after SIGCONT; service alive:", self.svc.proc.poll() is None)
        await self.verify("stall", streams=True)

    async def after(self) -> None:
        """Events of a forgotten user published after the erasure: a new user's."""
        back = self.forgotten[0]
        before = self.load.events.get(back, 0)
        self.load.active.add(back)
        t = time.monotonic()
        while time.monotonic() - t < 5:
            await asyncio.sleep(0.2)
        await self.load.retire([back])
        self.events_after = self.load.events.get(back, 0) - before
        await asyncio.sleep(8)
        async with httpx.AsyncClient(base_url=self.svc.url, timeout=30) as http:
            r = await http.get(f"/users/{back}/features")
            s = await http.get(f"/admin/users/{back}/forget", headers=AUTH)
        say("came back:", back, r.status_code, r.text[:400], "| status", s.json().get("status"))
        self.came_back = back

    async def export_check(self) -> None:
        for u in self.forgotten[:4] + [self.kept[0]]:
            out = self.svc.data_dir / f"export-{u}.json"
            proc = await asyncio.create_subprocess_exec(
                PY, "-m", "app.cli", "users", "export", u, "--out", str(out), cwd=REPO, env=self.svc.env(),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            text, _ = await proc.communicate()
            if proc.returncode != 0:
                self.problems.append(f"export {u}: {proc.returncode} {text.decode()[-500:]}")
                continue
            data = json.loads(out.read_text())
            held = {k: (len(v) if isinstance(v, list | dict) else v) for k, v in data.items()
                    if k not in ("user_id", "exported_at")}
            streams = {k: len(v) for k, v in (data.get("streams") or {}).items()}
            if u == self.came_back and streams.get("SIGNALS") != self.events_after:
                self.problems.append(f"export {u}: {streams.get('SIGNALS')} events in SIGNALS, where "
                                     f"{self.events_after} were published after the request")
            elif u in self.forgotten and u != self.came_back and (
                    any(streams.values()) or held.get("tip_scores") or held.get("model_weights")
                    or held.get("user_state") or held.get("user_features")):
                self.problems.append(f"export {u}: holds {streams} {held}")
            say("export", u, "streams", streams, "rest", {k: v for k, v in held.items() if k != "streams"})

    async def rebuild(self) -> None:
        await self.load.stop()
        rc = self.svc.term()
        say("stopped for the rebuild, exit", rc)
        proc = subprocess.run([PY, "-m", "app.cli", "migrate", "base"], cwd=REPO, env=self.svc.env(),
                              capture_output=True, text=True, timeout=300)
        say("migrate base:", proc.returncode, (proc.stdout + proc.stderr)[-600:])
        started = time.monotonic()
        self.svc.start()
        await self.svc.ready(600)
        say("rebuilt and ready in", round(time.monotonic() - started, 1), "s")
        ref = await self.kept_rows()
        users = [u for u in self.forgotten if u != self.came_back]
        hits = sql_hits(self.db_url_for_sql(), users)
        if hits:
            self.problems.append(f"rebuild: SQL holds {hits}")
        back = sql_hits(self.db_url_for_sql(), [self.came_back])
        same = {k: ref[k] == self.reference[k] for k in ref}
        say("rebuild: forgotten users in SQL:", hits, "| came-back user in", back, "| kept users same as reference:", same)
        if not all(same.values()):
            self.problems.append(f"rebuild: the kept users' rows differ from the reference: {same}")
            for k in ref:
                if ref[k] != self.reference[k]:
                    say("  differs", k, "ref", str(self.reference[k])[:600], "\n  now", str(ref[k])[:600])

    async def main(self) -> dict:
        self.svc.start()
        await self.svc.ready()
        await self.setup()
        moments = ["delay:0", "dropped", "deleting", "finished", "delay:0.05", "scrubbing", "delay:0.5",
                   "deleting", "delay:2", "finished", "dropped", "delay:5", "deleting", "delay:1"]
        try:
            for i in range(self.args.rounds):
                await self.kill_round(i, moments[i % len(moments)])
                if i == self.args.rounds // 2:
                    await self.stall_round()
            await self.after()
            await self.export_check()
            await self.rebuild()
        finally:
            await self.load.stop()
            if self.svc.proc.poll() is None:
                self.svc.term()
            if self.tmp is not None:
                self.tmp.cleanup()
        say("problems:", json.dumps(self.problems, indent=1))
        phases: dict[str, int] = {}
        for kill in self.kills:
            phases[kill["phase_in_log"]] = phases.get(kill["phase_in_log"], 0) + 1
        return {"bench": "forget_soak", "database": "postgresql" if self.args.database_url else "sqlite",
                "kills": len(self.kills), "killed_in": phases, "forgotten": len(self.forgotten),
                "problems": len(self.problems), "requests": self.load.sent, "requests_failed": self.load.failed,
                "requests_failed_by": self.load.failures,
                "reactions": self.load.reactions,
                "done_after_restart_s_max": max((k["done_after_restart_s"] for k in self.kills), default=0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", help="kept after the run (default: a temporary one)")
    parser.add_argument("--port", type=int, help="the service's (default: a free one)")
    parser.add_argument("--database-url", help="PostgreSQL: an empty database of yours (default: SQLite)")
    parser.add_argument("--rounds", type=int, default=13, help="kills, each after a request to forget two users")
    parser.add_argument("--rps", type=float, default=30, help="the load's requests a second (events, /score, reactions)")
    parser.add_argument("--warm-s", type=float, default=150, help="the load before the first round")
    parser.add_argument("--stall-s", type=float, default=20, help="how long the nats-server is stopped in its round")
    add_settings_option(parser)
    args = parser.parse_args()
    args.settings = settings_given(parser, args.set)
    figures = asyncio.run(Soak(args).main())
    print(json.dumps(figures))
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""What one /score costs the interpreter, in-process: no sockets, no NATS, no other process.

    python bench/score_cost.py                          # 10 candidates, 3,000 requests, best of 3
    python bench/score_cost.py --candidates 50 --requests 500 --repeat 1

The service's own figure (`bench/score.py`) moves by 2x on a shared machine. This one runs the
real Starlette app and the real scorer (the decision log stubbed: it only queues) and times
`POST /score` beside `GET /healthz`, so a change to the hot path can be seen in isolation. For
a figure that noise cannot move, count instructions (valgrind is on every machine here), with
string hashing fixed, as it changes dict layouts and so the count from run to run:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/score_cost.py --requests 300 --repeat 1 --no-baseline
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/score_cost.py --requests 0 --repeat 1 --no-baseline

The difference of the two "Collected" totals, divided by 300, is the instructions per request
(add `--path /healthz` to both for the no-op's). It moves by a few percent between runs of the
same code (631k and 661k for one commit, 2026-11-27): set-up work differs from run to run, so
more requests in the first run (1,300 against 300, divided by 1,000) halve that; a change of a
few thousand instructions is better counted in a script that runs only the changed code.

Steps:
1. Fold `--users` users with 2 days of simulated history into an online store; register the
   first champion in a temporary SQLite registry, as a first start does.
2. Build the Starlette app over them, and warm the profile cache with one pass of the requests
   (every request carries the same `context.now`, so every run does the same work).
3. Call the app `--requests` times, `--repeat` passes, and the same for `GET /healthz` (the
   baseline); report the best pass of each.
Last line: {"bench": "score_cost", "path": ..., "candidates": ..., "us_per_request": ..., "healthz_us": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from score import score_requests

from app import migrate
from app.api import create_app
from app.db import make_engine
from app.decisions import TipScoresLog
from app.lineup import Lineup
from app.registry_store import RegistryStore
from app.scoring import Scorer
from app.settings import Settings
from models.policy import make_policy
from streams.events import parse_event
from streams.simulator import Population
from streams.store import OnlineStore

NOW_MS = 1_795_694_400_000  # 2026-11-26T12:00Z, as NOW
NOW = "2026-11-26T12:00:00+00:00"


class _QueuedOnly:
    def offer(self, *_: Any) -> bool:
        return True


class _Unjoined:
    def served(self, *_: Any) -> None:
        pass


def build_app(users: int, data_dir: Path) -> Any:
    url = f"sqlite:///{data_dir / 'registry.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    lineup = Lineup(RegistryStore(engine), engine, eval_max_rewards=10)
    lineup.load("logreg", learning_rate=0.1)
    store = OnlineStore()
    for _, event in Population(users=users, seed=42).history(days=2, start_ms=NOW_MS - 2 * 86_400_000):
        store.apply(parse_event(orjson.dumps(event)))
    settings = Settings()
    scorer = Scorer(store, lineup, make_policy(settings.policy, **settings.policy_params()), random.Random(0),
                    feature_cache_users=settings.feature_cache_users)
    service = types.SimpleNamespace(settings=settings, scorer=scorer, publisher=_QueuedOnly(), learner=_Unjoined(),
                                    decision_log=TipScoresLog())
    return create_app(settings, service=service)  # type: ignore[arg-type]


async def call(app: Any, method: str, path: str, body: bytes = b"") -> int:
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 50000), "app": app, "state": {},
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def best_pass(app: Any, method: str, path: str, bodies: list[bytes], requests: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for i in range(requests):
            status = await call(app, method, path, bodies[i % len(bodies)])
            if status != 200:
                raise RuntimeError(f"{method} {path} answered {status}")
        best = min(best, (time.perf_counter() - started) / max(requests, 1) * 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=10, help="candidates per request (default 10)")
    parser.add_argument("--requests", type=int, default=3_000, help="requests per pass (default 3000)")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best is reported (default 3)")
    parser.add_argument("--users", type=int, default=60, help="users with history (default 60)")
    parser.add_argument("--path", choices=("/score", "/healthz"), default="/score", help="what to time (default /score)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time GET /healthz (default on; off when counting instructions)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tipstream-bench-") as data_dir:
        app = build_app(args.users, Path(data_dir))
        bodies = [orjson.dumps({**orjson.loads(raw.split(b"\r\n\r\n", 1)[1]), "context": {"now": NOW}})
                  for raw in score_requests(150, args.users, args.candidates, 2)]

        async def run() -> tuple[float, float | None]:
            for body in bodies:  # the profile cache, warm
                await call(app, "POST", "/score", body)
            method = "POST" if args.path == "/score" else "GET"
            measured = await best_pass(app, method, args.path, bodies if method == "POST" else [b""],
                                       args.requests, args.repeat)
            healthz = await best_pass(app, "GET", "/healthz", [b""], args.requests, args.repeat) \
                if args.baseline else None
            return measured, healthz

        us, healthz_us = asyncio.run(run())
    baseline = f"; GET /healthz {healthz_us:.1f} us" if healthz_us is not None else ""
    print(f"{args.path} ({args.candidates} candidates): {us:.1f} us per request{baseline}")
    print(json.dumps({"bench": "score_cost", "path": args.path, "candidates": args.candidates,
                      "us_per_request": round(us, 1),
                      "healthz_us": round(healthz_us, 1) if healthz_us is not None else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

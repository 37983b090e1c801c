"""`tipstream run --demo RATE`: a synthetic app and its users, closing the learning loop.

The demo publishes RATE events a second into the service's own NATS, from 50 users with
time zones and daily rhythms (`streams.simulator`). Nine in ten are signals (tasks, app
opens); the tenth is a tip, shown the way an app would show it. Steps for each tip:
1. Ask `POST /score`, over HTTP on the service's own port, to rank 10 of the 20 tips.
2. Publish `tip.shown` for the tip ranked first, naming the decision.
3. The user reacts by a hidden taste (two liked categories): publish `tip.reacted`
   with the decision id, which the learner joins with the decision and learns from.
4. Tally the reward beside what a random pick among the same candidates would earn.
Every `REPORT_EVERY_S` the log says how the two compare, so the learning shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import nats.errors
from starlette.applications import Starlette

from app.http_server import HTTP_KEEP_ALIVE_S
from app.settings import Settings
from streams.events import subject_for
from streams.jetstream import publish_events
from streams.log_throttle import LogThrottle, since_last_line
from streams.simulator import APP_MIX, Population, expected_reward, score_body

log = logging.getLogger("tipstream.demo")
_TICK_FAILED = LogThrottle()  # ten ticks a second fail while NATS is away: once a minute per kind of failure
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the service's own log

# Few enough that each meets a tip every few seconds at `--demo 200`, so the learning shows in the first
# report: the served tips earned 0.41-0.49 against a random pick's 0.39 at 30 s, 0.55-0.61 at 60 s. With 200
# users each had reacted ~3 times by then, and the first report showed none (0.39 against 0.38).
USERS = 50
USERS_SEED = 1
CANDIDATES = 10
TIP_SHARE = 0.1  # of the demo's events: a tip shown and the reaction to it
REPORT_EVERY_S = 30.0
TICKS_PER_S = 10
# Idle connections are let go well before the service closes them: reusing one it is closing
# failed a whole tick now and then (httpx's default expiry equals uvicorn's keep-alive).
DEMO_HTTP_LIMITS = httpx.Limits(keepalive_expiry=HTTP_KEEP_ALIVE_S / 2)


class Tally:
    """Rewards earned by served tips, beside a random pick's, over the last `window` tips.

    >>> tally = Tally(window=2)
    >>> for earned, random_pick in ((1.0, 0.5), (0.0, 0.5), (1.0, 0.3)):
    ...     tally.add(earned, random_pick)
    >>> tally.summary()
    '3 tips shown; the last 2 earned 0.50 a tip, a random pick among the same candidates 0.40'
    """

    def __init__(self, window: int = 500) -> None:
        self.total = 0
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, earned: float, random_pick: float) -> None:
        self.total += 1
        self.recent.append((earned, random_pick))

    def summary(self) -> str:
        if not self.recent:
            return "no tips shown yet"
        served = sum(earned for earned, _ in self.recent) / len(self.recent)
        baseline = sum(random_pick for _, random_pick in self.recent) / len(self.recent)
        return (f"{self.total} tips shown; the last {len(self.recent)} earned {served:.2f} a tip, "
                f"a random pick among the same candidates {baseline:.2f}")


class DemoApp:
    """The synthetic app: its users' signals, and tips picked by `/score` (steps in the module docstring)."""

    def __init__(self, js: Any, http: httpx.AsyncClient, rewards: dict[str, float], seed: int) -> None:
        self.js, self.http, self.rewards = js, http, rewards
        # The users' tastes come from a fixed seed, so a restart on the same data keeps them;
        # what they do, and their events' ids, from `seed`.
        self.population = Population(users=USERS, seed=USERS_SEED, user_prefix="demo", mix=APP_MIX, traffic_seed=seed)
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.refused = 0  # /score answers other than 200: logged now and then, never fatal

    async def tick(self, events: int) -> None:
        now_ms = int(time.time() * 1000)
        tips = sum(self.rng.random() < TIP_SHARE for _ in range(events))
        signals = [self.population.live(now_ms) for _ in range(events - tips)]
        shown = await asyncio.gather(*(self.show_tip() for _ in range(tips)))
        # Not published again: the next tick's events stand in for these, and the demo goes on (/score
        # too) while NATS is away or refuses, as the service does.
        await publish_events(self.js, signals + [event for pair in shown for event in pair], again=False)

    async def show_tip(self) -> list[tuple[str, dict[str, Any]]]:
        population = self.population
        user = self.rng.choice(population.users)
        at = datetime.now(UTC)
        tips = self.rng.sample(population.tips, CANDIDATES)
        response = await self.http.post("/score", json=score_body(user, at, tips))
        if response.status_code != 200:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("demo: /score answered %d (%s); %d so far", response.status_code,
                            response.text[:200], self.refused)
            return []
        answer = response.json()
        reaction = population.react(user, answer, at, f"demo-fb-{answer['decision_id']}")
        top = reaction["data"]["tip_id"]
        shown = {"id": f"demo-shown-{answer['decision_id']}", "type": "tip.shown", "user_id": user.user_id,
                 "ts": reaction["ts"], "v": 1, "data": {"tip_id": top, "decision_id": answer["decision_id"]}}
        self.tally.add(self.rewards[reaction["data"]["reaction"]], expected_reward(user, tips, self.rewards))
        return [(subject_for("tip.shown"), shown), (subject_for("tip.reacted"), reaction)]


async def _wait_for_http(http: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
    """uvicorn listens only once the lifespan's start-up is over, which is where the demo starts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def _self_url(settings: Settings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{port}"


def _tell_tick_failure(error: Exception) -> None:
    if (left_out := _TICK_FAILED.allow(type(error))) is not None:
        log.warning("demo: a tick failed (%r); going on%s", error, since_last_line(left_out, "failed tick", "failed ticks"))


async def _run_demo(app: Starlette, rate: float, stopping: Callable[[], bool], port: int) -> None:
    service = app.state.service
    settings: Settings = service.settings
    js = service.nc.jetstream(publish_async_max_pending=4_000)
    async with httpx.AsyncClient(base_url=_self_url(settings, port), timeout=10.0, limits=DEMO_HTTP_LIMITS) as http:
        await _wait_for_http(http)
        demo = DemoApp(js, http, settings.rewards, seed=int(time.time()))
        per_tick = max(1, round(rate / TICKS_PER_S))
        next_report = time.monotonic() + REPORT_EVERY_S
        while True:
            started = time.monotonic()
            try:
                await demo.tick(per_tick)
            except (httpx.TransportError, OSError, nats.errors.Error) as error:  # OSError: TimeoutError too
                # uvicorn closes its socket and its connections at SIGTERM, before the lifespan
                # stops the demo: a request then fails because the service is stopping, not the
                # demo (counting failures in a row instead still warned when a stop under load
                # took two ticks). NATS away or refusing (a server restarting, an account full)
                # stopped the demo for good, for what the service itself rides out.
                if stopping():
                    return
                _tell_tick_failure(error)
            if started >= next_report:
                log.info("demo: %s; the learner has credited %d rewards", demo.tally.summary(),
                         service.learner.credited)
                next_report = started + REPORT_EVERY_S
            await asyncio.sleep(max(0.0, per_tick / rate - (time.monotonic() - started)))


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("demo traffic stopped; the service goes on without it", exc_info=task.exception())


def attach_demo(app: Starlette, rate: float, port: int, stopping: Callable[[], bool] = lambda: False) -> None:
    """Wrap the app's lifespan so the demo starts after the service and stops before it.

    `stopping` says the server has begun to stop (uvicorn's `should_exit`): from then on a
    failed request is the stop, not a failure of the demo's. `port`: the one the server listens
    on (with `TIPSTREAM_PORT=0`, the one the system picked)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[None]:
        async with inner(application):
            task = asyncio.create_task(_run_demo(app, rate, stopping, port), name="demo traffic")
            task.add_done_callback(_report_end)
            log.info("demo traffic: %.0f events/s from %d synthetic users; one in %d is a tip picked by /score",
                     rate, USERS, round(1 / TIP_SHARE))
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan

"""`tipstream run --demo RATE`: synthetic traffic published into the service's own NATS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from streams.jetstream import publish_events
from streams.simulator import Population

log = logging.getLogger("tipstream.demo")


async def _publish_forever(app: Starlette, rate: float) -> None:
    service = app.state.service
    js = service.nc.jetstream(publish_async_max_pending=4_000)
    population = Population(users=200, seed=int(time.time()))
    per_tick = max(1, int(rate / 10))
    while True:
        now = int(time.time() * 1000)
        await publish_events(js, [population.live(now) for _ in range(per_tick)])
        await asyncio.sleep(per_tick / rate)


def attach_demo(app: Starlette, rate: float) -> None:
    """Wrap the app's lifespan so the demo publisher starts after the service and stops before it."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[None]:
        async with inner(application):
            task = asyncio.create_task(_publish_forever(app, rate), name="demo traffic")
            log.info("demo traffic: %.0f events/s from 200 synthetic users", rate)
            try:
                yield
            finally:
                task.cancel()

    app.router.lifespan_context = lifespan

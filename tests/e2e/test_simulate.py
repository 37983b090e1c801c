"""`tipstream simulate` publishes valid, varied traffic through JetStream, paced and bounded."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streams.events import Rejection, parse_event
from streams.jetstream import ensure_streams
from tests.conftest import NatsServer, account_url, eventually, limited_account_server
from tests.e2e.support import PATCHED_RUN

TIPSTREAM = str(Path(sys.executable).parent / "tipstream")
# `tipstream` waiting 1 s for JetStream's acknowledgements, not 5, where a test waits out that bound.
QUICK_ACKS = [sys.executable, "-c", PATCHED_RUN.format(patches={"streams.jetstream.PUBLISH_ACK_WAIT_S": 1.0})]


async def test_simulate_publishes_a_bounded_count_of_valid_events(nats_server, nc) -> None:
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    done = subprocess.run([TIPSTREAM, "simulate", "--count", "600", "--rate", "0", "--users", "50",
                           "--nats-url", nats_server.url, "--quiet", "--user-prefix", "load"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "published 600 events" in done.stdout
    total = sum([(await js.stream_info(name)).state.messages for name in ("SIGNALS", "FEEDBACK")])
    assert total == 600
    kinds: Counter[str] = Counter()
    users: set[str] = set()
    for stream, subject in (("SIGNALS", "signals.>"), ("FEEDBACK", "feedback.>")):
        sub = await js.pull_subscribe(subject, stream=stream)
        count = (await js.stream_info(stream)).state.messages
        while count:
            for msg in await sub.fetch(min(count, 200), timeout=5):
                event = parse_event(msg.data)
                assert not isinstance(event, Rejection), event
                assert msg.subject.endswith(event.type) and msg.headers["Nats-Msg-Id"] == event.id
                kinds[event.type] += 1
                users.add(event.user_id)
                count -= 1
    assert len(kinds) == 7, kinds
    # Simulated users are named apart from real ones (`u-1` was both).
    assert users and all(u.startswith("load-") and u[5:].isdigit() and int(u[5:]) < 50 for u in users), users


async def test_simulate_paces_to_the_rate(nats_server, nc) -> None:
    await ensure_streams(nc.jetstream(), max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    started = time.monotonic()
    done = subprocess.run([TIPSTREAM, "simulate", "--count", "300", "--rate", "200", "--nats-url", nats_server.url,
                           "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 300 / 200 * 0.8  # paced, not a burst


def test_simulate_without_streams_fails_loudly_and_says_why(nats_server) -> None:
    done = subprocess.run([TIPSTREAM, "simulate", "--count", "10", "--nats-url", nats_server.url, "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no stream" in done.stderr.lower() and "tipstream run" in done.stderr and "Traceback" not in done.stderr


def test_simulate_against_a_server_without_jetstream_says_so_first(tmp_path: Path) -> None:
    """It said "no stream" and to start `tipstream run`, which then said JetStream was off: two steps to the fix."""
    server = NatsServer(tmp_path / "nats", jetstream_flags=False)  # a nats-server started without -js
    server.start()
    try:
        done = subprocess.run([TIPSTREAM, "simulate", "--count", "10", "--nats-url", server.url, "--quiet"],
                              capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    said = done.stderr.strip()
    assert said.startswith(f"JetStream is not enabled on the NATS server at {server.url}"), said
    assert "`nats-server -js`" in said and "`jetstream {}`" in said, said


def test_simulate_as_an_account_without_jetstream_says_so_first(tmp_path: Path) -> None:
    server = limited_account_server(tmp_path / "nats", None)  # JetStream on the server, not for the account
    server.start()
    try:
        done = subprocess.run([TIPSTREAM, "simulate", "--count", "10", "--nats-url", account_url(server), "--quiet"],
                              capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    said = done.stderr.strip()
    assert said.startswith("JetStream is not enabled for this connection's account on the NATS server at "
                           f"nats://t:***@127.0.0.1:{server.port}"), said
    assert "`jetstream: enabled`" in said, said


def test_simulate_without_a_bound_says_what_to_add() -> None:
    done = subprocess.run([TIPSTREAM, "simulate"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--count" in done.stderr


async def test_pregenerated_load_publishes_exactly_the_count(nats_server, nc) -> None:
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    done = subprocess.run([TIPSTREAM, "simulate", "--count", "250", "--rate", "0", "--pregenerate",
                           "--nats-url", nats_server.url, "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sum([(await js.stream_info(n)).state.messages for n in ("SIGNALS", "FEEDBACK")]) == 250


# The command run with SIGINT's default action, as a terminal's Ctrl-C finds it. A suite started in the
# background by a non-interactive shell (`./.ci/run &`) ignores SIGINT, and a child inherits that: Python
# then installs no handler for it, and the run went on for its 60 s.
_DEFAULT_SIGINT_THEN = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
CTRL_C_AS_AT_A_TERMINAL = (sys.executable, "-c", _DEFAULT_SIGINT_THEN)


async def _the_readme_s_run_publishing(nats_server: Any, nc: Any) -> subprocess.Popen[str]:
    """The README's 60 s `tipstream simulate`, once its first events are in SIGNALS."""
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    run = subprocess.Popen([*CTRL_C_AS_AT_A_TERMINAL, TIPSTREAM, "simulate", "--duration", "60", "--rate", "100",
                            "--nats-url", nats_server.url, "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    async def publishing() -> bool:
        return (await js.stream_info("SIGNALS")).state.messages > 0

    try:
        await eventually(publishing, timeout=30)
    except BaseException:
        run.kill()
        raise
    return run


async def test_ctrl_c_stops_simulate_with_its_count_not_a_traceback(nats_server, nc) -> None:
    """The README's run is 60 s long: stopped early with Ctrl-C, it ended in a KeyboardInterrupt traceback."""
    run = await _the_readme_s_run_publishing(nats_server, nc)
    try:
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 130 and "Traceback" not in err, err
    assert out.startswith("interrupted: published ") and " events in " in out, out


async def test_simulate_ends_saying_so_when_its_nats_server_stops(nats_server, nc) -> None:
    """The service stopped during the README's 60 s run (its embedded server with it): nats-py never
    settles the acknowledgements it still waited for, and simulate waited for them for good."""
    run = await _the_readme_s_run_publishing(nats_server, nc)
    try:
        nats_server.stop()
        _, err = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 1 and "Traceback" not in err, err
    assert nats_server.url in err and "--nats-url" in err and " events " in err, err


async def test_simulate_whose_streams_go_mid_run_says_how_many_it_stored_not_to_start_tipstream_run(
    nats_server, nc
) -> None:
    """The service killed under a fast run (`tipstream simulate --rate 2500`, `kill -9` of `tipstream run`): its
    embedded nats-server, told to stop, drops JetStream before it closes its connections, and the next publish met
    no stream. The run said to start `tipstream run` first, as if the streams had never been there (two kills in
    two), and not how many events were stored. A server whose streams are deleted mid-run answers alike."""
    run = await _the_readme_s_run_publishing(nats_server, nc)
    js = nc.jetstream()
    try:
        for stream in ("SIGNALS", "FEEDBACK"):
            await js.delete_stream(stream)
        _, err = await asyncio.to_thread(run.communicate, timeout=30)
    finally:
        run.kill()
    assert run.returncode == 1 and "Traceback" not in err, err
    assert " events acknowledged " in err and "any more" in err and "first" not in err, err


class _CuttableProxy:
    """TCP to a NATS server that can lose what the server sends (acknowledgements in flight), then
    drop its clients' connections, as a server killed and started again on its port does."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.muted, self.lost = target_port, False, 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_server: bool) -> None:
            try:
                while data := await source.read(65536):
                    if from_server and self.muted:
                        self.lost += len(data)
                        continue
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer, False), pipe(upstream_reader, writer, True))

    def cut(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        self.muted = False


async def test_simulate_publishes_again_what_a_dropped_connection_left_unacknowledged(nats_server, nc) -> None:
    """The service's embedded server killed and started again on its port: simulate reconnected, but
    nats-py never settles the acknowledgements lost with the old connection, and it waited for them
    for good."""
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    proxy = _CuttableProxy(nats_server.port)
    port = await proxy.start()
    # The acknowledgements lost are waited for 1 s, not 5, before they are published again.
    run = subprocess.Popen([*QUICK_ACKS, "simulate", "--count", "20000", "--rate", "0", "--users", "100",
                            "--nats-url", f"nats://127.0.0.1:{port}", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async def stored() -> int:
            return sum([(await js.stream_info(n)).state.messages for n in ("SIGNALS", "FEEDBACK")])

        await eventually(stored, timeout=30)
        proxy.muted = True
        await eventually(lambda: proxy.lost, timeout=30)
        proxy.cut()
        out, err = await asyncio.to_thread(run.communicate, timeout=60)
    finally:
        run.kill()
        proxy.server.close()
    assert run.returncode == 0 and "Traceback" not in err, err
    assert out.startswith("published 20000 events"), out
    # Published again after the reconnect, each event is stored once (JetStream's duplicate window).
    assert await stored() == 20000


def test_simulate_to_a_server_whose_certificate_is_not_trusted_says_so_at_once(tmp_path: Path) -> None:
    """nats-py waited for good for the refused TLS connection to close before its next try: simulate hung,
    saying nothing."""
    import trustme

    from tests.integration.test_nats_auth import start_tls_server

    server, _ = start_tls_server(tmp_path / "nats", trustme.CA(), required=True)
    try:
        done = subprocess.run([TIPSTREAM, "simulate", "--count", "5", "--quiet", "--nats-url",
                               f"tls://127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "TIPSTREAM_DATA_DIR": str(tmp_path / "data")})
    finally:
        server.stop()
    assert done.returncode == 1, done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr and "TIPSTREAM_NATS_TLS_CA" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cap", ["server", "account"])
async def test_simulate_to_a_full_jetstream_ends_naming_the_limits(tmp_path: Path, cap: str) -> None:
    """nats-py raises a publish's refusal into the connection's error callback instead of settling its future,
    so the refusal looked like a server away: simulate published the same events again for ever, saying only
    "JetStream acknowledged 0 of 11 events within 5 s"."""
    import nats

    from tests.integration.test_decision_faults import storage_capped_server

    server, url = storage_capped_server(tmp_path / "nats", cap)
    server.start()
    try:
        client = await nats.connect(url)
        await ensure_streams(client.jetstream(), max_age_days=1, max_bytes=-1, duplicate_window_s=60,
                             dlq_max_age_days=1)
        await client.close()
        # Refused publishes are told after the wait for their acknowledgements: 1 s here, not 5 (twice).
        done = await asyncio.to_thread(subprocess.run, [*QUICK_ACKS, "simulate", "--count", "5000", "--rate", "0",
                                                        "--nats-url", url, "--quiet"],
                                       capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert done.returncode == 1, done.stderr
    told = done.stderr.strip().splitlines()[-1]
    assert "refused the events after" in told and ("(10023)" if cap == "server" else "(10002)") in told, told
    assert "max_file_store" in told and "`max_file`" in told and "Traceback" not in done.stderr


# Acknowledgements waited for 1 s, and a run that gets none gives up after 3 s of them, not 60.
QUICK_GIVE_UP = [sys.executable, "-c", PATCHED_RUN.format(patches={"streams.jetstream.PUBLISH_ACK_WAIT_S": 1.0,
                                                                   "app.simulate.GIVE_UP_AFTER_S": 3.0})]


async def test_simulate_to_a_server_whose_disk_is_full_says_so_once_and_gives_up_naming_it(
        full_disk_nats_server) -> None:
    """nats-server with its store's disk full takes every publish and stores none: simulate published the same
    events again every 5 s for as long as it ran, saying only "JetStream acknowledged 0 of 50 events"."""
    import nats

    server = full_disk_nats_server
    client = await nats.connect(server.url)
    await ensure_streams(client.jetstream(), max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    await client.close()
    server.fill()
    done = await asyncio.to_thread(subprocess.run, [*QUICK_GIVE_UP, "simulate", "--count", "50", "--rate", "0",
                                                    "--nats-url", server.url, "--quiet"],
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, lines  # told once, then the end
    assert lines[0].startswith(f"JetStream at {server.url} acknowledged none of 50 events within 1 s, though it "
                               "answers its API: a nats-server whose store's disk is full"), lines[0]
    assert "giving up after 3 s" in lines[0] and "restart nats-server" in lines[0], lines[0]
    assert lines[1].startswith(f"JetStream at {server.url} acknowledged none of the events for "), lines[1]
    assert "no space left on device" in lines[1] and "free space on the disk of its store" in lines[1], lines[1]
    assert lines[1].endswith("Gave up after 0 events acknowledged (the last 50 may be in JetStream too); run "
                             "simulate again once it stores them."), lines[1]
    assert b"no space left on device" in (server.store / "server.log").read_bytes()  # the disk full, truly


async def test_simulate_goes_on_once_the_full_disk_s_server_is_restarted_with_room(full_disk_nats_server) -> None:
    """What the warning says to do: space freed and nats-server restarted, the run stores its events, and says
    that JetStream acknowledges them again."""
    import nats

    server = full_disk_nats_server
    client = await nats.connect(server.url)
    await ensure_streams(client.jetstream(), max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    await client.close()
    server.fill()
    run = subprocess.Popen([*QUICK_ACKS, "simulate", "--count", "50", "--rate", "0", "--nats-url", server.url,
                            "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stderr is not None
        first = await asyncio.to_thread(run.stderr.readline)
        server.free()
        server.stop()
        server.start()
        out, err = await asyncio.to_thread(run.communicate, timeout=60)
    finally:
        run.kill()
    assert "acknowledged none of 50 events" in first and "store's disk is full" in first, first
    assert run.returncode == 0 and out.startswith("published 50 events"), (out, err)
    told = err.strip().splitlines()
    assert len(told) == 1, told
    assert told[0].startswith("JetStream acknowledges the events again, after "), told
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        assert sum([(await js.stream_info(n)).state.messages for n in ("SIGNALS", "FEEDBACK")]) == 50
    finally:
        await client.close()

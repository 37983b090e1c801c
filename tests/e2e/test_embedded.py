"""`tipstream run` with NATS_URL unset: its own nats-server, reused on the next start, stopped on exit."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import nats
import orjson
import pytest

from tests.conftest import eventually
from tests.e2e.support import HTTP, ServiceProcess, wait_until

pytestmark = pytest.mark.slow


def opened(i: int) -> dict:
    return {"id": f"open-{i}", "type": "app.opened", "user_id": "u-7", "ts": f"2026-11-26T08:{i // 60:02d}:{i % 60:02d}+01:00"}


def embedded_pid(data_dir: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"nats-server") and str(data_dir).encode() in b" ".join(cmdline):
                return int(entry.name)
    return None


async def publish(url: str, items: list[dict]) -> None:
    client = await nats.connect(url)
    js = client.jetstream()
    for item in items:
        await js.publish(f"signals.{item['type']}", orjson.dumps(item), headers={"Nats-Msg-Id": item["id"]})
    await client.close()


async def test_embedded_server_comes_up_and_a_second_start_reuses_its_streams(tmp_path: Path) -> None:
    data = tmp_path / "data"
    service = ServiceProcess(data).start()
    url = (data / "nats.url").read_text()
    await publish(url, [opened(i) for i in range(100)])
    wait_until(lambda: service.metric("tipstream_stream_position", stream="SIGNALS") == 100, what="100 applied")
    pid = embedded_pid(data)
    assert pid is not None
    assert service.stop(), service.log()
    assert embedded_pid(data) is None, "the embedded nats-server must stop with tipstream"

    service = ServiceProcess(data).start()
    url = (data / "nats.url").read_text()
    wait_until(lambda: service.get("/readyz").status_code == 200, what="ready")
    # Resumed from its checkpoint: nothing re-applied, nothing lost.
    assert service.metric("tipstream_stream_position", stream="SIGNALS") == 100
    assert service.metric("tipstream_events_applied_total", stream="SIGNALS") == 0
    await publish(url, [opened(i) for i in range(100, 150)])
    wait_until(lambda: service.metric("tipstream_stream_position", stream="SIGNALS") == 150, what="150 applied")
    body = service.get("/users/u-7/features", at="2026-11-26T09:00:00+01:00").json()
    assert body["known"] and body["features"]["app_opens_7d"]["value"] == 150
    assert service.stop()


async def test_a_lost_embedded_store_is_named_in_the_error_not_nats_url(tmp_path: Path) -> None:
    """The error for a stream that is not the checkpoint's told to check NATS_URL, which an embedded
    server's user never set: it names the store that was lost instead."""
    data = tmp_path / "data"
    service = ServiceProcess(data).start()
    await publish((data / "nats.url").read_text(), [opened(i) for i in range(20)])
    wait_until(lambda: service.metric("tipstream_stream_position", stream="SIGNALS") == 20, what="20 applied")
    assert service.stop(), service.log()
    shutil.rmtree(data / "nats")

    service = ServiceProcess(data).start()
    wait_until(lambda: service.get("/readyz").status_code == 200, what="ready")
    assert service.stop()
    [line] = [line for line in service.log().splitlines() if "ERROR" in line and "SIGNALS" in line]
    assert f"the embedded server's store ({data / 'nats'}) lost" in line and "NATS_URL" not in line, line


async def test_a_killed_service_takes_its_nats_server_with_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    service = ServiceProcess(data).start()
    pid = embedded_pid(data)
    assert pid is not None
    service.kill()
    wait_until(lambda: embedded_pid(data) is None, timeout=10, what="the orphaned nats-server to exit")
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text(), "gone, or dead and waiting to be reaped"


async def test_an_embedded_nats_server_that_dies_is_started_again_at_the_same_url(tmp_path: Path) -> None:
    # The default runtime's log: were it to stay down, /healthz would still say 200, apps could
    # publish nothing, and decisions would pile up in memory until /score answered 503.
    data = tmp_path / "data"
    service = ServiceProcess(data).start()
    try:
        url = (data / "nats.url").read_text()
        await publish(url, [opened(i) for i in range(10)])
        wait_until(lambda: service.metric("tipstream_stream_position", stream="SIGNALS") == 10, what="10 applied")
        first = embedded_pid(data)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: embedded_pid(data) not in (None, first), timeout=15, what="a new embedded nats-server")
        wait_until(lambda: service.get("/readyz").status_code == 200, timeout=15, what="ready again")
        assert (data / "nats.url").read_text() == url, "publishers keep the URL they were given"
        await publish(url, [opened(i) for i in range(10, 20)])
        wait_until(lambda: service.metric("tipstream_stream_position", stream="SIGNALS") == 20, what="20 applied")
        body = service.get("/users/u-7/features", at="2026-11-26T09:00:00+01:00").json()
        assert body["features"]["app_opens_7d"]["value"] == 20
    finally:
        assert service.stop(), service.log()
    assert embedded_pid(data) is None


def test_a_restart_that_fails_is_tried_again_after_a_wait_not_at_every_check(tmp_path: Path) -> None:
    """The port taken meanwhile: each check (every 0.5 s) started a server and logged twice, and the message said
    only to see the server's log."""
    import socket
    import time

    from app.embedded_nats import RESTART_FIRST_WAIT_S, EmbeddedNats, EmbeddedNatsError

    embedded = EmbeddedNats(tmp_path / "nats")
    embedded.start()
    try:
        embedded.process.kill()
        embedded.process.wait(10)
        with socket.create_server(("127.0.0.1", embedded.port)) as squatter:
            with pytest.raises(EmbeddedNatsError) as refused:
                embedded.restart_if_exited()
            # Not only "see its log": the server's words, and what to do.
            assert "address already in use" in str(refused.value), refused.value
            assert f"another process has taken its port {embedded.port}" in str(refused.value)
            failed = embedded.process
            assert embedded.restart_if_exited() is False and embedded.process is failed  # nothing started
            squatter.close()
            embedded._restart_at = time.monotonic()  # the wait is over
            assert embedded.restart_if_exited() is True and embedded.process.poll() is None
        assert embedded._restart_wait_s == RESTART_FIRST_WAIT_S  # a success starts the doubling over
    finally:
        embedded.stop()


def test_a_restart_failing_while_its_port_stays_taken_is_told_once_a_minute_not_at_every_try(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """'exited ... starting it again' came at every try, 30 s apart at the wait's most, for as long as the port
    stayed taken, and nothing said when a try went through."""
    import logging
    import socket

    from app.embedded_nats import EmbeddedNats, EmbeddedNatsError

    now = [0.0]
    embedded = EmbeddedNats(tmp_path / "nats", clock=lambda: now[0])
    embedded.start()
    caplog.set_level(logging.INFO, logger="tipstream.nats")
    try:
        embedded.process.kill()
        embedded.process.wait(10)
        with socket.create_server(("127.0.0.1", embedded.port)):
            for _ in range(7):  # at 0, 1, 3, 7, 15, 31 and 61 s
                with pytest.raises(EmbeddedNatsError):
                    embedded.restart_if_exited()
                now[0] = embedded._restart_at
        assert embedded.restart_if_exited() is True and embedded.process.poll() is None
    finally:
        embedded.stop()
    told = [r.getMessage() for r in caplog.records if "starting it again" in r.getMessage()]
    assert len(told) == 3, told  # the kill's exit code, the first failed try's (another code), and a minute after
    assert "(4 more tries since the last line)" in told[2] and "since the last line" not in told[1], told
    assert "the embedded nats-server started again, after 7 tries that failed" in caplog.messages


async def test_a_restart_after_a_kill_is_given_time_to_read_its_store_by_its_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-server reads its whole store before it listens: a fixed 15 s killed a large store's server in the middle
    of that, at every restart, for good. Here the fixed part is nothing, so only the store's size earns the time."""
    from app import embedded_nats
    from app.embedded_nats import EmbeddedNats, EmbeddedNatsError

    embedded = EmbeddedNats(tmp_path / "nats")
    embedded.start()
    try:
        client = await nats.connect(embedded.url)
        js = client.jetstream()
        await js.add_stream(name="BIG", subjects=["big.>"])
        for _ in range(5):
            await asyncio.gather(*(js.publish("big.x", b"x" * 1024) for _ in range(1000)))
        await client.close()
        embedded.process.kill()  # its indexes unwritten: the restart reads every block
        embedded.process.wait(10)
        size = embedded.store_bytes()
        assert size > 5_000_000
        monkeypatch.setattr(embedded_nats, "START_TIMEOUT_S", 0.0)
        monkeypatch.setattr(embedded_nats, "START_READ_BYTES_PER_S", size / 10)  # this store earns 10 s
        with pytest.raises(EmbeddedNatsError, match=r"did not start within 0\.0s"):
            EmbeddedNats(tmp_path / "empty").start()  # the bound is applied: an empty store earns nothing
        assert embedded.restart_if_exited() is True and embedded.process.poll() is None
        client = await nats.connect(embedded.url)
        assert (await client.jetstream().stream_info("BIG")).state.messages == 5000
        await client.close()
    finally:
        embedded.stop()


async def test_a_store_whose_disk_filled_is_told_and_restarted_once_it_has_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """nats-server 2.15.1 stored nothing more after a write failed for want of space, also once space was freed
    (a service on a 40 MB tmpfs filled and freed: every publish timed out until tipstream was restarted), and
    tipstream said nothing of it. Here the disk's free space is what `free_bytes` says."""
    import logging

    from app.embedded_nats import STORE_FULL_BELOW_BYTES, STORE_ROOM_BYTES, EmbeddedNats

    caplog.set_level(logging.INFO, logger="tipstream.nats")
    embedded = EmbeddedNats(tmp_path / "nats")
    url = embedded.start()
    free = [STORE_ROOM_BYTES * 4]
    monkeypatch.setattr(embedded, "free_bytes", lambda: free[0])
    try:
        assert embedded.check_store() is False and embedded.health()["ok"] is True
        assert embedded.store_failed("DECISIONS") is None
        first = embedded.process
        free[0] = STORE_FULL_BELOW_BYTES - 1
        assert embedded.check_store() is False and embedded.process is first
        assert embedded.health()["ok"] is False
        # What it wrote meanwhile may have used up sequences: told so where a stream starts past 1 (its log, on
        # the full disk, may not say).
        assert embedded.store_failed("DECISIONS") == "the embedded nats-server's store was seen full by this service"
        told = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(told) == 1 and "Free space on that disk" in told[0] and str(tmp_path / "nats") in told[0], told
        free[0] = STORE_ROOM_BYTES - 1  # freed, but not enough yet
        assert embedded.check_store() is False and embedded.process is first
        free[0] = STORE_ROOM_BYTES
        assert embedded.check_store() is True
        assert embedded.process is not first and embedded.process.poll() is None and embedded.url == url
        assert embedded.health()["ok"] is True and embedded.check_store() is False
        assert embedded.store_failed("DECISIONS"), "forgotten at the restart"
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name="S", subjects=["s.>"])
            assert (await nc.jetstream().publish("s.x", b"{}")).seq == 1
        finally:
            await nc.close()
        # A quota full is seen by nats-server's log only: the disk has room.
        with (tmp_path / "nats" / "nats-server.log").open("ab") as log_file:
            log_file.write(b"[1] 2026/12/06 00:52:12 [ERR] JetStream failed to store a msg on stream '$G > S': "
                           b"write /x/1.blk: disk quota exceeded\n")
        free[0] = STORE_ROOM_BYTES * 4
        assert embedded.check_store() is False  # told; not restarted again within a minute of the last
        assert "disk quota exceeded" in caplog.text and embedded.health()["ok"] is False
        embedded._store_restart_at = 0.0  # the minute is over
        assert embedded.check_store() is True and embedded.health()["ok"] is True
    finally:
        embedded.stop()


async def test_a_service_whose_embedded_store_s_disk_fills_goes_on_once_freed_and_names_the_sequence_used_up(
        tmp_path: Path) -> None:
    """The data directory on a real full disk (a tmpfs): the embedded nats-server gave the decision's failed write
    DECISIONS' sequence 1 and stored nothing; once space was freed, tipstream restarted it and read on from 2 saying
    of 1 'those before are gone (past its retention, or erased with a user forgotten)', as if a decision was lost."""
    from tests.conftest import FullDisk
    from tests.integration.test_score_api import body

    disk = FullDisk(tmp_path / "disk")
    data = tmp_path / "disk" / "data"  # as the service sees it; `disk.view / "data"` from here
    service: ServiceProcess | None = None
    try:  # from the disk's making on: its holder is a process that outlives the test unless closed
        service = ServiceProcess(tmp_path / "logs", launcher=disk.launcher, env={
            "TIPSTREAM_DATA_DIR": str(data), "DATABASE_URL": f"sqlite:///{tmp_path / 'tipstream.db'}"})
        service.start()
        disk.fill()
        wait_until(lambda: service.get("/readyz").json()["nats_store"]["ok"] is False, what="the full store told")
        assert HTTP.post(f"{service.base_url}/score", json=body(), timeout=10).status_code == 200
        client = await nats.connect((disk.view / "data" / "nats.url").read_text())
        try:
            async def used_up() -> bool:  # the failed write's sequence
                return (await client.jetstream().stream_info("DECISIONS")).state.last_seq == 1

            await eventually(used_up, timeout=20)
        finally:
            await client.close()
        disk.free()
        wait_until(lambda: "keeps sequences" in service.log(), what="DECISIONS read on after the restart")
        told = [line for line in service.log().splitlines() if "stream DECISIONS keeps sequences" in line]
        assert len(told) == 1 and "DECISIONS keeps sequences 2 on; those before were most likely never stored" in told[0]
        assert "and the embedded nats-server's store was seen full by this service" in told[0], told
        assert "restarting the nats-server" in service.log()
        wait_until(lambda: service.metric("tipstream_decisions_total", outcome="published") == 1, what="published")
        assert service.get("/readyz").json()["nats_store"]["ok"] is True
        assert service.stop()
    finally:
        if service is not None and service.process is not None and service.process.poll() is None:
            service.kill()
        disk.close()


def test_a_start_on_a_full_disk_names_it_and_what_to_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart on the 40 MB tmpfs left full: nats-server made its ports file and could write nothing in it,
    and `tipstream run` ended in a JSONDecodeError traceback."""
    from app.embedded_nats import STORE_FULL_BELOW_BYTES, EmbeddedNats, EmbeddedNatsError
    from app.settings import Settings
    from app.start_errors import explain

    embedded = EmbeddedNats(tmp_path / "nats")
    monkeypatch.setattr(embedded, "free_bytes", lambda: STORE_FULL_BELOW_BYTES - 1)
    with pytest.raises(EmbeddedNatsError) as refused:
        embedded.start()
    assert embedded.process is None  # no server started
    told = str(explain(refused.value, Settings(data_dir=tmp_path)))
    assert "is on a full disk" in told and f"df {tmp_path / 'nats'}" in told, told


async def test_the_embedded_server_takes_only_clients_with_its_token(tmp_path: Path) -> None:
    """With no auth, any local process could publish into the streams or delete them (a review
    deleted DLQ with a plain `js.delete_stream`); `nats.url` was readable by every user."""
    data = tmp_path / "data"
    service = ServiceProcess(data).start()
    try:
        url = (data / "nats.url").read_text()
        scheme, rest = url.split("://", 1)
        token, address = rest.split("@", 1)
        assert len(token) >= 32
        assert (data / "nats.url").stat().st_mode & 0o777 == 0o600
        # The events in a directory only its owner reads (this harness made `data` itself, for the log).
        assert (data / "nats").stat().st_mode & 0o777 == 0o700
        config = data / "nats" / "nats-server.conf"
        assert token in config.read_text() and config.stat().st_mode & 0o777 == 0o600
        pid = embedded_pid(data)
        assert pid is not None and token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()  # not in `ps`
        with pytest.raises(Exception, match="[Aa]uthorization"):
            await nats.connect(f"{scheme}://{address}", allow_reconnect=False, max_reconnect_attempts=0)
        await publish(url, [opened(i) for i in range(3)])  # with it, as publishers reading nats.url do
        wait_until(lambda: service.metric("tipstream_stream_position", stream="SIGNALS") == 3, what="3 applied")
        assert token not in service.log(), "the token stays out of the log"
    finally:
        assert service.stop(), service.log()

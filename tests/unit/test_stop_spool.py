"""`Service.stop`'s spool of the decisions JetStream has not acknowledged, with stand-ins for NATS and ingest."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

from app import bootstrap, decision_spool
from app.bootstrap import Service
from app.settings import Settings


async def test_the_last_put_back_decision_acknowledged_during_the_stop_leaves_the_spool_it_wrote(
        tmp_path: Path, monkeypatch) -> None:
    """A start put back what the last stop spooled (`put_back`, its spool removed once JetStream has all of it).
    This stop's flush times out, so it spools what is unacknowledged: that put-back decision, still in flight,
    and one served since. JetStream acknowledges the put-back one while the stop goes on (its subscription lives
    until the connection is drained): the spool must stay, else the decision served since is lost."""
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.01)
    service = Service(Settings(data_dir=tmp_path))
    spool = tmp_path / decision_spool.SPOOL_NAME
    publisher = service.publisher
    publisher.on_published = None  # the learner's join: not what is tested
    old = ("decisions.score", "d-old", b'{"id":"d-old"}')
    new = ("decisions.score", "d-new", b'{"id":"d-new"}')
    decision_spool.save(spool, [old])
    publisher.put_back([old], on_all_published=lambda: spool.unlink(missing_ok=True))
    publisher.queue.popleft()
    publisher.inflight[1] = (0.0, old)  # sent, not acknowledged yet
    assert publisher.offer(*new)

    async def ingest_stop() -> None:  # the put-back decision acknowledged while the stop goes on
        publisher._on_ack(b"_INBOX.x.d.1", b"", b'{"stream":"DECISIONS","seq":7}', None)
        assert spool.exists(), "the stop's spool was removed"

    service.ingests.append(SimpleNamespace(caught_up=True, current=True, spec=SimpleNamespace(name="SIGNALS"), stop=ingest_stop))
    service._publisher_task = asyncio.ensure_future(asyncio.sleep(3600))
    await service.stop()
    # d-old leaves it once the connection is drained: JetStream has it (the test below).
    assert [item[1] for item in decision_spool.read(spool)] == ["d-new"]


def test_a_decision_offered_once_the_stop_has_taken_the_spool_is_refused_not_lost() -> None:
    """A second Ctrl-C stops without waiting for open requests: a /score still answering queued its decision after
    the stop had written the spool, and served it, neither published nor spooled."""
    service = Service(Settings())
    publisher = service.publisher
    before = ("decisions.score", "d-before", b'{"id":"d-before"}')
    assert publisher.offer(*before)
    assert [item[1] for item in publisher.hand_over()] == ["d-before"]
    assert not publisher.offer("decisions.score", "d-late", b'{"id":"d-late"}')
    assert [item[1] for item in publisher.unpublished()] == ["d-before"]


async def test_a_decision_offered_after_the_flush_emptied_the_queue_is_spooled_not_lost(
        tmp_path: Path, monkeypatch) -> None:
    """JetStream had every decision by the flush, so the stop spooled nothing and left the queue open: a /score a
    second Ctrl-C did not wait for queued its decision while the publisher was being cancelled (or later in the
    stop, with nothing to publish it), and served it, neither published nor spooled."""
    service = Service(Settings(data_dir=tmp_path))
    publisher = service.publisher
    late = ("decisions.score", "d-late", b'{"id":"d-late"}')
    offered: list[bool] = []

    async def publishing() -> None:
        try:
            await asyncio.sleep(3600)
        finally:  # the answer that comes as the stop cancels the publisher
            offered.append(publisher.offer(*late))

    service._publisher_task = asyncio.ensure_future(publishing())
    await asyncio.sleep(0)
    await service.stop()
    later = publisher.offer("decisions.score", "d-later", b'{"id":"d-later"}')
    spooled = [item[1] for item in decision_spool.read(tmp_path / decision_spool.SPOOL_NAME)]
    assert offered == [True] and spooled == ["d-late"], (offered, spooled)
    assert not later, "queued once the stop was over: nothing publishes or spools it"


async def test_a_spooled_decision_acknowledged_later_in_the_stop_leaves_the_spool(tmp_path: Path, monkeypatch) -> None:
    """The flush timed out with decisions in flight (JetStream slow), so the stop spooled them; their
    acknowledgements came while the stop went on (the subscription lives until the connection is drained). Kept in
    the spool all the same, the next start published them again, and one that came after the duplicate window
    (TIPSTREAM_DUPLICATE_WINDOW_S, 2 minutes) was stored twice in DECISIONS."""
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.01)
    service = Service(Settings(data_dir=tmp_path))
    spool = tmp_path / decision_spool.SPOOL_NAME
    publisher = service.publisher
    publisher.on_published = None  # the learner's join: not what is tested
    stored, refused, waiting = (("decisions.score", f"d-{n}", b'{"id":"d-%d"}' % n) for n in (1, 2, 3))
    for token, item in enumerate((stored, refused), start=1):
        assert publisher.offer(*item)
        publisher.inflight[token] = (0.0, publisher.queue.popleft())  # sent, not acknowledged yet
    assert publisher.offer(*waiting)

    async def ingest_stop() -> None:  # JetStream answers while the stop goes on: one stored, one refused
        publisher._on_ack(b"_INBOX.x.d.1", b"", b'{"stream":"DECISIONS","seq":7}', None)
        publisher._on_ack(b"_INBOX.x.d.2", b"", b'{"error":{"code":503,"description":"no responders"}}', None)

    service.ingests.append(SimpleNamespace(caught_up=True, current=True, spec=SimpleNamespace(name="SIGNALS"), stop=ingest_stop))
    service._publisher_task = asyncio.ensure_future(asyncio.sleep(3600))
    await service.stop()
    assert [item[1] for item in decision_spool.read(spool)] == ["d-2", "d-3"]


async def test_a_spool_whose_decisions_were_all_acknowledged_later_in_the_stop_is_removed(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.01)
    service = Service(Settings(data_dir=tmp_path))
    publisher = service.publisher
    publisher.on_published = None
    assert publisher.offer("decisions.score", "d-1", b'{"id":"d-1"}')
    publisher.inflight[1] = (0.0, publisher.queue.popleft())

    async def ingest_stop() -> None:
        assert (tmp_path / decision_spool.SPOOL_NAME).exists(), "spooled while unacknowledged"
        publisher._on_ack(b"_INBOX.x.d.1", b"", b'{"stream":"DECISIONS","seq":7}', None)

    service.ingests.append(SimpleNamespace(caught_up=True, current=True, spec=SimpleNamespace(name="SIGNALS"), stop=ingest_stop))
    service._publisher_task = asyncio.ensure_future(asyncio.sleep(3600))
    await service.stop()
    assert not (tmp_path / decision_spool.SPOOL_NAME).exists()


async def test_the_spool_is_written_off_the_event_loop(tmp_path: Path, monkeypatch) -> None:
    """50,000 decisions of 2 KB (NATS away) are 114 MB written and synced at the stop: on the loop, /score (a second
    Ctrl-C does not wait for it) and /healthz answered nothing meanwhile. The write here waits for a coroutine of the
    loop, which runs only if the write is not on the loop (its wait's bound only ends a failing test)."""
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.01)
    service = Service(Settings(data_dir=tmp_path))
    publisher = service.publisher
    assert publisher.offer("decisions.score", "d-1", b'{"id":"d-1"}')
    writing, loop_ran = threading.Event(), threading.Event()
    write_whole, ran_during_write = decision_spool._write_whole, []

    def waiting_write(path: Path, lines: list[bytes]) -> None:
        writing.set()
        ran_during_write.append(loop_ran.wait(2))
        write_whole(path, lines)

    async def on_the_loop() -> None:
        while not writing.is_set():
            await asyncio.sleep(0.001)
        loop_ran.set()

    monkeypatch.setattr(decision_spool, "_write_whole", waiting_write)
    probe = asyncio.ensure_future(on_the_loop())
    service._publisher_task = asyncio.ensure_future(asyncio.sleep(3600))
    await service.stop()
    probe.cancel()
    assert ran_during_write == [True], "the loop ran nothing while the spool was written"
    assert [item[1] for item in decision_spool.read(tmp_path / decision_spool.SPOOL_NAME)] == ["d-1"]

"""Whether a stream's ingest has read all the stream stored until a moment ago (`StreamIngest.drained`)."""

from __future__ import annotations

from types import SimpleNamespace

from app.ingest import StreamIngest
from streams import jetstream as jsx
from streams import pull
from streams.store import OnlineStore

EXPIRED = b"NATS/1.0 408 Request Timeout\r\n\r\n"


async def _send(*args: object, **kwargs: object) -> None:
    pass


async def test_an_ingest_whose_consumer_is_to_be_made_again_is_not_drained() -> None:
    """After a reconnect, the consumer is made again from the position (`request_reset`) once the ingest's loop
    takes it. Until then its old puller's last status still said the stream had nothing more, and drained() said
    all was read, what was stored while NATS was away included: the learner's silences went by the clock
    (`SilenceLearning.horizon_ms`), and the smaller stream limits took the stream as read to its end."""
    nc = SimpleNamespace(max_payload=1 << 20, is_connected=True, stats={"reconnects": 0}, publish=_send,
                         new_inbox=lambda: "_INBOX.drained")
    ingest = StreamIngest(nc, None, jsx.SIGNALS, OnlineStore(), None, batch=8, max_event_bytes=1024,
                          max_uncheckpointed=100)
    ingest.puller = pull.BatchPuller(nc, "SIGNALS", ingest.durable, 8, ingest._on_message,
                                     on_gone=ingest._consumer_gone)
    ingest.puller._on_raw(b"_INBOX.drained", b"", b"", EXPIRED)  # the server: nothing more for now
    assert ingest.drained()
    ingest.request_reset()  # a reconnect: what was stored while away is read by the consumer made again
    assert ingest.reset_needed and ingest.puller.idle
    assert not ingest.drained()

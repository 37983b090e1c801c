"""The lag a held ingest reads from its consumer (`LagWatch.ask`, app/ingest_lag.py), from answers shaped as nats-py returns
them: a consumer led on a cluster, one on a single server, and a cluster node's that has not made its copy yet."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from nats.js.api import ConsumerInfo, StreamInfo

from app.ingest import StreamIngest
from app.metrics import METRICS
from streams import jetstream as jsx
from streams.store import OnlineStore
from tests.unit.consumer_answers import LED, ON_A_CLUSTER, SINGLE, config_only, consumer_info


class JetStream:
    """The two calls `LagWatch.ask` makes; the stream stores `stored` messages, 1 to `stored`, or does not answer."""

    def __init__(self, info: ConsumerInfo, stored: int | None) -> None:
        self.info, self.stored = info, stored

    async def consumer_info(self, stream: str, durable: str) -> ConsumerInfo:
        return self.info

    async def stream_info(self, stream: str) -> StreamInfo:
        if self.stored is None:
            raise TimeoutError("no leader yet")
        return StreamInfo.from_response({"config": {"name": "SIGNALS", "subjects": ["signals.>"]}, "state": {
            "messages": self.stored, "bytes": 0, "first_seq": 1, "last_seq": self.stored, "consumer_count": 1}})


def held_ingest(info: ConsumerInfo, server_info: dict[str, Any], stored: int | None) -> StreamIngest:
    """An ingest held at position 100 whose last lag told was 250, its server's INFO `server_info`."""
    js = JetStream(info, stored)
    nc = SimpleNamespace(is_connected=True, _server_info=server_info, jetstream=lambda timeout: js)
    store = OnlineStore()
    store.positions["SIGNALS"] = 100
    ingest = StreamIngest(nc, None, jsx.SIGNALS, store, None, batch=8, max_event_bytes=1024, max_uncheckpointed=100)
    ingest.lag = 250
    METRICS.lag.labels("SIGNALS").set(250)
    return ingest


def told() -> float:
    return METRICS.lag.labels("SIGNALS")._value.get()


async def test_the_consumer_s_count_is_the_lag_on_a_cluster_and_on_a_single_server() -> None:
    for info, server in ((consumer_info(300, LED), ON_A_CLUSTER), (consumer_info(300, None), SINGLE)):
        ingest = held_ingest(info, server, stored=None)
        await ingest.lag_watch.ask()
        assert (ingest.lag, told()) == (300, 300), server


async def test_a_cluster_node_without_the_consumer_s_copy_yet_does_not_tell_a_lag_of_0() -> None:
    """Just after the consumer is made, a node it is assigned to that has not made its copy answers consumer_info
    with its config alone, every count 0: the lag of a held ingest read 0 for that sample, /readyz and
    tipstream_stream_lag saying nothing waited. Such an answer tells nothing of the consumer: the stream's count
    is the lag then, as when the consumer does not answer, and the last lag known stays if the stream does not
    answer either."""
    ingest = held_ingest(config_only(), ON_A_CLUSTER, stored=420)
    await ingest.lag_watch.ask()
    assert (ingest.lag, told()) == (320, 320)
    ingest = held_ingest(config_only(), ON_A_CLUSTER, stored=None)
    await ingest.lag_watch.ask()
    assert (ingest.lag, told()) == (250, 250)

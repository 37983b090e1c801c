"""The lag a held ingest reads from its consumer (`StreamIngest._ask_lag`), from answers shaped as nats-py returns
them: a consumer led on a cluster, one on a single server, and a cluster node's that has not made its copy yet."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from nats.js.api import ConsumerInfo, StreamInfo

from app.ingest import StreamIngest
from app.metrics import METRICS
from streams import jetstream as jsx
from streams.store import OnlineStore

CREATED = "2026-12-07T22:20:59.123456789Z"
CONFIG = {"durable_name": "tipstream-signals", "deliver_policy": "by_start_sequence", "opt_start_seq": 101,
          "ack_policy": "explicit", "ack_wait": 30_000_000_000, "max_deliver": -1, "replay_policy": "instant",
          "max_waiting": 512, "max_ack_pending": 1000, "num_replicas": 0}


def consumer_info(pending: int, cluster: dict[str, Any] | None, delivered: int = 100) -> ConsumerInfo:
    """As nats-server 2.15.1 answers, read by nats-py: `cluster` None leaves the part out, as a single server does."""
    answer = {"type": "io.nats.jetstream.api.v1.consumer_info_response", "stream_name": "SIGNALS",
              "name": "tipstream-signals", "created": CREATED, "config": dict(CONFIG),
              "delivered": {"consumer_seq": 0, "stream_seq": delivered},
              "ack_floor": {"consumer_seq": 0, "stream_seq": delivered},
              "num_ack_pending": 0, "num_redelivered": 0, "num_waiting": 0, "num_pending": pending,
              "ts": "2026-12-07T22:21:00Z"}
    if cluster is not None:
        answer["cluster"] = cluster
    return ConsumerInfo.from_response(answer)


def config_only() -> ConsumerInfo:
    """A cluster node's answer for a consumer assigned to it whose copy it has not made yet (just after the consumer
    is made): its config and the state's zero values, no cluster part (nats-server's jsConsumerInfoRequest)."""
    return consumer_info(0, None, delivered=0)


LED = {"name": "tipstream-test", "leader": "n2", "replicas": [{"name": "n0", "current": True, "active": 519776},
                                                               {"name": "n1", "current": True, "active": 8710678}]}


class JetStream:
    """The two calls `_ask_lag` makes; the stream stores `stored` messages, 1 to `stored`, or does not answer."""

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


ON_A_CLUSTER = {"server_name": "n2", "version": "2.15.1", "cluster": "tipstream-test"}
SINGLE = {"server_name": "NDSXYZ", "version": "2.15.1"}


async def test_the_consumer_s_count_is_the_lag_on_a_cluster_and_on_a_single_server() -> None:
    for info, server in ((consumer_info(300, LED), ON_A_CLUSTER), (consumer_info(300, None), SINGLE)):
        ingest = held_ingest(info, server, stored=None)
        await ingest._ask_lag()
        assert (ingest.lag, told()) == (300, 300), server


async def test_a_cluster_node_without_the_consumer_s_copy_yet_does_not_tell_a_lag_of_0() -> None:
    """Just after the consumer is made, a node it is assigned to that has not made its copy answers consumer_info
    with its config alone, every count 0: the lag of a held ingest read 0 for that sample, /readyz and
    tipstream_stream_lag saying nothing waited. Such an answer tells nothing of the consumer: the stream's count
    is the lag then, as when the consumer does not answer, and the last lag known stays if the stream does not
    answer either."""
    ingest = held_ingest(config_only(), ON_A_CLUSTER, stored=420)
    await ingest._ask_lag()
    assert (ingest.lag, told()) == (320, 320)
    ingest = held_ingest(config_only(), ON_A_CLUSTER, stored=None)
    await ingest._ask_lag()
    assert (ingest.lag, told()) == (250, 250)

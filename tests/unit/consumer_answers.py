"""consumer_info answers shaped as nats-server 2.15.1 sends them and nats-py reads them: a consumer led on a cluster,
one on a single server, and a cluster node's that has the consumer assigned but has not made its copy yet."""

from __future__ import annotations

import copy
from typing import Any

from nats.js.api import ConsumerInfo

CREATED = "2026-12-07T22:20:59.123456789Z"
CONFIG = {"durable_name": "tipstream-signals", "deliver_policy": "by_start_sequence", "opt_start_seq": 101,
          "ack_policy": "explicit", "ack_wait": 30_000_000_000, "max_deliver": -1, "replay_policy": "instant",
          "max_waiting": 512, "max_ack_pending": 1000, "num_replicas": 0}


def consumer_info(pending: int, cluster: dict[str, Any] | None, delivered: int = 100, consumer_seq: int = 0,
                  waiting: int = 0, ack_pending: int = 0) -> ConsumerInfo:
    """As nats-server 2.15.1 answers, read by nats-py: `cluster` None leaves the part out, as a single server does."""
    answer = {"type": "io.nats.jetstream.api.v1.consumer_info_response", "stream_name": "SIGNALS",
              "name": "tipstream-signals", "created": CREATED, "config": dict(CONFIG),
              "delivered": {"consumer_seq": consumer_seq, "stream_seq": delivered},
              "ack_floor": {"consumer_seq": 0, "stream_seq": delivered},
              "num_ack_pending": ack_pending, "num_redelivered": 0, "num_waiting": waiting, "num_pending": pending,
              "ts": "2026-12-07T22:21:00Z"}
    if cluster is not None:
        answer["cluster"] = copy.deepcopy(cluster)  # nats-py reads its replicas in place: LED is asked for again
    return ConsumerInfo.from_response(answer)


def config_only() -> ConsumerInfo:
    """A cluster node's answer for a consumer assigned to it whose copy it has not made yet (just after the consumer
    is made): its config and the state's zero values, no cluster part (nats-server's jsConsumerInfoRequest)."""
    return consumer_info(0, None, delivered=0)


LED = {"name": "tipstream-test", "leader": "n2", "replicas": [{"name": "n0", "current": True, "active": 519776},
                                                               {"name": "n1", "current": True, "active": 8710678}]}
ON_A_CLUSTER = {"server_name": "n2", "version": "2.15.1", "cluster": "tipstream-test"}
SINGLE = {"server_name": "NDSXYZ", "version": "2.15.1"}

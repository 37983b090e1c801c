"""What tipstream decides from a consumer's info when a NATS cluster node answers it with the config alone (just
after the consumer is made, a node it is assigned to that has not made its copy yet: every count 0), from answers
shaped as nats-py reads them: a scrub's pass after a pull ended unfilled (`_Reader._ended_or_more`), and a start's
look for another service reading its consumers (`read_by_another`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.api import ConsumerInfo

from streams import jetstream as jsx
from streams.scrub import ScrubError, _Reader
from tests.unit.consumer_answers import LED, ON_A_CLUSTER, SINGLE, config_only, consumer_info


class JetStream:
    """consumer_info answers each stream's `answers` in turn (the last again once they run out); the client records
    its publishes."""

    def __init__(self, answers: dict[str, list[ConsumerInfo]], server_info: dict[str, Any]) -> None:
        self.answers, self.asked, self.published = answers, dict.fromkeys(answers, 0), []

        async def publish(subject: str, body: bytes, reply: str = "") -> None:
            self.published.append(subject)

        self._nc = SimpleNamespace(_server_info=server_info, publish=publish)

    async def consumer_info(self, stream: str, name: str) -> ConsumerInfo:
        self.asked[stream] += 1
        return self.answers[stream][min(self.asked[stream], len(self.answers[stream])) - 1]


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsx, "CONFIG_ONLY_PAUSE_S", 0.0)


def reader_after_an_unfilled_pull(js: JetStream) -> _Reader:
    """A pass over SIGNALS through #500 that has handed on 5 messages, through #105, its pull requests all ended."""
    reader = _Reader(js, "SIGNALS", 500, lambda seq, body: None, None)  # type: ignore[arg-type]
    reader.start, reader.cseq, reader.requested, reader.last_seq = 101, 5, 0, 105
    reader.done = asyncio.get_running_loop().create_future()
    reader.next_subject, reader.inbox = "$JS.API.CONSUMER.MSG.NEXT.SIGNALS.tipstream-scrub-0123", "_INBOX.x"
    return reader


async def test_a_scrub_s_consumer_with_nothing_left_ends_its_pass_on_a_cluster_and_on_a_single_server() -> None:
    for answer, server in ((consumer_info(0, LED, delivered=105, consumer_seq=5), ON_A_CLUSTER),
                           (consumer_info(0, None, delivered=105, consumer_seq=5), SINGLE)):
        js = JetStream({"SIGNALS": [answer]}, server)
        reader = reader_after_an_unfilled_pull(js)
        await reader._ended_or_more()
        assert reader.done.result() is None, server  # read through
        assert js.published == []


async def test_a_cluster_node_without_the_consumer_s_copy_yet_does_not_end_the_scrub() -> None:
    """Read as nothing left, such an answer ended the pass, and the forget reported the stream scrubbed with the
    user's messages past #105 still in it. Asked again, the consumer's own answer decides (here, more to read: the
    next pull is asked for)."""
    js = JetStream({"SIGNALS": [config_only(), config_only(), consumer_info(300, LED, delivered=105, consumer_seq=5)]},
                   ON_A_CLUSTER)
    reader = reader_after_an_unfilled_pull(js)
    await reader._ended_or_more()
    assert not reader.done.done()
    assert (js.asked["SIGNALS"], js.published) == (3, [reader.next_subject])


async def test_a_cluster_that_keeps_answering_with_the_config_alone_fails_the_scrub_with_a_word_why() -> None:
    """Bounded: the scrub fails naming the cause, and the forget tries again later (its log says so), rather than
    ending the pass as read through or asking for ever."""
    js = JetStream({"SIGNALS": [config_only()]}, ON_A_CLUSTER)
    reader = reader_after_an_unfilled_pull(js)
    await reader._ended_or_more()
    with pytest.raises(ScrubError, match="from a NATS cluster node without its copy"):
        reader.done.result()
    assert (js.asked["SIGNALS"], js.published) == (jsx.CONFIG_ONLY_TRIES, [])


def idle() -> ConsumerInfo:
    return consumer_info(0, LED, delivered=100)


async def read_by_another(js: JetStream) -> list[str]:
    return await jsx.read_by_another(js, ["SIGNALS", "FEEDBACK"], again_after_s=0, reading_s=0)  # type: ignore[arg-type]


async def test_idle_consumers_are_read_by_no_one_and_a_waiting_request_is_another_service_s() -> None:
    js = JetStream({"SIGNALS": [idle()], "FEEDBACK": [idle()]}, ON_A_CLUSTER)
    assert await read_by_another(js) == []
    js = JetStream({"SIGNALS": [consumer_info(0, LED, waiting=1)], "FEEDBACK": [idle()]}, ON_A_CLUSTER)
    assert await read_by_another(js) == ["SIGNALS"]


async def test_a_consumer_another_service_has_just_made_is_not_taken_for_idle() -> None:
    """Its counts of 0 read as idle: a start beside a service that had just made its consumer went on and made it
    again, taking it from under the running service. Asked again, the consumer's own answer decides."""
    js = JetStream({"SIGNALS": [config_only(), consumer_info(0, LED, waiting=1)], "FEEDBACK": [idle()]}, ON_A_CLUSTER)
    assert await read_by_another(js) == ["SIGNALS"]


async def test_a_consumer_only_answered_for_with_the_config_alone_counts_as_read_by_another() -> None:
    """Its counts unknown after every try: a consumer just made, so a start is refused rather than take it."""
    js = JetStream({"SIGNALS": [idle()], "FEEDBACK": [config_only()]}, ON_A_CLUSTER)
    assert await read_by_another(js) == ["FEEDBACK"]
    assert js.asked["FEEDBACK"] == jsx.CONFIG_ONLY_TRIES

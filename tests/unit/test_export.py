"""Exporting a user (`app/export.py`): what its scan of the streams says when a stream cannot be read."""

from __future__ import annotations

from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from app.export import READ, from_streams
from streams.scrub import ScrubError


class Streams:
    """A JetStream whose streams are missing (`NotFoundError`) or do not answer (`error`)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def stream_info(self, stream: str) -> Any:
        raise self.error


async def test_a_stream_never_created_holds_nothing_of_theirs() -> None:
    assert await from_streams(Streams(NotFoundError()), "u-1") == {stream: [] for stream in READ}


async def test_an_export_fails_when_a_stream_does_not_answer_rather_than_showing_it_empty() -> None:
    # NATS slow or away a moment: an export reading "no messages" of a user whose events the stream holds
    # is a wrong answer to a request to see their data.
    with pytest.raises(ScrubError, match="no answer from JetStream"):
        await from_streams(Streams(NatsTimeoutError()), "u-1")

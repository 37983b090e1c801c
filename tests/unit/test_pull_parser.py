"""The raw pull path's parser (`streams.pull.FastParser`) hands messages to their handlers without a connection."""

from __future__ import annotations

import logging

import pytest

from streams import pull


async def test_a_handler_that_raises_after_a_control_line_leaves_the_connection_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read holding a control line (+OK, PING, an INFO) before its messages is handed to nats-py's own parser
    from that line on, which delivers them through `IngestClient._process_msg`: a handler that raised there
    ended nats-py's read loop, which the fast path's guard had been written against (the connection still
    counted as connected, and read nothing more until its pings went unanswered)."""
    nc = pull.IngestClient()
    seen: list[bytes] = []

    def handler(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        seen.append(data)
        if data == b"bad":
            raise RuntimeError("a bug of ours")

    nc._raw_handlers[1] = handler
    with caplog.at_level(logging.ERROR, logger="tipstream"):
        await nc._ps.parse(b"+OK\r\nMSG _INBOX.x 1 3\r\nbad\r\nMSG _INBOX.x 1 2\r\nok\r\n")
    assert seen == [b"bad", b"ok"]
    assert any(r.exc_info and "a bug of ours" in str(r.exc_info[1]) for r in caplog.records), "the traceback is logged"

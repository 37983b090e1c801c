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


def test_handler_failures_left_out_are_counted_as_the_other_throttled_lines_count_them(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """It read '(2 more failures since the last one told)', in words of its own."""
    from streams.log_throttle import LogThrottle

    now = [0.0]
    monkeypatch.setattr(pull, "_HANDLER_FAILURES", LogThrottle(clock=lambda: now[0]))
    with caplog.at_level(logging.ERROR, logger="tipstream.jetstream"):
        for at in (0.0, 1.0, 2.0, 60.0):
            now[0] = at
            pull._tell_handler_failure(b"signals.app.opened", RuntimeError("a bug of ours"))
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream.jetstream"]
    assert len(told) == 2 and told[1].endswith("with this traceback (2 more failures since the last line)"), told

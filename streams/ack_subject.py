"""What a JetStream message's ack subject (its reply) says: where it is in its stream and its consumer,
when the server stored it, how often it was delivered and how many are still pending after it. Read from
the subject's tokens, so that ingest needs nothing of the message but its subject, reply and body.

Pure functions of the reply's bytes; the two layouts nats-server sends are v1
`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>` and v2, with the domain and account
hash before the stream and a token after.

>>> stream_sequence(b"$JS.ACK.SIGNALS.ingest.1.42.42.1764140400123456789.7")
(42, 7)
"""

from __future__ import annotations


def ack_tokens(reply: bytes) -> tuple[list[bytes], int]:
    """A JetStream ack subject's tokens, and where `<delivered>` is among them: v1
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`, or v2 with the domain and
    account hash before the stream and a token after."""
    tokens = reply.split(b".")
    return tokens, 4 if len(tokens) == 9 else 6


def ack_fields(reply: bytes) -> tuple[int, int, int]:
    """(stream sequence, stored time in ns, messages still pending) from a JetStream ack subject."""
    tokens, at = ack_tokens(reply)
    return int(tokens[at + 1]), int(tokens[at + 3]), int(tokens[at + 4])


def delivery(reply: bytes) -> tuple[int, int]:
    """(when JetStream stored the message in ms, how many times it has delivered it, this time
    included) from its ack subject, read once.

    >>> delivery(b"$JS.ACK.FEEDBACK.ingest.2.42.43.1764140400123456789.0")
    (1764140400123, 2)
    >>> delivery(b"$JS.ACK.hub.ACC.FEEDBACK.ingest.1.42.42.1764140400123456789.0.tok")
    (1764140400123, 1)
    """
    tokens, at = ack_tokens(reply)
    return int(tokens[at + 3]) // 1_000_000, int(tokens[at])


def sequences(reply: bytes) -> tuple[int, int]:
    """(stream sequence, consumer sequence) from a JetStream ack subject. The consumer's counts its deliveries,
    a message delivered again included, so one lost on its way leaves a gap in it.

    >>> sequences(b"$JS.ACK.SIGNALS.ingest.2.42.43.1764140400123456789.0")
    (42, 43)
    >>> sequences(b"$JS.ACK.hub.ACC.SIGNALS.ingest.1.42.42.1764140400123456789.0.tok")
    (42, 42)
    """
    tokens, at = ack_tokens(reply)
    return int(tokens[at + 1]), int(tokens[at + 2])


def stream_sequence(reply: bytes) -> tuple[int, int]:
    """(stream sequence, messages still pending) from a JetStream ack subject."""
    seq, _, pending = ack_fields(reply)
    return seq, pending


def stored_ms(reply: bytes) -> int:
    """When JetStream stored the message (ms since the epoch), from its ack subject.

    >>> stored_ms(b"$JS.ACK.SIGNALS.ingest.1.42.42.1764140400123456789.0")
    1764140400123
    >>> stored_ms(b"$JS.ACK.hub.ACC.SIGNALS.ingest.1.42.42.1764140400123456789.0.tok")
    1764140400123
    """
    return ack_fields(reply)[1] // 1_000_000


def ack_position(reply: bytes) -> tuple[int, int, int]:
    """(stream sequence, consumer sequence, messages after it) from a JetStream ack subject, v1 or v2.

    >>> ack_position(b"$JS.ACK.DLQ.tipstream-scrub-1.1.42.7.1764140400123456789.3")
    (42, 7, 3)
    >>> ack_position(b"$JS.ACK.hub.ACC.DLQ.tipstream-scrub-1.1.42.7.1764140400123456789.3.tok")
    (42, 7, 3)
    """
    tokens, at = ack_tokens(reply)
    return int(tokens[at + 1]), int(tokens[at + 2]), int(tokens[at + 4])

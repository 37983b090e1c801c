"""What a chunk of deliveries says of its stream: whether it holds the messages after the position one
after another (`delivered_in_turn`), where it passes over some (`holes_after`), how many of it were stored
by a moment (`stored_until`), and how many the stream stores past the position (`stored_past`).

Pure functions of stream sequences and ack subjects (`streams/ack_subject.py`), asked once per chunk.
"""

from __future__ import annotations

import bisect

from streams import ack_subject, pull


def delivered_in_turn(position: int, first: tuple[int, int], last: tuple[int, int], count: int) -> bool:
    """Whether a chunk of `count` messages whose first and last have these (stream, consumer) sequences
    (`ack_subject.sequences`) holds the stream's messages after `position`, one after another, none lost on its way:
    the usual case, told from two messages. By the stream's sequences alone, a message delivered again inside
    the chunk made up for one passed over; the delivery lost then leaves a gap in the consumer's, which counts
    every delivery. (A new leader numbers on from the deliveries it knows of: one lost leader gives a gap or,
    behind, repeats, not both; two in one chunk could cancel out.)

    >>> delivered_in_turn(100, (101, 7), (104, 10), 4)
    True
    >>> delivered_in_turn(100, (101, 7), (104, 11), 4)  # 101, 102, 102 again, 104: 103's delivery was lost
    False
    >>> delivered_in_turn(100, (102, 7), (105, 10), 4)  # 101 passed over
    False
    """
    return first[0] == position + 1 and last[0] - first[0] == count - 1 and last[1] - first[1] == count - 1


def stored_until(chunk: list[pull.RawMsg], stored_ms: int) -> int:
    """How many of `chunk`'s first messages JetStream stored at or before `stored_ms` (stored times grow along a
    stream): the last one's time alone in the usual case, all of them.

    >>> chunk = [(b"", f"$JS.ACK.FEEDBACK.c.1.{n}.{n}.{ms * 1_000_000}.0".encode(), b"") for n, ms in enumerate((10, 20, 20, 30))]
    >>> stored_until(chunk, 9), stored_until(chunk, 10), stored_until(chunk, 25), stored_until(chunk, 30)
    (0, 1, 3, 4)
    """
    if ack_subject.stored_ms(chunk[-1][1]) <= stored_ms:
        return len(chunk)
    return bisect.bisect_right(chunk, stored_ms, key=lambda msg: ack_subject.stored_ms(msg[1]))


def holes_after(position: int, seqs: list[int]) -> list[tuple[int, int]]:
    """Where the stream sequences delivered pass over others after `position`: (the first passed over, the
    one delivered after the gap), in order. One delivered again, or at or before the position (delivered
    again after its acknowledgement was lost), fills no gap.

    >>> holes_after(100, [101, 102, 102, 104])
    [(103, 104)]
    >>> holes_after(100, [103, 101, 99, 102, 107, 109])
    [(104, 107), (108, 109)]
    >>> holes_after(100, [101, 102, 101])
    []
    """
    holes, expected = [], position + 1
    for seq in sorted(set(seqs)):
        if seq > expected:
            holes.append((expected, seq))
        expected = max(expected, seq + 1)
    return holes


def stored_past(position: int, last_seq: int, messages: int) -> int:
    """How many messages a stream stores past `position`, at most, from its state: its last sequence less the position,
    or all it stores if fewer. Exact unless a message past the position was deleted (a user forgotten before it was
    read) while the stream still stores one at or before it; the exact count needs every deleted sequence
    (stream_info's `deleted_details`, a list as long as all the erasures the stream keeps), too much to ask each second.

    >>> stored_past(5, 15, 15), stored_past(5, 15, 7), stored_past(20, 15, 15)
    (10, 7, 0)
    """
    return max(min(last_seq - position, messages), 0)

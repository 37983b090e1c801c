"""Whether each stream is the one the checkpoint was taken from: a start checks the message at each
checkpointed position before resuming after it, and replays from the first message a stream that
is another of that name (deleted and made again, or its NATS store lost or restored from an older copy, and
published to since).

Apart from `bootstrap.Service`: a check of its own, told by the server's clock where it can be and by
this host's otherwise, with the message that says which and what the operator may look at.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams import jetstream as jsx
from streams.store import OnlineStore

log = logging.getLogger("tipstream")
# How long a start waits for when NATS stored the message at a checkpointed position: as long as
# for any JetStream call. (A checkpoint waits 1 s.) Not answered, it was told by the clocks instead,
# and a NATS clock more than a second ahead of this host's replayed the stream from its first message.
STORED_TIME_AT_START_S = 10.0


async def forget_positions_of_another_stream(js: Any, written: dict[str, Any], checkpointed: dict[str, int],
                                             store: OnlineStore, *, data_dir: Path, embedded: bool) -> None:
    """A checkpointed position whose message was stored after that checkpoint was written came
    from another stream of that name (deleted and made again, or its NATS store lost or restored from
    an older copy, and published to since): resuming after it would skip, silently, the new stream's events up to
    it. The message there is told from the one read by when NATS stored it, recorded with the
    position (`Checkpointer.stored_us`); a position without it compares the stored time with the
    checkpoint's, by this host's clock. Such a stream, and one that ends before the position, is
    replayed from its first message with its position set back to 0: the fold, the learner's
    credits and the decision cache recognise what they hold; its bad events are dead-lettered
    (the DLQ says which were). Kept, the old position held until the new stream passed it: every
    start replayed the whole stream and logged the error again, and a consumer re-created
    meanwhile (a reconnect) resumed after it, skipping what was not read yet."""
    for stream, seq in list(checkpointed.items()):
        when, mark = written.get(stream, (None, None))
        if seq <= 0 or when is None:
            continue
        info = await js.stream_info(stream)
        state = info.state
        if seq > state.last_seq:
            why = f"it ends at {state.last_seq}"
        elif state.first_seq > seq:  # aged out: nothing left to tell the streams apart by
            continue
        elif mark is not None and (now := await jsx.stored_us(js, stream, seq, STORED_TIME_AT_START_S)) is not None:
            if now == mark:  # by the server's clock both times: exact, whatever this host's says
                continue
            why = f"its message {seq} is not the one read there (NATS stored it at another time)"
        elif await jsx.stored_after(js, stream, seq, when):  # no mark: an older release's, or NATS was away
            # By the NATS server's clock against this host's: one running more than a second
            # ahead of it reads so too, and every start would replay the stream (so said).
            why = (f"its message {seq} was stored after that checkpoint was written (or the NATS server's "
                   "clock runs more than 1 s ahead of this host's: keep both on NTP)")
        else:
            continue
        cause = _cause(stream, info.created, when, mark, data_dir, embedded)
        log.error("the checkpoint read stream %s up to %d, but %s: the stream is not the one the checkpoint was "
                  "taken from. %s Replaying %s from its first message: what the checkpoint holds stays, and "
                  "nothing is counted twice.", stream, seq, why, cause, stream)
        checkpointed[stream] = 0
        store.positions[stream] = 0


def _cause(stream: str, created: datetime | None, written: datetime, mark: int | None, data_dir: Path,
           embedded: bool) -> str:
    """The likelier cause, said first: a stream created after the message read at the position was stored (by the
    NATS server's clock, as its creation time is) or, that not recorded, after the checkpoint was written (this
    host's, a second left for the clocks to differ) was deleted and made again, or its store was lost and the
    stream created anew; a store restored from an older copy keeps its creation time. Guessed a lost or restored
    store alone, the operator looked for a backup put back where the stream had been deleted and made again."""
    if mark is not None:
        made_again = jsx.made_again_after(stream, created, jsx.EPOCH + timedelta(microseconds=mark),
                                          "the message read there was stored")
    else:
        if written.tzinfo is None:  # SQLite hands back the UTC it was given without its zone
            written = written.replace(tzinfo=UTC)
        made_again = jsx.made_again_after(stream, created, written, "that checkpoint was written",
                                          slack=timedelta(seconds=1))
    store = f"the embedded server's store ({data_dir / 'nats'})" if embedded else "the store of the server in NATS_URL"
    if made_again is not None:
        return f"{made_again}: was it deleted and created again, or {store} lost and the stream created anew?"
    if embedded:
        return f"Was {store} lost, or restored from an older copy?"
    return f"Was {store} lost, or restored from an older copy, or does NATS_URL name another server?"

"""The ids of the decisions /score serves: the time each was served, to the millisecond, then random bits.

The time in an id is when it was served, whatever `context.now` the caller scored for (the decision's `ts`):
forgetting a user goes by it (`checkpoint_rows.delete_decisions_served_until`), as do the learner and the
retention of `tip_scores` (`retention`, by the index of when a row may go, `db.tip_scores_goes_at`). Apart
from `app.decisions` so that the checkpoint writer's process reads ids without its imports.
"""

from __future__ import annotations

import os
import time

ID_LENGTH = 30  # "d-", 12 hex digits of time, 16 random
_HEX_DIGITS = "0123456789abcdef"


def new_decision_id() -> str:
    """Time-ordered to the millisecond, unique without coordination, and unguessable: ms since the
    epoch (12 hex digits), then 64 bits drawn from the OS for each id (16 hex digits; two ids of one
    millisecond share them with odds of 1 in 2**64).

    The 64 bits were 32 drawn at process start and a counter: one answer told the next ids, and a
    publisher on `decisions.>` could store a decision under an id the service was about to serve,
    which JetStream's duplicate window then dropped, the service's own, keeping the forged one.

    >>> a, b = new_decision_id(), new_decision_id()
    >>> a != b and a.startswith("d-") and len(a) == 30 and a[14:22] != b[14:22]
    True
    """
    return f"d-{time.time_ns() // 1_000_000:012x}{os.urandom(8).hex()}"


def decision_time_ms(decision_id: str) -> int | None:
    """The creation time encoded in our decision ids (`new_decision_id`): 12 lower-case hex digits, as the
    retention index reads them in SQL (`db.tip_scores_goes_at`). `int(_, 16)` also read upper case, a sign, "0x",
    spaces and underscores: such an id was forgotten by the time in it and kept by retention for its `created_at`.

    >>> decision_time_ms("d-019c5e8a2b10" + "0" * 16), decision_time_ms("external-7")
    (1771112639248, None)
    >>> [decision_time_ms(f"d-{digits}" + "0" * 16) for digits in ("019C5E8A2B10", " 19c5e8a2b10", "0_9c5e8a2b10")]
    [None, None, None]
    """
    if len(decision_id) == ID_LENGTH and decision_id.startswith("d-"):
        digits = decision_id[2:14]
        return None if digits.strip(_HEX_DIGITS) else int(digits, 16)  # left over: a character of no hex time
    return None


def served_before_bound(ms: int) -> str:
    """The lowest id `new_decision_id` gives at `ms` (since the epoch): ids of ours sort as the times in them (12 hex
    digits, fixed width), so an id of ours below it, from "d-", is of a decision served before `ms`.

    >>> served_before_bound(1771112639248) < new_decision_id(), decision_time_ms(served_before_bound(1) + "0" * 16)
    (True, 1)
    """
    return f"d-{ms:012x}"

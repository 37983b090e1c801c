"""What the learner says in its log of feedback it could not learn: a publisher's mistake (a tip or a
user the decision does not have, a decision id /score never answered), or a budget too small for the
reactions that come (the join cache's). Each outcome at most once a minute: the metrics count each
(tipstream_feedback_total, tipstream_silences_total), so whoever sends the feedback does not decide how
fast the log grows. And, once, that the first rewards it learned were all positive (`PositivesOnly`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from app.decision_ids import decision_time_ms
from streams.log_throttle import LogThrottle

if TYPE_CHECKING:
    from app.join_cache import JoinCache

log = logging.getLogger("tipstream.learner")

_TOLD = LogThrottle()  # a publisher's mistake in feedback: once a minute per outcome
# Rewards learned from feedback before the learner says, once, that none was negative (`PositivesOnly`).
POSITIVE_ONLY_WARN_AFTER = 1_000


def _tell(outcome: str, message: str, *args: Any) -> None:
    """Log feedback not learned for its publisher's mistake, once a minute per outcome (the metric
    counts each): it showed in tipstream_feedback_total only, so a publisher's wrong tip id or user
    id went unseen in the log."""
    if _TOLD.allow(outcome) is not None:
        log.warning(message + "; not learned (tipstream_feedback_total{outcome=\"%s\"} counts each, this line "
                    "comes at most once a minute)", *args, outcome)


def tell_unknown_tip(tip_id: str, decision_id: str, decision: dict[str, Any]) -> None:
    _tell("unknown_tip", "feedback names tip %r, which is not a candidate of decision %r (%s)", tip_id,
          decision_id, ", ".join(repr(c["tip_id"]) for c in decision["ranked"][:10]))


def tell_wrong_user(user_id: str, decision_id: str, decision: dict[str, Any]) -> None:
    _tell("wrong_user", "feedback of user %r names decision %r, which /score made for user %r",
          user_id, decision_id, decision["user_id"])


def tell_let_go(joins: JoinCache, decision_id: str, created_ms: int, stored_at_ms: int | None) -> None:
    """A reaction within the join window whose decision the cache's memory budget let go first. Counted as
    `expired` only, as are reactions past the window, which is what an operator sizes: at 230 decisions a
    second the default 256 MB holds ~9 minutes of them, and reactions later than that taught nothing,
    without a word."""
    now_ms = stored_at_ms if stored_at_ms is not None else int(time.time() * 1000)
    _tell("expired", "feedback names decision %r, made %.3g s before it, which the join cache had let go: its "
          "memory budget (TIPSTREAM_LEARNER_JOIN_CACHE_MB=%.3g) holds the decisions of the last %.3g s at this "
          "rate. Raise it to learn reactions that come later", decision_id, (now_ms - created_ms) / 1000,
          joins.limit / 2**20, max(now_ms - joins.evicted_upto_ms, 0) / 1000)


def tell_gave_up(expired: int, max_age_s: float, last: tuple[str, str, str | None] | None) -> None:
    """Named as the other mistakes are (the last given up on): a count alone left the publisher to find it.
    Feedback for one of our decisions the join cache let go is `expired`, never waits: ours never came. Another
    publisher's id says nothing of when it was made, so feedback for one let go waits as for one not come, and
    the learner cannot tell which: the line names both (it said "never came" of a decision the cache let go)."""
    decision_id, tip_id, user_id = last or ("?", "?", None)
    if decision_time_ms(decision_id) is not None:
        why = ("never came to DECISIONS within TIPSTREAM_LEARNER_PENDING_MAX_AGE_S (%g s): a decision_id /score did "
               "not answer")
    else:
        why = ("did not come to DECISIONS within TIPSTREAM_LEARNER_PENDING_MAX_AGE_S (%g s), or came before the "
               "feedback and the join cache let it go (TIPSTREAM_LEARNER_JOIN_CACHE_MB, "
               "TIPSTREAM_LEARNER_JOIN_WINDOW_S): an id not made by /score does not say when its decision was made, "
               "so feedback naming it waits")
    _tell("unknown_decision", "%d feedback event(s) gave up waiting for the decisions they name (the last: "
          "decision %r, tip %r, of user %r), which " + why, expired, decision_id, tip_id, user_id, max_age_s)


def tell_silences_evicted(evicted: int) -> None:
    if _TOLD.allow("silence_evicted") is not None:
        log.warning("%d decision(s) left the join cache (TIPSTREAM_LEARNER_JOIN_CACHE_MB) before "
                    "TIPSTREAM_SILENCE_AFTER_S had passed, so their silence is not learned: raise the budget "
                    "or shorten the wait (tipstream_silences_total{outcome=\"evicted\"} counts each, this "
                    "line comes at most once a minute)", evicted)


class PositivesOnly:
    """Say once when the first rewards from feedback are all positive: an app that publishes only
    the reactions it sees (clicks) teaches the models that every tip pleases. Not said when silences
    are learned (`silence_learned`), which is what it would advise."""

    __slots__ = ("count", "silence_learned")

    def __init__(self, silence_learned: bool) -> None:
        self.count = 0  # rewards learned from feedback, all positive so far (-1: a negative came, or told)
        self.silence_learned = silence_learned

    def note(self, reward: float) -> None:
        if self.count < 0:
            return
        if reward < 0.5:
            self.count = -1
            return
        self.count += 1
        if self.count >= POSITIVE_ONLY_WARN_AFTER:
            self.count = -1
            if not self.silence_learned:
                log.warning("the first %d rewards learned from feedback were all positive (reward >= 0.5): the models "
                            "learn that every tip pleases. Publish `dismissed` for tips a user ignored, or set "
                            "TIPSTREAM_SILENCE_REWARD (e.g. 0) to learn that reward for a decision nobody reacts to "
                            "within TIPSTREAM_SILENCE_AFTER_S (docs/learning.md, \"Learning from silence\")",
                            POSITIVE_ONLY_WARN_AFTER)

"""The learner: feedback joined with the decision it names, learned by every live model.

A decision enters the join cache when /score serves it (`served`, so feedback can be joined
before the decision has made the round trip through JetStream); JetStream's acknowledgement
(`published`) marks it logged and writes its `tip_scores` row. The DECISIONS stream is read
back (`add_logged`) after a restart, to rebuild the cache, and afterwards only for decisions
published by others (`decision_tail.py`): this process's own are not read back once caught up.
Feedback (`on_feedback`, called for every `tip.reacted` event read from FEEDBACK, including
ones the fold already held):

1. No `decision_id`: counted (`no_decision`); the fold keeps the event for the user's features.
2. Decision not in the cache: older than the cache reaches -> `expired`; else the feedback waits
   (bounded in count and age) for the decision to arrive -> `waiting`, later `unknown_decision`.
   One waits for each (decision, tip, user): the same user's to that tip again is a `duplicate`,
   another user's waits beside it (only the decision says which user's is wrong: in one place, the
   wrong one would shut out the decision's user's own, then be refused as `wrong_user`).
   Read back at a start, feedback stored before another publisher's decision waits so too, though
   DECISIONS, read ahead, holds it already: live, it waited (`_defer`), until FEEDBACK's time passes
   the decision, or the join cache lets the decision go if that comes first (`_leaving`).
3. This (decision, tip) was credited already -> `duplicate`: redelivered feedback, or the same
   reaction re-sent with a new event id, is learned once (from another user: `wrong_user`).
4. The tip is not among the decision's candidates -> `unknown_tip`; the feedback's user is not
   the decision's -> `wrong_user` (another user's reaction must not train this user's weights).
5. Otherwise the reaction's reward (settings) trains every live model with `learn_one` on the
   features as they were served, and updates the popularity prior -> `credited`.
6. With `silence_reward` set (off by default), a decision nobody reacted to within `silence_after_s`
   of its creation is credited that reward for its first tip (app/silence_learning.py);
   a reaction to that tip stored later -> `late`, learned no more.

Silence is judged in FEEDBACK's time, as the join window is, so that a replay of the log (a restart,
a rebuild) learns it at the same place among the rewards as live (`SilenceLearning`).

The learner is a checkpoint participant: models, prior, credits (the new ones: `credit_log`),
waiting feedback and the stream positions they reflect are saved with the checkpoint (at most
every `snapshot_every_s`). On start, FEEDBACK and DECISIONS are re-read from those positions, so a
restart resumes learning exactly where the snapshot stopped: credits make the replay idempotent.
While DECISIONS is re-read after a start, the decisions it brings back wait in a segment of the
cache of their own, ahead of those /score serves meanwhile, so that the cache stays in creation
order and the memory budget evicts the oldest decisions first (`caught_up` joins the two). FEEDBACK
waits for DECISIONS read `DECISIONS_READ_AHEAD_S` past each message (streams/read_up_to.py), so that a decision
of ours stored just after a reaction to it is held when the reaction is read, as live; those read past
FEEDBACK's time wait apart until it reaches them (`JoinCache.ahead`, `_release_ahead`).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy.engine import Engine

from app.checkpoint_rows import write_learner_state
from app.credit_log import CreditLog, Restored
from app.decision_ids import decision_time_ms
from app.decisions import LoggedDecision, TipScoresLog, learning_input, served_after_stored, tip_score_row
from app.evaluation import TrainedOn
from app.join_cache import ENTRY_OVERHEAD, Entry, JoinCache
from app.learner_checkpoint import ModelBytes, SnapshotBook, saved_rows, state_bytes
from app.learner_told import PositivesOnly, tell_gave_up, tell_let_go, tell_unknown_tip, tell_wrong_user
from app.learning_metrics import FEEDBACK, JOIN_CACHE, JOIN_CACHE_BYTES, LEARN_DELAY, PENDING
from app.lineup import Lineup
from app.model_learning import ModelLearning
from app.silence_learning import SilenceLearning
from app.start_errors import reading_learner_row
from app.waiting import WaitingFeedback
from models.prior import PopularityPrior
from streams.ack_subject import ack_fields, delivery, stored_ms
from streams.events import Refused
from streams.read_up_to import ReadUpTo
from streams.store import OnlineStore

_OUTCOME = {name: FEEDBACK.labels(name) for name in (
    "credited", "duplicate", "late", "no_decision", "waiting", "unknown_decision", "expired", "unknown_tip",
    "wrong_user")}

# Credited decisions a registration's look for unseen rewards (`JoinCache.unseen_rewards`) tests between
# two yields to the event loop: ~3.5 ms of it on a slow day (1.1-1.7 us each, bench/snapshot.py).
UNSEEN_SCAN_CHUNK = 2_000
# Join-cache entries looked at between two chances for the API to run while forgetting a user: ~7 ms at
# ~3.3 us a 2 KB decision (`streams.scrub.belongs`).
FORGET_SCAN_CHUNK = 2_000


class Learner:
    name = "learner"

    def __init__(self, lineup: Lineup, store: OnlineStore, decision_log: TipScoresLog, *,
                 rewards: dict[str, float], cache_mb: float, window_s: float, pending_max: int,
                 pending_max_age_s: float, snapshot_every_s: float, silence_reward: float | None = None,
                 silence_after_s: float = 600.0, max_future_s: float | None = None,
                 clock: Callable[[], float] = time.time, timer: Callable[[], float] = time.perf_counter) -> None:
        self.lineup, self.store, self.decision_log = lineup, store, decision_log
        # How far ahead of when JetStream stored it a decision read back may say it was served (`add_logged`).
        self.max_future_ms = None if max_future_s is None else int(max_future_s * 1000)
        self.rewards = dict(rewards)
        self.silences = SilenceLearning(self, silence_reward, silence_after_s) if silence_reward is not None else None
        self.positives_only = PositivesOnly(silence_learned=silence_reward is not None)
        self.window_ms = int(window_s * 1000)
        # `clock`: the wall clock, for times compared with decision ids and the log's stored times.
        # `timer`: a monotonic one, for durations measured here (a snapshot's cost, their spacing).
        self.clock, self.timer = clock, timer
        self.joins = JoinCache(int(cache_mb * 1024 * 1024))
        self.replaying = False  # DECISIONS is read back after a start, into `joins.replayed` (`caught_up`)
        # The join window is judged in FEEDBACK's time, not this clock's: feedback stored later
        # than the window after its decision is expired. While FEEDBACK is behind (a restart after
        # an outage, a rebuild from the log), the clock would expire decisions whose feedback,
        # stored within the window, is still to be read. `feedback_read`: the FEEDBACK ingest's
        # progress (the service's); `_feedback_from_ms`: how far FEEDBACK had been read at the
        # snapshot restored.
        self.feedback_read = ReadUpTo(caught_up=True)
        self._feedback_from_ms = 0
        # No snapshot at the start (a first start, a rebuild from the log): no `tip_scores` row
        # exists, so every decision re-read gets its row, however old. With a snapshot, one
        # before the window is skipped: re-marking it without its credits would erase its rewards.
        # Until DECISIONS has caught up (`caught_up`), snapshots say so: a rebuild stopped half way
        # goes on as a rebuild, its credits restored however old.
        self.rows_to_rebuild = False
        # The DECISIONS sequence the restored checkpoint had read to: every decision up to it has its
        # `tip_scores` row, written in that checkpoint's transaction or before (a position moves only
        # past decisions whose rows are marked). Marked again at each start, the whole join window's
        # rows (27k after 45 min of `--demo 100`; ~100k with the cache full) waited in memory for one
        # checkpoint: +90 MB resident after a restart, and a first checkpoint of seconds. Set by the
        # service before DECISIONS is read back; 0 (a rebuild, a stream replaced): every row again.
        self.rows_written_upto = 0
        # Feedback whose decision has not come, timed on this clock, or in FEEDBACK's time while
        # FEEDBACK is read back (`_waiting_now`); its stored time in FEEDBACK stamps the reward when
        # the decision comes (see `_credit`).
        self.waiting = WaitingFeedback(pending_max, pending_max_age_s)
        # While FEEDBACK is read back (a rebuild, a restart), feedback that reached FEEDBACK before its
        # decision could be joined waits as it did live, though DECISIONS was read further and holds
        # it: (when the decision became joinable, order, decision id), credited once FEEDBACK's time
        # passes that (`_release_due`). Credited at once, its reward was learned in another order
        # than live (`_joinable_ms`).
        self._due: list[tuple[int, int, str]] = []
        self._due_seq = 0
        self._feedback_seen_ms = 0  # the stored time of the newest feedback the learner has seen
        # Credits restored at the start (their rows stay), until their decision is served or re-read; with the
        # decision's users, for a forget meanwhile (`forget_user`).
        self._restored_credits: dict[str, Restored] = {}
        self.credit_log = CreditLog()  # what the snapshots save of the credits: the new ones
        self.credited = 0
        self.model_learning = ModelLearning()
        # Read when scraped, not set as they change.
        JOIN_CACHE.set_function(lambda: len(self.joins))
        # With those read ahead of FEEDBACK, which `room_for` counts against the budget too (not `evict`: none leaves).
        JOIN_CACHE_BYTES.set_function(lambda: self.joins.bytes + self.joins.ahead_bytes)
        PENDING.set_function(lambda: len(self.waiting))
        self._changed = False  # since the last snapshot taken
        self.snapshots = SnapshotBook(snapshot_every_s)
        self._learn_seq = 0  # rewards learned so far; the models in SQL hold `snapshots.models_saved_seq` of them
        # Users being forgotten (`app/erasure.py`) -> when: their decisions made until then are no longer
        # held, also read back from DECISIONS (a start re-reads it) before their messages are deleted.
        self.erasing: dict[str, int] = {}
        # The newest time in the id of a decision /score served or the join cache held (one read back at a start):
        # a request to forget a user acted on now covers every decision made before it, also once NTP has stepped
        # the wall clock back past their times (`Eraser._acted_on_at`).
        self.decisions_until_ms = 0
        # Decisions made from here on (their id's time) were made in this run: no snapshot holds their credits.
        self.started_ms = int(clock() * 1000)

    # -- decisions ---------------------------------------------------------------------------

    def served(self, decision_id: str, payload: bytes, decision: dict[str, Any], spooled: bool = False) -> None:
        """A decision /score has just answered with (and queued for the log), or one served before
        this start that the stop spooled (`decision_spool`, `spooled`): the DECISIONS re-read may hold
        that one already (it landed, its acknowledgement lost), and a second entry would shadow its credits."""
        now_ms = int(self.clock() * 1000)
        # A decision served now has its id's time from this clock; only a spooled one's is read from its id.
        served_ms = (decision_time_ms(decision_id) or now_ms) if spooled else now_ms
        self.decisions_until_ms = max(self.decisions_until_ms, served_ms)
        if self.joins.get(decision_id) is None:
            created = now_ms
            if spooled:
                # From when it was served, as a re-read one is (`add_logged`): held from the start, it
                # took feedback that the run without a stop had expired (NATS away longer than the
                # window), and past the window its credits were not restored, so its silence was learned
                # again.
                created = min(decision_time_ms(decision_id) or now_ms, now_ms)
                if created < self.window_end_ms() - self.window_ms:
                    return
                if self.erasing and self._forgotten(decision, created):
                    return  # a user being forgotten: its acknowledgement gives it no row either (`published`)
            entry = Entry(payload, self.store.positions.get("DECISIONS", 0), created, decision)
            if self._restored_credits:
                self._adopt_credits(decision_id, entry)
            self._insert(decision_id, entry)
            if decision_id in self.waiting.by_decision:  # a spooled one's reaction, read by the start before it
                self._credit_waiting(decision_id, entry, 0)

    def published(self, decision_id: str, payload: bytes | None = None) -> None:
        """JetStream acknowledged a decision served here: it is in the log, so it gets its row.

        Also one the join cache let go while it waited for JetStream (memory budget): the
        DECISIONS position moves past it now, so no re-read would ever write its row. Looked for in the
        read-back's segment too: a spooled one the start's re-read brought before it was served again is
        held there, logged, its row holding its restored credits, which a row marked anew would lose."""
        # With the credits it was let go with, if the memory budget let it go first: marked without them, its row
        # lost rewards a rebuild's holds.
        credits, rewarded_ms = self.joins.let_go_unlogged.pop(decision_id, (None, None))
        entry = self.joins.get(decision_id)
        if entry is not None:
            if not entry.logged:
                entry.logged = True
                self._mark_row(entry)
                entry.decision = None
        elif payload is not None:
            decision = orjson.loads(payload)
            if not (self.erasing and self._forgotten(decision, decision_time_ms(decision_id) or 0)):
                self.decision_log.mark(tip_score_row(decision, payload, credits, rewarded_ms))

    def room_for(self, sizes: list[int]) -> int:
        """How many of the decisions read back of these sizes (bytes) the join cache holds beside those it holds now,
        or all once FEEDBACK has caught up: more, and the oldest would leave it before FEEDBACK had read their
        feedback, where live found them held (the DECISIONS ingest's `room`)."""
        if self.feedback_read.caught_up:
            return len(sizes)
        left = self.joins.limit - self.joins.bytes - self.joins.ahead_bytes
        for taken, size in enumerate(sizes):
            left -= size + ENTRY_OVERHEAD
            if left < 0:
                return taken
        return len(sizes)

    @property
    def feedback_ms(self) -> int:
        """The stored time of the newest feedback read, in this run or before the restart."""
        return max(self._feedback_from_ms, self.feedback_read.stored_ms)

    def window_end_ms(self) -> int:
        """The time the join window ends at: now, or while FEEDBACK is behind, its own time."""
        now_ms = int(self.clock() * 1000)
        return now_ms if self.feedback_read.caught_up else min(now_ms, self.feedback_ms)

    def _restorable_from_ms(self) -> int:
        """The oldest decision time a start keeps credits for (`restore`): the join window ending at
        FEEDBACK's time (the stored time of the newest feedback read), or at now's if that is earlier."""
        return min(int(self.clock() * 1000), self.feedback_ms) - self.window_ms

    def add_logged(self, logged: LoggedDecision, reply: bytes | None = None) -> bool:
        """The DECISIONS ingest's sink: a decision read back from the stream (`reply`, its ack
        subject, says when JetStream stored it)."""
        entry = self.joins.get(logged.id)
        if entry is None:
            stored = stored_ms(reply) if reply is not None else 0
            # Joinable for the window from its creation, not from when it was read back: another
            # publisher's (no time in its id) from when JetStream stored it. Held from each read,
            # every start read it back and held it a window more, so the DECISIONS position saved
            # never passed it and every start re-read all of DECISIONS logged since, FEEDBACK behind.
            timed = decision_time_ms(logged.id)
            if stored and self.max_future_ms is not None and (
                    refusal := served_after_stored(logged.id, timed, stored, self.max_future_ms)) is not None:
                raise Refused(refusal)
            self.decisions_until_ms = max(self.decisions_until_ms, timed or 0)
            # Let go with credits, and read again: another publisher's stored again (made when first stored), or any
            # during a start's read-back, which holds again what it reads (a copy stored twice, the spool's).
            earlier = self.joins.let_go_credited.pop(logged.id, None)
            first_stored = earlier[2] if earlier is not None and timed is None else 0
            created = timed or first_stored or stored or None
            now_ms = int(self.clock() * 1000)
            if self.erasing and self._forgotten(logged.parsed(), created or now_ms):
                return False
            if created is not None and not self.rows_to_rebuild and created < self.window_end_ms() - self.window_ms:
                return False  # replayed from before the join window: nothing can join it any more
            if (timed is not None and timed <= self.joins.evicted_upto_ms
                    and (not self.replaying or timed >= self.started_ms)
                    and logged.id not in self.waiting.by_decision):
                # The cache let it go, or one made after it: feedback naming it is `expired` (`_wait`). Held
                # again, it came back without its credits (let go before JetStream's ack, in an outage, and
                # read back after the reconnect): a reaction sent again, or its silence, was learned twice.
                # Feedback waiting for it says it was never held here. A start's re-read holds one made before
                # the start still: its credits are restored then. Not one served since, let go before the re-read
                # reached it (/score's, served meanwhile, read last): its credits are this run's.
                # Another tipstream's, never held, has no row yet; one of ours gets this row from its ack too.
                restored = self._restored_credits.pop(logged.id, None)
                credits, rewarded_ms = (earlier[:2] if earlier is not None else restored[:2] if restored is not None
                                        else self.joins.let_go_unlogged.get(logged.id, (None, None)))
                self.decision_log.mark(tip_score_row(logged.parsed(), logged.data, credits, rewarded_ms))
                return True
            entry = Entry(logged.data, self.store.positions.get("DECISIONS", 0),
                          min(created, now_ms) if created is not None else now_ms, logged.body,
                          stored_ms=first_stored or stored)
            self._adopt_credits(logged.id, entry)
            if earlier is not None:
                entry.credits, entry.rewarded_ms = earlier[0], earlier[1]
                self.joins.note_credited(logged.id, entry)
            # Stored past FEEDBACK's time: held apart until FEEDBACK's time reaches it (`JoinCache.ahead`).
            ahead = self.replaying and not self.feedback_read.caught_up and stored > self._feedback_time_ms()
            if not ahead:
                self._release_ahead()  # those stored before it go in front of it
            self._insert(logged.id, entry, replayed=self.replaying, ahead=ahead)
        elif entry.logged:
            return False  # a redelivery
        entry.logged = True
        if reply is None or self.rows_to_rebuild or ack_fields(reply)[0] > self.rows_written_upto:
            self._mark_row(entry)
        entry.decision = None
        if logged.id in self.waiting.by_decision:
            joinable_ms = self._joinable_ms(logged.id, entry)
            # FEEDBACK had not reached it yet, live. Unless the cache let it go as it came (larger than its whole
            # budget): live credited it with the decision in hand, and deferred, it was found gone when due.
            if (not self.feedback_read.caught_up and joinable_ms > self._feedback_time_ms()
                    and self.joins.get(logged.id) is entry):
                self._defer(logged.id, joinable_ms)
            else:
                self._credit_waiting(logged.id, entry, joinable_ms)
        return True

    @staticmethod
    def _joinable_ms(decision_id: str, entry: Entry) -> int:
        """When feedback could first join this decision, live, in FEEDBACK's time. One of ours (a
        time in its id): from before any feedback could name it (0), as /score served it. Another
        publisher's: once JetStream had stored it and the DECISIONS ingest read it (0: not known)."""
        return 0 if decision_time_ms(decision_id) is not None else entry.stored_ms

    def _defer(self, decision_id: str, joinable_ms: int) -> None:
        self._due_seq += 1
        heapq.heappush(self._due, (joinable_ms, self._due_seq, decision_id))

    def _release_due(self, upto_ms: float | None = None) -> None:
        """Credit the feedback deferred for decisions joinable (live) by FEEDBACK's time, all once
        FEEDBACK has caught up (or by `upto_ms`: `_leaving`), in the order they became joinable: live,
        the decision's arrival credited it there."""
        due = self._due
        if upto_ms is None:
            upto_ms = math.inf if self.feedback_read.caught_up else self._feedback_time_ms()
        while due and due[0][0] <= upto_ms:
            joinable_ms, _, decision_id = heapq.heappop(due)
            entry = self.joins.get(decision_id)
            if entry is not None:
                self._credit_waiting(decision_id, entry, joinable_ms)

    def _credit_waiting(self, decision_id: str, entry: Entry, joinable_ms: int) -> None:
        if self.silences is not None and joinable_ms:
            self.silences.release_before_joined(joinable_ms)
        waiting = self.waiting.take(decision_id)
        gave_up_before_ms = joinable_ms - self.waiting.max_age_s * 1000
        for (tip_id, _), (reaction, _, user_id, stored_at_ms) in (waiting or {}).items():
            if stored_at_ms is not None and 0 < stored_at_ms < gave_up_before_ms:
                # Live, it gave up waiting before the decision came (`pending_max_age_s`): a replay
                # that reads the decision first must not learn it either.
                _OUTCOME["unknown_decision"].inc()
                continue
            self._credit(decision_id, entry, tip_id, reaction, user_id, stored_at_ms)

    def _adopt_credits(self, decision_id: str, entry: Entry) -> None:
        """What the restored snapshot credited to this decision: a feedback replayed or re-sent is a
        duplicate, and its row keeps the rewards. Also for a spooled decision, served here again:
        its feedback could be credited before JetStream ever acknowledged it."""
        credits = self._restored_credits.pop(decision_id, None)
        if credits is not None:
            entry.credits, entry.rewarded_ms, users = credits
            self.joins.note_credited(decision_id, entry)
            if decision_time_ms(decision_id) is None:
                # No time in its id: held for a window from when JetStream stored it, or from now
                # when that is not known (`add_logged`), so its credits are saved again now, else
                # they could leave with the minute they were given in while it is held, and the
                # next start would read it back without them.
                self.credit_log.credit(decision_id, entry.credits, entry.rewarded_ms, int(self.clock() * 1000),
                                       users=users)

    def caught_up(self) -> None:
        """DECISIONS has been read back to its end after a start: the decisions it brought go in
        front of those served meanwhile, which are newer (called by the DECISIONS tail)."""
        if not self.replaying:
            return
        self.replaying = False
        self.joins.end_read_back()
        self.rows_to_rebuild = False
        self.rows_written_upto = 0  # the start's read-back only: a stream re-created later starts over at 1
        # Those read ahead of FEEDBACK, still behind, wait for it still (`_release_ahead` joins the two then): in the
        # cache at once, the oldest decisions left it before FEEDBACK read their reactions, where live held them.
        self._release_ahead()
        if not self.joins.ahead:
            self.joins.join_replayed()

    def feedback_caught_up(self) -> None:
        """FEEDBACK has been read to its end after a start: the feedback deferred (`_defer`) and the decisions read
        ahead of it wait no more. Left to the next snapshot, a reaction found with another publisher's decision read
        ahead was credited after FEEDBACK's position had passed it (/readyz 200, the stream read to its end), and
        after reactions stored meanwhile."""
        if self._due:
            self._release_due()
        self._release_ahead()

    def _release_ahead(self) -> None:
        """The decisions read ahead that FEEDBACK's time has reached join the cache (all, once FEEDBACK has caught
        up), and make room as they would have, read then."""
        if not self.joins.ahead:
            return
        last = self.joins.release_ahead(math.inf if self.feedback_read.caught_up else self._feedback_time_ms())
        if last is not None:
            self._changed = True
            horizon = min(last.added_ms, self.window_end_ms()) - self.window_ms
            self.joins.evict(horizon, self._leaving if self._due else None)
            if not self.replaying and not self.joins.ahead:
                self.joins.join_replayed()  # DECISIONS caught up before FEEDBACK: held back until now (`caught_up`)

    def _insert(self, decision_id: str, entry: Entry, replayed: bool = False, ahead: bool = False) -> None:
        self.joins.add(decision_id, entry, replayed, ahead)
        self._changed = True
        if self.silences is not None and not entry.credits:  # credited before a restart: answered already
            self.silences.watch(decision_id, entry)
        # While feedback is deferred (`_defer`, a read-back): what is due for a decision the cache lets go is
        # credited first (`_leaving`).
        horizon = min(entry.added_ms, self.window_end_ms()) - self.window_ms
        self.joins.evict(horizon, self._leaving if self._due else None)

    def _leaving(self, decision_id: str, entry: Entry) -> None:
        """The join cache lets this decision go (its memory budget): the feedback deferred for it is credited now,
        after what was due before it (`_release_due`). Released when FEEDBACK's time reached the decision, it found
        it gone and stayed waiting, to be given up (`unknown_decision`) where live had credited it as it came.

        Read back, DECISIONS folds every decision stored until FEEDBACK's next message before that message moves
        FEEDBACK's time on (`ReadUpTo.wanted_ms`), and all of them once FEEDBACK has reached its end (`room_for`),
        whatever the cache's room: more of them after the decision than the cache holds (stored in one millisecond,
        or with no feedback between), and it left first. FEEDBACK has then been read up to them, so this is the
        decision's place among the rewards, as live. (Decisions /score serves during a start's read-back can also
        push it out earlier: credited then, not lost.)"""
        if decision_id in self.waiting.by_decision:
            self._release_due(self._joinable_ms(decision_id, entry))

    def _mark_row(self, entry: Entry) -> None:
        decision = entry.decision if entry.decision is not None else orjson.loads(entry.data)
        self.decision_log.mark(tip_score_row(decision, entry.data, entry.credits, entry.rewarded_ms))

    def _forgotten(self, decision: dict[str, Any], created_ms: int) -> bool:
        """Whether `decision` was made for a user being forgotten, before the request was acted on."""
        until = self.erasing.get(decision.get("user_id"))  # type: ignore[arg-type]
        return until is not None and created_ms <= until

    async def decisions_to_forget(self, user_id: str, at_ms: int) -> list[str]:
        """Forgetting `user_id` as of `at_ms`, first: the ids of their decisions the join cache holds,
        made until then. Looked over in turns, the event loop running between (`JoinCache.decisions_of`);
        those read back meanwhile, and later (a start re-reads DECISIONS), are not held while `erasing`
        names them. Nothing is dropped yet (`forget_user`)."""
        self.erasing[user_id] = at_ms
        return await self.joins.decisions_of(user_id, at_ms, FORGET_SCAN_CHUNK)

    def served_mark(self) -> str | None:
        """Where the decisions /score serves from now on begin in the join cache (`served_since`)."""
        return self.joins.mark()

    def served_unmark(self) -> None:
        """The look `served_mark` began has ended, `served_since` reached or not (`JoinCache.unmark`)."""
        self.joins.unmark()

    def served_since(self, mark: str | None, user_ids: frozenset[str], until_ms: int) -> dict[str, list[str]]:
        """The ids of the decisions of `user_ids` held since `mark` (`served_mark`), made until `until_ms`, by
        user: those /score served while the cache was looked over (`decisions_to_forget`), and those a start's
        read-back of DECISIONS brought meanwhile, made after the look began (`erasing` let them in), for
        `forget_user`."""
        return self.joins.added_since(mark, user_ids, until_ms)

    def forget_user(self, user_id: str, at_ms: int, theirs: list[str]) -> dict[str, int]:
        """Then, in one go, nothing read between, as of `at_ms` (now, after the look): their reactions
        waiting for a decision, their own features in every model (`Lineup.forget_user`) and `theirs`
        (`decisions_to_forget`, and `served_since` for those served during the look) still held; what went,
        as the request's report counts it: the decisions held, and those whose credits a start restored, not
        read back yet (held by no cache, but theirs: `forget-status` said nothing of them). A reaction of
        theirs read while the cache was looked over was learned by then: forgotten first, their features came
        back with it. Feedback of theirs naming a decision that went counts as `unknown_decision`."""
        self.erasing[user_id] = at_ms
        self.waiting.drop_user(user_id)
        self.lineup.forget_user(user_id)
        # The models changed without a reward: saved by the next snapshot, which is taken at once.
        self._learn_seq += 1
        self._changed = True
        self.snapshot_at_next_checkpoint()
        gone, credited = self.joins.drop(theirs)
        # The credits a start restored for their decisions not served or read back yet, held by no cache looked
        # over: a copy stored again after the request was done (its publisher sending again) came back with their
        # rewards. All made before this start, so before `at_ms`. Those saved without their users (by a release
        # from before they were) cannot be told theirs, and stay (`credit_log.Restored`).
        restored = [decision_id for decision_id, (_, _, users) in self._restored_credits.items()
                    if users is not None and user_id in users]
        for decision_id in restored:
            del self._restored_credits[decision_id]
        # What their reactions credited, saved by the minute for the join window (`credit_log`); by the users saved
        # with them too, those of decisions no cache holds any more (`CreditLog.forget`).
        self.credit_log.forget(credited.union(restored), {user_id: at_ms})
        if self.silences is not None:
            self.silences.drop(gone)
        return {"decisions_held": len(gone), "restored_credits": len(restored)}

    # -- feedback ----------------------------------------------------------------------------

    def feedback_sink(self) -> Callable[..., bool]:
        """The FEEDBACK ingest's sink: fold the event, then let the learner see it.

        The learner sees every event, also those the fold already held: a checkpoint can save
        a user's state with events past the saved position, and those events must still reach
        a learner restored from that checkpoint. Credits keep the learning idempotent.
        `reply` is the message's ack subject, which says when JetStream stored it (`on_feedback`).
        """
        apply, on_feedback = self.store.apply, self.on_feedback

        def sink(event: Any, reply: bytes | None = None) -> bool:
            new = apply(event)
            if reply is None or event.type != "tip.reacted":
                on_feedback(event, new)
            else:
                stored_at_ms, delivered = delivery(reply)
                on_feedback(event, new, stored_at_ms, delivered > 1)
            return new

        return sink

    def on_feedback(self, event: Any, new: bool = True, stored_at_ms: int | None = None,
                    redelivered: bool = False) -> None:
        """`stored_at_ms`: when JetStream stored the feedback; it stamps the reward (`rewarded_at`),
        so that a replay of the log (a rebuild) stamps it as the first pass did. `redelivered`: JetStream
        delivers it again (its ack lost)."""
        behind = not self.feedback_read.caught_up
        if stored_at_ms is not None:
            self._feedback_seen_ms = max(self._feedback_seen_ms, stored_at_ms)
        if self._due:
            self._release_due()
        self._release_ahead()  # the decisions stored before this reaction: held then, live
        if self.silences is not None and stored_at_ms is not None:
            self.silences.release(stored_at_ms)  # those due before this reaction was stored
        data = event.data
        decision_id = data.decision_id
        if decision_id is None:
            if new:
                _OUTCOME["no_decision"].inc()
            return
        entry = self.joins.get(decision_id)
        if entry is None:
            self._wait(decision_id, data.tip_id, data.reaction, event.user_id, stored_at_ms, redelivered)
            return
        if stored_at_ms is not None:
            joinable_ms = self._joinable_ms(decision_id, entry)
            if joinable_ms > stored_at_ms and not (entry.credits and data.tip_id in entry.credits):
                if stored_at_ms < joinable_ms - self.waiting.max_age_s * 1000:
                    # It gave up waiting before the decision came, live (`_credit_waiting` judges so).
                    # Read back, held until FEEDBACK's time reached the decision, it took the place of a
                    # reaction to its tip stored since, which live was credited (counted a duplicate and
                    # lost); delivered again live (its ack lost), it was credited by this run only.
                    _OUTCOME["unknown_decision"].inc()
                    return
                if behind:
                    # Read back after its decision, but it reached FEEDBACK before the decision could be
                    # joined: live it waited, and was learned when the decision came.
                    if self._hold(decision_id, data.tip_id, data.reaction, event.user_id, stored_at_ms):
                        self._defer(decision_id, joinable_ms)
                        self._expire_waiting()  # within `pending_max`, as any feedback held
                    return
        self._credit(decision_id, entry, data.tip_id, data.reaction, event.user_id, stored_at_ms)

    def _wait(self, decision_id: str, tip_id: str, reaction: str, user_id: str, stored_at_ms: int | None,
              redelivered: bool = False) -> None:
        created = decision_time_ms(decision_id)
        # Past the join window too: nothing can join it any more (a start skips such decisions),
        # so it waited and was counted unknown.
        if created is not None and (created <= self.joins.evicted_upto_ms or self._past_window(created, stored_at_ms)):
            if not self._past_window(created, stored_at_ms):
                tell_let_go(self.joins, decision_id, created, stored_at_ms)
            _OUTCOME["expired"].inc()
            return
        # Give up first on what waited its age: read back, FEEDBACK's time moves with each message, and a
        # reaction given up live still held here took the place of this one to its tip (a duplicate).
        self._expire_waiting()
        if (redelivered and stored_at_ms is not None and not self.waiting.holds(decision_id, tip_id, user_id)
                and stored_at_ms < self._waiting_now() * 1000 - self.waiting.max_age_s * 1000):
            # Delivered again (its ack lost) after it gave up waiting: it can no longer count (a decision
            # coming now came too late for it, `_credit_waiting`), and held again it took the place of a
            # reaction to the same tip sent since, which was counted a duplicate and never learned. Only
            # what JetStream says it delivers again: live, its stored time (NATS's clock) is compared with
            # this clock, and with NATS's behind by more than the age, every first delivery would count.
            _OUTCOME["unknown_decision"].inc()
            return
        if self._hold(decision_id, tip_id, reaction, user_id, stored_at_ms):
            self._expire_waiting()

    def _hold(self, decision_id: str, tip_id: str, reaction: str, user_id: str | None,
              stored_at_ms: int | None) -> bool:
        """Hold feedback until its decision can be joined; False for one of its user's to this tip held already
        (a redelivery, or re-sent). Another user's held does not shut it out: only the decision says whose is
        the wrong one."""
        if self.waiting.holds(decision_id, tip_id, user_id):
            _OUTCOME["duplicate"].inc()
            return False
        self.waiting.hold(decision_id, tip_id, (reaction, self._waiting_now(), user_id, stored_at_ms))
        self._changed = True
        _OUTCOME["waiting"].inc()
        return True

    def _waiting_now(self) -> float:
        """The time feedback waits in (`pending_max_age_s`): this clock's, live; at a start, until
        FEEDBACK and DECISIONS have both caught up, FEEDBACK's (the stored time of the newest
        feedback read, capped by the clock). Live, a reaction waited until the clock was the age past
        when it came, its decision coming meanwhile or never. Read back, the time that passes is
        the log's: by the clock, a read-back stalled past the age (the database or NATS away, ingest
        paused for checkpoints) gave up on feedback whose decision DECISIONS was still to bring, or
        had brought and FEEDBACK had not reached yet (`_defer`), and lost rewards live learned. The
        clock's again only once DECISIONS has caught up too: FEEDBACK can reach its end first, and
        feedback read back from longer ago than the age would be given up at once, its decision
        maybe still to be read. FEEDBACK follows DECISIONS at a start, so by FEEDBACK's time a
        decision that came in time has been read. Feedback held at the start (`restore`) waits from
        the clock's time then, which FEEDBACK's only reaches later."""
        now = self.clock()
        feedback_ms = self._feedback_time_ms()
        if (self.feedback_read.caught_up and not self.replaying) or not feedback_ms:  # not known: the clock's
            return now
        return min(now, feedback_ms / 1000)

    def _feedback_time_ms(self) -> int:
        """FEEDBACK's time: the stored time of the newest feedback read, to the message (`feedback_ms`
        moves by chunk, as a snapshot's position does)."""
        return max(self.feedback_ms, self._feedback_seen_ms)

    def _expire_waiting(self) -> None:
        now = self._waiting_now()
        if self._due:
            # Deferred feedback whose decision FEEDBACK's time has reached is credited first, in its
            # order: given up for its age here, it was learned live (`_credit_waiting` judges that).
            self._release_due()
        self._release_ahead()
        if self.silences is not None:
            self.silences.release(self.silences.horizon_ms())
        expired = self.waiting.expire(now)
        if expired:
            self._changed = True  # else saved as waiting still: a restart held them again, and gave up again
            _OUTCOME["unknown_decision"].inc(expired)
            tell_gave_up(expired, self.waiting.max_age_s, self.waiting.last_given_up)

    async def before_snapshot(self) -> None:
        """The checkpointer's, before it takes the snapshots: the silences due by the clock, in turns
        of the loop (`snapshot` learns them in one)."""
        if self.silences is not None:
            await self.silences.learn_in_turns(self.silences.horizon_ms)

    def expire(self) -> None:
        """Give up on feedback that waited too long (each checkpoint's `snapshot` does this too)."""
        self._expire_waiting()

    def _past_window(self, decision_ms: int, stored_at_ms: int | None) -> bool:
        """Feedback JetStream stored more than the join window after its decision: `expired`,
        in FEEDBACK's time, whether the cache holds the decision still or not."""
        return stored_at_ms is not None and decision_ms < stored_at_ms - self.window_ms

    def _credit(self, decision_id: str, entry: Entry, tip_id: str, reaction: str, user_id: str | None,
                stored_at_ms: int | None = None) -> None:
        if self._past_window(entry.added_ms, stored_at_ms):
            # As once the cache has let the decision go. It lets decisions go only when one is
            # added or a snapshot is taken, so on an idle service, or within a read-back of FEEDBACK
            # (a restart, a rebuild), such a reaction was learned where the live run had expired it.
            _OUTCOME["expired"].inc()
            return
        if self.silences is not None and stored_at_ms is not None and not entry.credits:
            due_ms = self.silences.due_ms(decision_id, entry)
            if due_ms < stored_at_ms:
                # Stored after the wait, for one of our decisions that reached DECISIONS only after it
                # (spooled at a stop, published at the next start): a rebuild reads the decision after
                # this reaction, which waited for it, but live the decision was served before, and its
                # silence learned first (`SilenceLearning.release`): so here too, and the reaction is late.
                self.silences.learn_before_reaction(decision_id, entry, due_ms)
        credits = entry.credits
        decision = entry.decision
        if credits is not None and tip_id in credits:
            if user_id is not None:  # parsed only for a credited tip's reactions, rare but for replays
                decision = decision if decision is not None else orjson.loads(entry.data)
                if user_id != decision["user_id"]:
                    # Another user's reaction is told as such, before or after the decision's own.
                    _OUTCOME["wrong_user"].inc()
                    tell_wrong_user(user_id, decision_id, decision)
                    return
            silenced = self.silences is not None and self.silences.silenced(decision_id, entry)
            _OUTCOME["late" if silenced else "duplicate"].inc()
            return
        decision = decision if decision is not None else orjson.loads(entry.data)
        candidate = next((c for c in decision["ranked"] if c["tip_id"] == tip_id), None)
        if candidate is None:
            _OUTCOME["unknown_tip"].inc()
            tell_unknown_tip(tip_id, decision_id, decision)
            return
        if user_id is not None and user_id != decision["user_id"]:
            _OUTCOME["wrong_user"].inc()
            tell_wrong_user(user_id, decision_id, decision)
            return
        reward = self.rewards[reaction]
        # When the reward reached the log, not when it was credited here: a replay (a restart, a
        # rebuild from the log) credits it again later, and evaluation reads this time as when
        # the reward became known (`evaluation.rewarded_log`); the models forget users who left by
        # it (`user_ttl_days`). The clock only without a stored time.
        rewarded_ms = stored_at_ms if stored_at_ms is not None else int(self.clock() * 1000)
        self._learn(decision_id, entry, decision, candidate, reward, rewarded_ms)
        self.positives_only.note(reward)
        _OUTCOME["credited"].inc()
        if stored_at_ms is not None and self.feedback_read.caught_up and not self.replaying:
            LEARN_DELAY.observe(max(self.clock() - stored_at_ms / 1000, 0.0))

    def _learn(self, decision_id: str, entry: Entry, decision: dict[str, Any], candidate: dict[str, Any],
               reward: float, rewarded_ms: int) -> None:
        """Every live model and the prior learn `reward` for `candidate` of the decision, as served;
        the credit is recorded (the snapshot's credit log, the `tip_scores` row)."""
        tip_id = candidate["tip_id"]
        x = learning_input(decision["features"], candidate)
        self.model_learning.learn(self.lineup.learning, x, reward, rewarded_ms, decision_id, tip_id)
        self.lineup.prior.update(tip_id, reward)
        self._learn_seq += 1
        entry.credits = {**(entry.credits or {}), tip_id: reward}
        entry.rewarded_ms = rewarded_ms
        self.joins.note_credited(decision_id, entry)
        # Its users saved with its credits: a start restores them until the decision is read back, and a forget
        # meanwhile finds theirs by them (`forget_user`).
        self.credit_log.credit(decision_id, entry.credits, entry.rewarded_ms, int(self.clock() * 1000),
                               users=(decision["user_id"],))
        if entry.logged:
            entry.decision = decision
            self._mark_row(entry)
            entry.decision = None
        self.credited += 1
        self._changed = True

    async def unseen_rewards(self, trained_on: TrainedOn) -> list[tuple[dict[str, Any], float, int | None]]:
        """The (features as served, reward, when it reached the log) examples credited here that
        a model trained on the log (`trained_on`) has not seen (`JoinCache.unseen_rewards`).
        A new version learns them before it joins the others (`Lineup._change`), in the same turn
        of the event loop as this returns: nothing credited meanwhile is missed."""
        return await self.joins.unseen_rewards(trained_on, UNSEEN_SCAN_CHUNK)

    # -- checkpoint participant --------------------------------------------------------------

    def snapshot(self, force: bool = False) -> dict[str, Any] | None:
        """Models, prior, credits and waiting feedback, with the positions they reflect.

        `force`: now, whatever changed (a registry change writes one with a new version's
        model, so that a restart does not replay into it what its training already held). Its
        transaction writes no other participant's rows, so the `tip_scores` rows marked go with it
        (`rows`): saved after the credits that marked them, a crash before the next checkpoint
        restored the credits and FEEDBACK's position past their reactions, and a decision read
        back below the checkpoint's DECISIONS position is not marked again, so its row never held them."""
        self.snapshots.confirm(self.credit_log.confirmed)
        now = self.timer()
        if not force:
            # Releases the deferred feedback due (all once FEEDBACK has caught up) and the silences due. Not in
            # a registration's (`force`): the new version has learned what was credited, and joins the others
            # only after this; the rewards learned here, saved as credits, it never learned.
            self._expire_waiting()
        # Credits given before this leave the log (`credit_log.drop_before`, below). The decisions
        # still held from before it (none came since to evict them) leave too, so that the DECISIONS
        # position saved moves past them: read back at the next start, one whose id is not ours
        # (no time in it, so taken back whatever its age) would come back without its credits, its
        # row would lose its rewards and a re-sent feedback would be learned again.
        credits_from_ms = self._restorable_from_ms()
        if not self.rows_to_rebuild:  # a rebuild keeps its credits, however old (`restore`)
            self.joins.evict(credits_from_ms)
        positions = self.store.positions
        # Re-reading from the oldest position any held decision was added at finds them all again.
        front = self.joins.front_position()
        resume = (positions.get("FEEDBACK", 0), front if front is not None else positions.get("DECISIONS", 0))
        gen = self.snapshots.next_gen(now, resume, self._changed, force)
        if gen is None:
            return None
        self._changed = False
        if not self.rows_to_rebuild:
            # From the horizon a start restores credits from, not from now's: until FEEDBACK has
            # caught up, a start judges the window in FEEDBACK's time (`add_logged`), which stays
            # behind while no feedback comes. The decisions it reads back from further than now's
            # window need their credits, else their rows lose their rewards and a re-sent feedback
            # is learned again.
            self.credit_log.drop_before(credits_from_ms)
        state = state_bytes(resume, self.waiting.snapshot(), self.joins.evicted_upto_ms, self.feedback_ms,
                            self.rows_to_rebuild)
        # Models are saved only when they learned since the last snapshot known to be saved.
        with_models = force or self._learn_seq != self.snapshots.models_saved_seq
        models: dict[str, tuple[ModelBytes, int]] = {}
        if with_models:
            models = self.snapshots.models(self.lineup.learning, self.timer)
            self.model_learning.count_users(self.lineup.learning)
        return {
            "gen": gen,
            "learn_seq": self._learn_seq if with_models else None,
            "state": state,
            "credits": self.credit_log.changes(gen),
            "forgotten_credits": self.credit_log.forgotten(gen),
            "forgotten_credit_users": self.credit_log.forgotten_users(gen),
            "prior": self.lineup.prior.to_bytes(),
            "models": models,
            "rows": self.decision_log.snapshot() if force else None,
        }

    def snapshot_at_next_checkpoint(self) -> None:
        """Whatever the spacing of snapshots: at a clean stop, so the next start replays nothing."""
        self.snapshots.last = -math.inf

    write = staticmethod(write_learner_state)

    def saved(self, snapshot: dict[str, Any]) -> None:
        self.snapshots.saved(snapshot)
        if snapshot.get("rows") is not None:
            self.decision_log.saved(snapshot["rows"])

    def restore(self, engine: Engine) -> dict[str, int] | None:
        """Load the last snapshot (worker thread, before ingest starts); the stream positions to
        re-read FEEDBACK and DECISIONS from, or None on a first start."""
        rows = saved_rows(engine)
        self.replaying = True  # until the DECISIONS tail says it has caught up (`caught_up`)
        self.joins.reading_back = True
        # A row cut short or overwritten stops the start with one message naming it and the fixes (each reading
        # below in `reading_learner_row`): it was a ValueError, UnpicklingError or JSONDecodeError traceback.
        if "prior" in rows:
            with reading_learner_row("prior"):
                self.lineup.prior = PopularityPrior.from_bytes(bytes(rows["prior"]))
        if "learner" not in rows:
            self.rows_to_rebuild = True
            return None
        with reading_learner_row("learner"):
            return self._restore_learner(orjson.loads(bytes(rows["learner"])), rows)

    def _restore_learner(self, state: dict[str, Any], rows: dict[str, Any]) -> dict[str, int]:
        # FEEDBACK is read again from the snapshot's position, stored up to its `feedback_ms`
        # (older snapshots: unknown, so the clock's time, as before).
        self._feedback_from_ms = state.get("feedback_ms", int(self.clock() * 1000))
        self._feedback_seen_ms = self._feedback_from_ms
        horizon = self._restorable_from_ms()
        self.rows_to_rebuild = state.get("rows_to_rebuild", False)  # older snapshots: not a rebuild
        credits = self.credit_log.load({name: bytes(data) for name, data in rows.items()})
        if "credits" in state:  # a snapshot from before the credit log held them all itself
            now_ms = int(self.clock() * 1000)
            for decision_id, (rewards, rewarded_ms) in state["credits"].items():
                credits[decision_id] = (rewards, rewarded_ms, None)  # their users not saved then
                self.credit_log.credit(decision_id, rewards, rewarded_ms, now_ms, users=None)  # saved the new way next
        self._restored_credits = {d: c for d, c in credits.items()
                                  if self.rows_to_rebuild or (decision_time_ms(d) or horizon) >= horizon}
        # Waiting feedback waits afresh, else time spent stopped would give up on it before DECISIONS
        # is re-read (the FEEDBACK position is past it, so it would be lost).
        self.waiting.restore(state, self.clock())
        self.joins.evicted_upto_ms = state["evicted_upto_ms"]
        return dict(state["positions"])

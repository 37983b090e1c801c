"""The learner driven through random interleavings of what happens in production, against the contract.

A hypothesis state machine serves decisions (as /score does: `served`, then JetStream's ack, `published`,
or the DECISIONS stream read back, `add_logged`, in either order, or only after a restart), and lets
another publisher serve some (another tipstream, its ids timed, or another service): those reach the
learner only through DECISIONS, once stored, maybe after reactions to them, or after those gave up. It
delivers reactions naming them (the right tip, another candidate, a tip not among them, the wrong user, a
decision nobody served, none; stamped by apps whose clocks are off), redelivers feedback (the same
message again), moves the clock (the checkpointer's ticks as it passes; NTP stepping it back a second or
two), checkpoints, registers versions mid-stream (shadowed, promoted), and crashes: a fresh learner
restored from the last checkpoint saved, DECISIONS then FEEDBACK re-read from the positions it covered, as
`app/bootstrap.py` starts; a clean stop with NATS away spools what JetStream had not acknowledged, served
again at the start and published after. A twin learner gets the same inputs and never crashes. Checked
after every step (docs/learning.md):

- each (decision, tip) is learned at most once since what the models saved held, with the reward of the
  first reaction that counts, or its silence (`TIPSTREAM_SILENCE_REWARD`, on in some runs) for the first
  tip of a decision no reaction was credited to within the wait;
- each feedback delivered is counted under exactly one outcome, the one the contract names (`waiting`
  until it joins or gives up);
- every live model's `n_learned` is the number of rewards learned (a version registered mid-stream: what
  its training held, then every reward learned since);
- the crashing learner has learned what the twin has: the same credits, the same `n_learned`.

Only I/O is stood in for: the streams are lists read by position, the decision log rows a `TipScoresLog`,
the clock a fake, a registration's training a thread; checkpoints go to SQLite through the real
checkpointer. `LEARNER_STATEFUL_EXAMPLES=2000` hunts longer, locally.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import select

from app import db, migrate, scoring
from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoints import Checkpointer
from app.db import make_engine
from app.decisions import LoggedDecision, TipScoresLog
from app.learner import Learner
from app.learning_metrics import FEEDBACK
from app.lineup import Lineup, evaluate_log
from app.registry_store import RegistryStore
from app.scoring import Scorer
from app.settings import DEFAULT_REWARDS
from app.silence_learning import SILENCE_READ_ALLOWANCE_MS
from models.policy import make_policy
from streams.events import parse_event
from streams.read_up_to import ReadUpTo
from streams.store import OnlineStore
from tests.unit.test_scoring_learner import NOW, World

START_S = 1_780_000_000  # the fake clock's start: whole seconds, so stored times are exact
WINDOW_S = 3_600
WAIT_S = 600
PENDING_AGE_S = 60
CACHE_MB_SMALL = 0.01  # a join cache of a few decisions (~1.7 KB each): the budget lets the oldest go
TICK_S = 60  # the checkpointer's ticks (`expire`) while time passes, live
SILENCE = 0.0
OUTCOMES = ("credited", "duplicate", "late", "no_decision", "waiting", "unknown_decision", "expired", "unknown_tip",
            "wrong_user")
USERS = ("u-1", "u-2")
TIPS = ("a", "b", "c")
WHICH = ("first", "second", "not_a_candidate", "wrong_user")
# The event's own time, the app's clock: a phone's can be days behind, or ahead up to what the ingest lets
# through (`TIPSTREAM_MAX_FUTURE_S`, a day). The learner goes by when FEEDBACK stored it (docs:
# "`rewarded_at`"), so none of these changes what is learned.
TIMESTAMPS = (NOW, "2026-11-19T09:00:00+01:00", "2026-11-27T05:00:00Z", "2026-11-26T09:00:00.000-11:00")


def counted() -> dict[str, float]:
    return {n: FEEDBACK.labels(n).value for n in OUTCOMES}


class _FailingStore(SqlCheckpointStore):
    def save(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database is away")


_TEMPLATE: list[Path] = []


def _migrated() -> Path:
    """A database migrated once for the module, copied for each service's first start."""
    if not _TEMPLATE:
        path = Path(tempfile.mkdtemp(prefix="learner-stateful-template-")) / "l.db"
        atexit.register(shutil.rmtree, path.parent, True)
        migrate.upgrade(f"sqlite:///{path}")
        _TEMPLATE.append(path)
    return _TEMPLATE[0]


class Side:
    """One service: a World (learner, lineup, store, decision log), its read positions, what it learned."""

    def __init__(self, path: Path, clock: Any, silence: bool, cache_mb: float) -> None:
        self.path, self.clock, self.silence, self.cache_mb = path, clock, silence, cache_mb
        self.learned: dict[tuple[str, str], tuple[float, int]] = {}  # since what the models saved held
        self.registered: dict[str, tuple[int, int]] = {}  # version -> rewards it held, and those learned, then
        self.saved_learned: dict[tuple[str, str], tuple[float, int]] = {}  # at the last checkpoint saved
        self.start()

    def start(self) -> None:
        """A process's start: its database as the last run left it (a first start: migrated)."""
        if not self.path.exists():
            self.path.mkdir()
            shutil.copy(_migrated(), self.path / "l.db")
        self.world = world = World.__new__(World)  # as `World` wires them, over the database already migrated
        world.url = f"sqlite:///{self.path / 'l.db'}"
        world.engine = make_engine(world.url)
        world.store = OnlineStore()
        world.lineup = Lineup(RegistryStore(world.engine), world.engine, eval_max_rewards=100)
        world.lineup.load("logreg", "logreg", learning_rate=0.1)  # v1 champion, v2 shadow: both learn
        world.log = TipScoresLog()
        world.clock = self.clock
        options = {"silence_reward": SILENCE, "silence_after_s": WAIT_S} if self.silence else {}
        world.learner = self.learner = Learner(
            world.lineup, world.store, world.log, rewards=DEFAULT_REWARDS, cache_mb=self.cache_mb, window_s=WINDOW_S,
            pending_max=100, pending_max_age_s=PENDING_AGE_S, snapshot_every_s=0, clock=self.clock, timer=self.clock, **options)
        world.scorer = Scorer(world.store, world.lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
        world._ids = 0
        # As the service wires a registration: its snapshot is the learner's, the log checkpointed first.
        world.lineup.participants.append(self.learner)
        world.lineup.flush = lambda: self.checkpointer().checkpoint()
        # The training in a process of its own is I/O here: the same `evaluate_log`, in a thread.
        world.lineup._evaluated = self._evaluated  # type: ignore[method-assign]
        self.sink = self.learner.feedback_sink()
        # Outcomes counted by this learner since its start, and what must account for them.
        self.outcomes = dict.fromkeys(OUTCOMES, 0.0)
        self.delivered = 0
        original = self.learner._learn

        def learn(decision_id: str, entry: Any, decision: dict[str, Any], candidate: dict[str, Any],
                  reward: float, rewarded_ms: int) -> None:
            key = (decision_id, candidate["tip_id"])
            assert key not in self.learned, f"{key} learned twice: {self.learned[key]}, now {reward}"
            self.learned[key] = (reward, rewarded_ms)
            original(decision_id, entry, decision, candidate, reward, rewarded_ms)

        self.learner._learn = learn  # type: ignore[method-assign]
        # What the models held when each snapshot was taken: the saved one's is what a restart has.
        taken: dict[int, dict[tuple[str, str], tuple[float, int]]] = {}
        snapshot, saved = self.learner.snapshot, self.learner.saved

        def snapshot_taken(force: bool = False) -> dict[str, Any] | None:
            state = snapshot(force)
            if state is not None:
                taken[state["gen"]] = dict(self.learned)
            return state

        def snapshot_saved(state: dict[str, Any]) -> None:
            self.saved_learned = taken.pop(state["gen"])
            saved(state)

        self.learner.snapshot, self.learner.saved = snapshot_taken, snapshot_saved  # type: ignore[method-assign]

    def count(self, call: Any) -> dict[str, float]:
        """Call, and the feedback outcomes it counted (the metric is the process's: the twin's too)."""
        before = counted()
        call()
        after = counted()
        delta = {n: after[n] - before[n] for n in OUTCOMES if after[n] != before[n]}
        for name, value in delta.items():
            self.outcomes[name] += value
        return delta

    def deliver(self, data: bytes, reply: bytes) -> dict[str, float]:
        self.delivered += 1
        return self.count(lambda: self.sink(parse_event(data), reply))

    def tick(self) -> None:
        self.count(self.learner.expire)

    async def _evaluated(self, params: dict[str, Any], version: str | None = None) -> Any:
        lineup = self.world.lineup
        assert lineup.flush is not None
        await lineup.flush()
        return await asyncio.to_thread(evaluate_log, lineup.engine, lineup.eval_max_rewards, params, version,
                                       lineup.silence_reward)

    def checkpointer(self, fail: bool = False) -> Checkpointer:
        store = (_FailingStore if fail else SqlCheckpointStore)(self.world.engine)
        return Checkpointer(self.world.store, store, every_events=1, every_s=60,
                            participants=[self.learner, self.world.log], lock=self.world.lineup.snapshot_lock)

    def checkpoint(self, fail: bool = False) -> None:
        checkpointer = self.checkpointer(fail)

        def run() -> None:
            try:
                asyncio.run(checkpointer.checkpoint())
            except RuntimeError:
                assert fail

        # Snapshots are spaced by what serialising the models took, timed by the wall clock
        # (`ModelBytes`): every checkpoint here comes after that spacing, so runs are reproducible.
        self.learner.snapshot_at_next_checkpoint()

        self.count(run)

    def accounted(self) -> None:
        """Every feedback delivered (read back too) is counted once, under an outcome that ends its
        way, or waits still; no_decision only for an event the fold had not seen."""
        final = sum(v for n, v in self.outcomes.items() if n != "waiting")
        assert final + len(self.learner.waiting) == self.delivered + self.restored_waiting, (
            self.outcomes, len(self.learner.waiting), self.delivered, self.restored_waiting)

    restored_waiting = 0


class LearnerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="learner-stateful-"))
        self._patched = scoring.new_decision_id

    @initialize(silence=st.booleans(), cache_mb=st.sampled_from([64, CACHE_MB_SMALL]))
    def start(self, silence: bool, cache_mb: float) -> None:
        self.clock = _Clock(START_S)
        ids = itertools.count()
        # Decision ids carry the fake clock's time, as served ones carry the real one.
        scoring.new_decision_id = lambda: f"d-{int(self.clock.now * 1000):012x}{next(ids):016x}"
        self.silence = silence
        # With the join cache at its budget, DECISIONS in the order served: a start holds its decisions in
        # DECISIONS' order, evicting from the oldest, where the run without a stop holds them in the order
        # served, so one published out of order (a retry) or after another service's stored meanwhile
        # leaves at another point, and a reaction to the decision at the edge is credited by one and
        # expired by the other. And no restarts: a start reads DECISIONS before FEEDBACK, so at the budget
        # it holds only the newest of them, and the rewards of older ones learned since the last snapshot
        # (reactions, deferred ones, silences) are not learned again. Noticed, left alone (the budget must
        # hold the window, docs: "The learner").
        self.in_order = cache_mb == CACHE_MB_SMALL
        self.main = Side(self.tmp / "main", self.clock, silence, cache_mb)
        self.twin = Side(self.tmp / "twin", self.clock, silence, cache_mb)
        self.decisions: dict[str, dict[str, Any]] = {}  # served: id -> decision, created ms
        self.order: list[str] = []
        self.pending: list[str] = []  # served, not yet in DECISIONS
        # DECISIONS, (id, stored ms): a position is how many were read. Another publisher's are read by
        # the tail as they are stored (docs: "within a second or two"), so every position covers all before.
        self.stream: list[tuple[str, int]] = []
        self.unstored: list[str] = []  # served by another process, not yet in DECISIONS
        # Reactions to those, as delivered (tip, user, reaction, stored ms): the contract is applied when
        # the decision comes, to those stored within the wait before it.
        self.unjoined: dict[str, list[tuple[str, str, str, int]]] = {}
        self.registered: list[str] = []
        self.feedback: list[tuple[bytes, bytes, int]] = []  # FEEDBACK: (event, ack subject, stored ms)
        self.restarts = 0
        # The contract's model: (decision, tip) -> reward of the first reaction that counts, or the silence.
        self.credits: dict[tuple[str, str], float] = {}
        self.silenced: set[str] = set()
        self.answered_by_ms: dict[str, int] = {}  # decision -> when its first credited reaction was stored

    def teardown(self) -> None:
        scoring.new_decision_id = self._patched
        for side in ("main", "twin"):
            if hasattr(self, side):
                getattr(self, side).world.engine.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.main, self.twin

    def now_ms(self) -> int:
        return int(self.clock.now * 1000)

    # -- decisions ---------------------------------------------------------------------------

    @rule(user=st.sampled_from(USERS))
    def serve(self, user: str) -> None:
        scored = self.twin.world.score(user=user, tips=TIPS, serve=False)
        for side in self.sides:
            side.learner.served(scored.decision_id, scored.payload, scored.decision)
        self.decisions[scored.decision_id] = {"payload": scored.payload, "decision": scored.decision,
                                              "created_ms": self.now_ms()}
        self.order.append(scored.decision_id)
        self.pending.append(scored.decision_id)

    @rule(users=st.lists(st.sampled_from(USERS), min_size=2, max_size=9))
    def serve_while_nats_is_away(self, users: list[str]) -> None:
        """/score answers on and JetStream acknowledges nothing: a join cache at its budget lets go decisions
        still to be published (a few served one by one seldom outnumber it)."""
        for user in users:
            self.serve(user)

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 1_000), how=st.sampled_from(["ack", "read_back", "ack_then_read", "read_then_ack"]))
    def publish(self, pick: int, how: str) -> None:
        """JetStream stores it; the ack comes (`published`), or the DECISIONS tail reads it back, or both."""
        # One the budget let go before JetStream had it (an outage) may be read back too (the ingest after
        # a reconnect): it stays let go, its reactions `expired` (held again, it had lost its credits, and
        # its silence, or a reaction sent again, was learned a second time).
        decision_id = self.pending.pop(0 if self.in_order else pick % len(self.pending))
        self._store(decision_id)
        logged, reply = self._logged(len(self.stream))
        for side in self.sides:
            steps = {"ack": ["ack"], "read_back": ["read"], "ack_then_read": ["ack", "read"],
                     "read_then_ack": ["read", "ack"]}[how]
            for step in steps:
                if step == "ack":
                    side.learner.published(decision_id, logged.data)
                else:
                    side.learner.add_logged(logged, reply)
            side.world.store.advance("DECISIONS", len(self.stream))  # the own tail's position covers it

    def _store(self, decision_id: str) -> None:
        self.stream.append((decision_id, self.now_ms()))

    def _logged(self, seq: int) -> tuple[LoggedDecision, bytes]:
        """DECISIONS' message `seq` as its ingest hands it over: the decision and its ack subject."""
        decision_id, stored = self.stream[seq - 1]
        reply = f"$JS.ACK.DECISIONS.ingest.1.{seq}.{seq}.{stored * 1_000_000}.0".encode()
        return LoggedDecision(decision_id, self.decisions[decision_id]["payload"]), reply

    @rule(user=st.sampled_from(USERS), tipstream=st.booleans())
    def serve_elsewhere(self, user: str, tipstream: bool) -> None:
        """Another publisher answers: its decision reaches this process only through DECISIONS, once
        that publisher has stored it. Another tipstream's id carries when it was made; another
        service's does not, and it counts as made when JetStream stored it (docs: "The learner")."""
        scored = self.twin.world.score(user=user, tips=TIPS, serve=False)
        n = len(self.decisions)
        decision_id = f"d-{self.now_ms():012x}{0xE15E:08x}{n:08x}" if tipstream else f"o-{n}"
        event = orjson.loads(scored.payload) | {"id": decision_id}
        created = self.now_ms() if tipstream else None
        self.decisions[decision_id] = {"payload": orjson.dumps(event), "decision": event, "created_ms": created}
        self.order.append(decision_id)
        self.unstored.append(decision_id)
        self.unjoined[decision_id] = []

    def _storable(self) -> list[str]:
        """Another tipstream's decisions are stored before a reaction to them has given up waiting.
        Stored later, a restart learned those reactions (its re-read, holding the decision first,
        takes an id with a time for one served here, joinable at once) where the run without one
        had given them up: noticed, left alone (the learner cannot tell its own ids of an earlier
        run from another tipstream's)."""
        since = self.now_ms() - PENDING_AGE_S * 1000
        # Nor stored past their join window: a start whose FEEDBACK is behind holds it (the window in
        # FEEDBACK's time) and learns its silence, which the run without a stop, reading it live past
        # the window, skipped. Noticed, left alone (a publisher an hour late).
        window_from = self.now_ms() - WINDOW_S * 1000
        # (A reaction expired, made before the cache's budget let a decision go, counts as given up: a
        # restart's read-back holds the decision first and credits it.)
        return [d for d in self.unstored if d.startswith("o-") or (
            self.decisions[d]["created_ms"] >= window_from and all(at >= since for *_, at in self.unjoined[d]))]

    @precondition(lambda self: self._storable() and not (self.in_order and self.pending))
    @rule(pick=st.integers(0, 1_000))
    def store_elsewhere(self, pick: int) -> None:
        """Its publisher stores it (late, maybe: after reactions to it, after they gave up); the tail
        reads it within a second or two, before the clock's next tick."""
        self._store_elsewhere(pick, self.sides)

    def _store_elsewhere(self, pick: int, sides: tuple[Side, ...]) -> None:
        storable = self._storable()
        decision_id = storable[pick % len(storable)]
        self.unstored.remove(decision_id)
        self._store(decision_id)
        stored = self.stream[-1][1]
        if self.decisions[decision_id]["created_ms"] is None:
            self.decisions[decision_id]["created_ms"] = stored
        reactions = self.unjoined.pop(decision_id)
        for tip, user, reaction, at in reactions:
            # A reaction gives up waiting after the age (`TIPSTREAM_LEARNER_PENDING_MAX_AGE_S`); one that
            # waited less counts, the first to a tip is credited, as though the decision had been there.
            if at >= stored - PENDING_AGE_S * 1000:
                self.expected(decision_id, tip, user, reaction, at)
        logged, reply = self._logged(len(self.stream))
        for side in sides:
            held = len(side.learner.waiting.by_decision.get(decision_id, {}))
            got = side.count(lambda side=side: side.learner.add_logged(logged, reply))
            side.world.store.advance("DECISIONS", len(self.stream))
            assert "waiting" not in got and sum(got.values()) == held, (got, held)

    # -- feedback ----------------------------------------------------------------------------

    def _event(self, user: str, data: dict[str, Any], ts: str = NOW) -> bytes:
        return orjson.dumps({"id": f"f-{len(self.feedback)}", "type": "tip.reacted", "user_id": user, "ts": ts,
                             "data": data})

    def _append(self, event: bytes) -> tuple[bytes, bytes, int]:
        stored = self.now_ms()
        seq = len(self.feedback) + 1
        reply = f"$JS.ACK.FEEDBACK.ingest.1.{seq}.{seq}.{stored * 1_000_000}.0".encode()
        self.feedback.append((event, reply, stored))
        return event, reply, stored

    def _read_live(self, message: tuple[bytes, bytes, int], seq: int | None,
                   sides: tuple[Side, ...] | None = None) -> list[dict[str, float]]:
        event, reply, stored = message
        deltas = []
        for side in sides or self.sides:
            deltas.append(side.deliver(event, reply))
            if seq is not None:
                side.world.store.advance("FEEDBACK", seq)
                side.learner.feedback_read.advance(stored, caught_up=True)
        return deltas

    def expected(self, decision_id: str, tip: str, user: str, reaction: str, stored_ms: int) -> str:
        """The outcome the contract gives a reaction to a decision served here, updating the credits."""
        decision = self.decisions[decision_id]
        created, ranked = decision["created_ms"], decision["decision"]["ranked"]
        if created < stored_ms - WINDOW_S * 1000:
            return "expired"
        first = ranked[0]["tip_id"]
        has_credit = any(d == decision_id for d, _ in self.credits)
        if self.silence and not has_credit and created + WAIT_S * 1000 < stored_ms:
            self.credits[(decision_id, first)] = SILENCE  # learned just before this reaction, if not by a tick
            self.silenced.add(decision_id)
        if (decision_id, tip) in self.credits:
            if user != decision["decision"]["user_id"]:
                return "wrong_user"
            only_silence = decision_id in self.silenced and sum(d == decision_id for d, _ in self.credits) == 1
            return "late" if only_silence else "duplicate"
        if tip not in {c["tip_id"] for c in ranked}:
            return "unknown_tip"
        if user != decision["decision"]["user_id"]:
            return "wrong_user"
        self.credits[(decision_id, tip)] = DEFAULT_REWARDS[reaction]
        self.answered_by_ms.setdefault(decision_id, stored_ms)
        return "credited"

    @precondition(lambda self: self.order)
    @rule(pick=st.integers(0, 1_000), which=st.sampled_from(WHICH), reaction=st.sampled_from(sorted(DEFAULT_REWARDS)),
          ts=st.sampled_from(TIMESTAMPS))
    def react(self, pick: int, which: str, reaction: str, ts: str) -> None:
        self._react(pick, which, reaction, self.sides, ts)

    @precondition(lambda self: self.unstored)
    @rule(pick=st.integers(0, 1_000), wrong_first=st.booleans(), reaction=st.sampled_from(sorted(DEFAULT_REWARDS)))
    def two_users_react_to_a_decision_to_come(self, pick: int, wrong_first: bool, reaction: str) -> None:
        """Another user's reaction (an app's bug, or someone naming another user's decision id) and the
        decision's user's own, to the same tip of a decision still to come: both wait, in either order (in
        one place, the other user's would shut out the own, counted a duplicate and never learned). Rare
        among `react`'s picks, so made here."""
        decision_id = self.unstored[-1 - pick % len(self.unstored)]
        for which in ("wrong_user", "first") if wrong_first else ("first", "wrong_user"):
            self._react(0, which, reaction, self.sides, decision_id=decision_id)

    def _react(self, pick: int, which: str, reaction: str, sides: tuple[Side, ...], ts: str = NOW,
               decision_id: str | None = None) -> None:
        if not self.order:
            return
        if decision_id is None:
            decision_id = self.order[-1 - pick % min(len(self.order), 6)]  # mostly recent decisions
        decision = self.decisions[decision_id]["decision"]
        user = decision["user_id"]
        tip = {"first": decision["ranked"][0]["tip_id"], "second": decision["ranked"][1]["tip_id"],
               "not_a_candidate": "z", "wrong_user": decision["ranked"][0]["tip_id"]}[which]
        if which == "wrong_user":  # also to a decision still to come: it waits beside its user's own
            user = next(u for u in USERS if u != user)
        message = self._append(self._event(user, {"tip_id": tip, "decision_id": decision_id, "reaction": reaction}, ts))
        created = self.decisions[decision_id]["created_ms"]
        if decision_id in self.unjoined and created is not None and any(
                created <= side.learner.joins.evicted_upto_ms for side in sides):
            # Made before a decision the join cache's budget let go: taken for one let go too (docs:
            # "one of ours, whose id says when it was served, is not waited for then").
            for got in self._read_live(message, len(self.feedback), sides):
                assert got == {"expired": 1}, got
            self.unjoined[decision_id].append((tip, user, reaction, 0))  # it counts for nothing
            return
        if decision_id in self.unjoined and (created is None or created >= message[2] - WINDOW_S * 1000):
            # Another publisher's, not in DECISIONS yet: it waits (past the window by its id: expired, below),
            # unless this user's reaction to this tip waits already; another user's does not shut it out.
            sent = any(t == tip and u == user for t, u, *_ in self.unjoined[decision_id])
            self.unjoined[decision_id].append((tip, user, reaction, message[2]))
            held = [side.learner.waiting.holds(decision_id, tip, user) for side in sides]
            for got, was in zip(self._read_live(message, len(self.feedback), sides), held, strict=True):
                assert sent or not was, ("held for another user's reaction", decision_id, tip, user)
                assert got == {"duplicate" if was else "waiting": 1}, (got, was, decision_id, tip)
            return
        # Within the window (past it, a decision may be held still, and is expired all the same).
        held = {side.learner.joins.get(decision_id) is not None for side in sides}
        if created is not None and created >= message[2] - WINDOW_S * 1000:
            assert len(held) == 1, "a restart holds what the twin holds"
        if held == {False} and created is not None and created >= message[2] - WINDOW_S * 1000:
            # The join cache's budget let it go (docs: "`expired` | the decision left the join cache").
            want = "expired"
        else:
            want = self.expected(decision_id, tip, user, reaction, message[2])
        for side, got in zip(sides, self._read_live(message, len(self.feedback), sides), strict=True):
            if want == "expired" and decision_id.startswith("o-") and side.learner.joins.get(decision_id) is None:
                # Let go, it could be one still to come (no time in its id): the reaction waits, then
                # gives up. Docs ("The learner"): "one of ours, whose id says when it was served, is
                # not waited for then".
                assert got in ({"waiting": 1}, {"duplicate": 1}), got
                continue
            assert got == {want: 1}, (want, got, decision_id, tip)

    @rule(unknown=st.integers(0, 2), tip=st.sampled_from(TIPS))
    def react_to_an_unknown_decision(self, unknown: int, tip: str) -> None:
        message = self._append(self._event("u-1", {"tip_id": tip, "decision_id": f"nobody-served-{unknown}",
                                                   "reaction": "acted"}))
        for got in self._read_live(message, len(self.feedback)):
            assert got.get("waiting", 0) + got.get("duplicate", 0) == 1, got
            assert set(got) <= {"waiting", "duplicate", "unknown_decision"}, got

    @rule()
    def react_without_a_decision(self) -> None:
        message = self._append(self._event("u-1", {"tip_id": "a", "reaction": "acted"}))
        for got in self._read_live(message, len(self.feedback)):
            assert got == {"no_decision": 1}, got

    @precondition(lambda self: self.feedback)
    @rule(pick=st.integers(0, 1_000))
    def redeliver(self, pick: int) -> None:
        """JetStream delivers a message again (no ack reached it): the same event id, the same stored time."""
        event, reply, stored = self.feedback[-1 - pick % min(len(self.feedback), 8)]
        reply = reply.replace(b".ingest.1.", b".ingest.2.", 1)  # as JetStream counts its deliveries
        data = orjson.loads(event)["data"]
        decision_id = data.get("decision_id")
        for side, got in zip(self.sides, self._read_live((event, reply, stored), None), strict=True):
            if decision_id is None:  # counted only by a learner whose fold had not seen it (`new`)
                assert got in ({}, {"no_decision": 1}), got
                side.delivered -= not got
                continue
            # Once, and feedback that gave up waiting meanwhile may be counted with it.
            assert sum(got.get(n, 0) for n in OUTCOMES if n != "unknown_decision") <= 1 <= sum(got.values()), got
            assert "credited" not in got, got

    # -- time, checkpoints, restarts -----------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 30, 200, WAIT_S, WAIT_S + 10, 1_800, WINDOW_S + 100]))
    def time_passes(self, seconds: int) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + TICK_S)
            for side in self.sides:
                side.tick()

    @rule(seconds=st.sampled_from([1, 2]))
    def clock_steps_back(self, seconds: int) -> None:
        """NTP steps the host's clock back (JetStream's, on the same host, with it): ids made and
        feedback stored from now on are stamped earlier than some before them. Within the step after
        another service's decision was stored, a reaction to it is stored before it: a restart's read-back
        holds it until FEEDBACK's time passes the decision, as one that came first, where live it was
        joined at once; the outcome is the same, another user's reaction held so waiting beside the
        decision's user's own."""
        self.clock.now -= seconds

    @precondition(lambda self: len(self.registered) < 2)
    @rule(role=st.sampled_from(["", "shadow", "champion"]))
    def register(self, role: str) -> None:
        """`tipstream models register`, mid-stream (then shadowed, or promoted): the new version is
        trained on the log, learns what its training missed, and from then on every reward with the
        others (docs: "Restarts"): so it has learned every reward learned, as they have."""
        version = f"v{3 + len(self.registered)}"
        self.registered.append(version)
        for side in self.sides:
            lineup = side.world.lineup

            async def change(lineup: Lineup = lineup) -> None:
                await lineup.register(version, "logreg", {"learning_rate": 0.1}, actor="t")
                if role:
                    await lineup.set_shadow(version, actor="t")
                if role == "champion":
                    await lineup.promote(version, actor="t")

            side.count(lambda change=change: asyncio.run(change()))
            # Trained on the rewarded rows, then the credits the join cache holds: a reward of a decision
            # the cache let go (its window, its budget) before JetStream acknowledged it is in neither:
            # its row is written without it (`published`). Noticed, left alone (an outage as long).
            with side.world.engine.connect() as conn:
                rows = {d: r or {} for d, r in conn.execute(select(db.tip_scores.c.decision_id, db.tip_scores.c.rewards))}
            missed = sum(side.learner.joins.get(d) is None and t not in rows.get(d, {}) for d, t in side.learned)
            side.registered[version] = (len(side.learned) - missed, len(side.learned))

    @rule(fail=st.sampled_from([False, False, True]))
    def checkpoint(self, fail: bool) -> None:
        """The checkpointer's: both services, the crashing one's transaction failing in some (the database away)."""
        self.main.checkpoint(fail)
        self.twin.checkpoint()

    @precondition(lambda self: not self.in_order)
    @rule(clean=st.booleans(), down_s=st.sampled_from([0, 5, 300, WINDOW_S + 100]),
          while_down=st.lists(st.tuples(st.integers(0, 1_000), st.sampled_from(WHICH),
                                        st.sampled_from(sorted(DEFAULT_REWARDS))), max_size=3),
          spool=st.booleans(), spool_at=st.integers(0, 1_000), stored_while_down=st.booleans())
    def crash_and_restart(self, clean: bool, down_s: int, while_down: list[tuple[int, str, str]], spool: bool,
                          spool_at: int, stored_while_down: bool) -> None:
        """kill -9 (or a clean stop), down a while (FEEDBACK goes on: the twin reads it, and another
        publisher's decisions), then a start."""
        main = self.main
        if clean:  # a clean stop: its last checkpoint, whatever the spacing
            main.learner.snapshot_at_next_checkpoint()
            main.checkpoint()
            self.twin.tick()
        spooled: list[str] = []
        if clean and spool:
            # NATS away at the stop: what JetStream had not acknowledged is spooled, served again at the
            # start and published later (`app/decision_spool.py`); the twin publishes it then too.
            spooled = list(self.pending)
        else:
            # Served and not acknowledged at the stop: it reached JetStream, the ack was lost.
            for decision_id in self.pending:
                self._store(decision_id)
                self.twin.learner.published(decision_id, self.decisions[decision_id]["payload"])
                self.twin.world.store.advance("DECISIONS", len(self.stream))
            self.pending = []
        end = self.clock.now + down_s
        reacting = iter(while_down)
        while True:  # the twin lives on, ticking, reading what FEEDBACK stores; main is down
            for pick, which, reaction in itertools.islice(reacting, 1):
                self._react(pick, which, reaction, (self.twin,))
            if stored_while_down and self._storable():
                stored_while_down = False
                self._store_elsewhere(0, (self.twin,))
            if self.clock.now >= end:
                break
            self.clock.now = min(end, self.clock.now + TICK_S)
            self.twin.tick()
        for pick, which, reaction in reacting:
            self._react(pick, which, reaction, (self.twin,))
        main.world.engine.dispose()
        main.learned = dict(main.saved_learned)
        main.start()
        learner = main.learner
        learner.feedback_read = ReadUpTo()
        resume: dict[str, int] = {}
        main.count(lambda: resume.update(learner.restore(main.world.engine) or {}))
        main.restored_waiting = len(learner.waiting)
        for stream, seq in resume.items():  # as the service's start does
            main.world.store.advance(stream, seq)
        first = resume.get("DECISIONS", 0) + 1
        spool_seq = first + spool_at % (len(self.stream) + 2 - first)  # somewhere in the DECISIONS re-read
        for seq in range(first, len(self.stream) + 2):
            if seq == spool_seq:
                for decision_id in spooled:
                    payload = self.decisions[decision_id]["payload"]
                    main.count(lambda d=decision_id, p=payload: learner.served(d, p, orjson.loads(p), spooled=True))
            if seq <= len(self.stream):
                main.count(lambda seq=seq: learner.add_logged(*self._logged(seq)))  # joins what was restored waiting
                main.world.store.advance("DECISIONS", seq)
        learner.caught_up()
        for seq in range(resume.get("FEEDBACK", 0) + 1, len(self.feedback) + 1):
            event, reply, stored = self.feedback[seq - 1]
            main.deliver(event, reply)
            main.world.store.advance("FEEDBACK", seq)
            learner.feedback_read.advance(stored, caught_up=seq == len(self.feedback))
        learner.feedback_read.advance(0, caught_up=True)
        self.restarts += 1
        for side in self.sides:  # the first tick after the start
            side.tick()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def learned_once_with_the_first_reward_that_counts(self) -> None:
        if not hasattr(self, "main"):
            return
        for side in self.sides:
            for (decision_id, tip), (reward, rewarded_ms) in side.learned.items():
                want = self.credits.get((decision_id, tip))
                if want is not None and not (decision_id in self.silenced and tip == self._first(decision_id)):
                    assert want == reward, (decision_id, tip, want, reward)
                    continue
                # A silence: the first tip, the silence reward, stamped after its wait, no reaction credited within.
                assert self.silence, (decision_id, tip, reward)
                due_ms = self.decisions[decision_id]["created_ms"] + WAIT_S * 1000
                assert tip == self._first(decision_id) and reward == SILENCE and rewarded_ms == due_ms + 1
                assert self.answered_by_ms.get(decision_id, due_ms + 1) > due_ms
            for key, reward in self.credits.items():  # the contract's credits are all learned
                assert key in side.learned, (key, reward)

    def _first(self, decision_id: str) -> str:
        tip: str = self.decisions[decision_id]["decision"]["ranked"][0]["tip_id"]
        return tip

    @invariant()
    def models_learned_what_was_credited(self) -> None:
        if not hasattr(self, "main"):
            return
        for side in self.sides:
            learning = {v: m.n_learned for v, m in side.world.lineup.learning}
            # Each version learns every reward once from its start (v1, v2: the first), a new one from its
            # registration on, after what its training held.
            since = {"v1": (0, 0), "v2": (0, 0)} | side.registered
            want = {v: n + len(side.learned) - at for v, (n, at) in since.items()}
            assert learning == want, (learning, want)

    @invariant()
    def each_feedback_is_counted_once(self) -> None:
        if not hasattr(self, "main"):
            return
        for side in self.sides:
            side.accounted()

    @invariant()
    def a_restart_learns_what_no_restart_learns(self) -> None:
        if not hasattr(self, "main"):
            return
        assert self.main.learned == self.twin.learned
        # A version registered mid-stream starts from the rows SQL holds, which may differ: a decision
        # JetStream acknowledged only after its window, its ack lost in a crash, is skipped by the start's
        # re-read and gets no row (nor its rewards), where the twin, acknowledged, wrote one. Noticed,
        # left alone (an outage longer than the window, then a crash). Each learns the same since.
        learned = [{v: m.n_learned - side.registered.get(v, (0, 0))[0] for v, m in side.world.lineup.learning}
                   for side in self.sides]
        assert learned[0] == learned[1], learned


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


assert SILENCE_READ_ALLOWANCE_MS < TICK_S * 1000  # a tick after a silence is due learns it

LearnerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LEARNER_STATEFUL_EXAMPLES", "25")), stateful_step_count=30, derandomize=True,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestLearnerStateful = LearnerMachine.TestCase

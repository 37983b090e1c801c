"""The learner driven through random interleavings of what happens in production, against the contract.

A hypothesis state machine serves decisions (as /score does: `served`, then JetStream's ack, `published`,
or the DECISIONS stream read back, `add_logged`, in either order, or only after a restart), delivers
reactions naming them (the right tip, another candidate, a tip not among them, the wrong user, a decision
nobody served, none), redelivers feedback (the same message again), moves the clock (the checkpointer's
ticks as it passes), checkpoints, and crashes: a fresh learner restored from the last checkpoint saved,
DECISIONS then FEEDBACK re-read from the positions it covered, as `app/bootstrap.py` starts. A twin learner
gets the same inputs and never crashes. Checked after every step (docs/learning.md):

- each (decision, tip) is learned at most once since what the models saved held, with the reward of the
  first reaction that counts, or its silence (`TIPSTREAM_SILENCE_REWARD`, on in some runs) for the first
  tip of a decision no reaction was credited to within the wait;
- each feedback delivered is counted under exactly one outcome, the one the contract names (`waiting`
  until it joins or gives up);
- every live model's `n_learned` is the number of rewards learned;
- the crashing learner has learned what the twin has: the same credits, the same `n_learned`.

Only I/O is stood in for: the streams are lists read by position, the decision log rows a `TipScoresLog`,
the clock a fake; checkpoints go to SQLite through the real checkpointer.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app import migrate, scoring
from app.checkpoints import Checkpointer, SqlCheckpointStore
from app.db import make_engine
from app.decisions import LoggedDecision, TipScoresLog
from app.ingest import ReadUpTo
from app.learner import SILENCE_READ_ALLOWANCE_MS, Learner
from app.learning_metrics import FEEDBACK
from app.lineup import Lineup
from app.registry_store import RegistryStore
from app.scoring import Scorer
from app.settings import DEFAULT_REWARDS
from models.policy import make_policy
from streams.events import parse_event
from streams.store import OnlineStore
from tests.unit.test_scoring_learner import NOW, World

START_S = 1_780_000_000  # the fake clock's start: whole seconds, so stored times are exact
WINDOW_S = 3_600
WAIT_S = 600
TICK_S = 60  # the checkpointer's ticks (`expire`) while time passes, live
SILENCE = 0.0
OUTCOMES = ("credited", "duplicate", "late", "no_decision", "waiting", "unknown_decision", "expired", "unknown_tip",
            "wrong_user")
USERS = ("u-1", "u-2")
TIPS = ("a", "b", "c")
WHICH = ("first", "second", "not_a_candidate", "wrong_user")


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

    def __init__(self, path: Path, clock: Any, silence: bool) -> None:
        self.path, self.clock, self.silence = path, clock, silence
        self.learned: dict[tuple[str, str], tuple[float, int]] = {}  # since what the models saved held
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
            world.lineup, world.store, world.log, rewards=DEFAULT_REWARDS, cache_mb=64, window_s=WINDOW_S,
            pending_max=100, pending_max_age_s=60, snapshot_every_s=0, clock=self.clock, timer=self.clock, **options)
        world.scorer = Scorer(world.store, world.lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
        world._ids = 0
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

    def checkpoint(self, fail: bool = False) -> None:
        store = (_FailingStore if fail else SqlCheckpointStore)(self.world.engine)
        checkpointer = Checkpointer(self.world.store, store, every_events=1, every_s=60,
                                    participants=[self.learner, self.world.log])

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

    @initialize(silence=st.booleans())
    def start(self, silence: bool) -> None:
        self.clock = _Clock(START_S)
        ids = itertools.count()
        # Decision ids carry the fake clock's time, as served ones carry the real one.
        scoring.new_decision_id = lambda: f"d-{int(self.clock.now * 1000):012x}{next(ids):016x}"
        self.silence = silence
        self.main = Side(self.tmp / "main", self.clock, silence)
        self.twin = Side(self.tmp / "twin", self.clock, silence)
        self.decisions: dict[str, dict[str, Any]] = {}  # served: id -> decision, created ms
        self.order: list[str] = []
        self.pending: list[str] = []  # served, not yet in DECISIONS
        self.stream: list[str] = []  # DECISIONS: a position is how many were read
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

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 1_000), how=st.sampled_from(["ack", "read_back", "ack_then_read", "read_then_ack"]))
    def publish(self, pick: int, how: str) -> None:
        """JetStream stores it; the ack comes (`published`), or the DECISIONS tail reads it back, or both."""
        decision_id = self.pending.pop(pick % len(self.pending))
        self.stream.append(decision_id)
        logged = LoggedDecision(decision_id, self.decisions[decision_id]["payload"])
        for side in self.sides:
            steps = {"ack": ["ack"], "read_back": ["read"], "ack_then_read": ["ack", "read"],
                     "read_then_ack": ["read", "ack"]}[how]
            for step in steps:
                if step == "ack":
                    side.learner.published(decision_id, logged.data)
                else:
                    side.learner.add_logged(logged)
            side.world.store.advance("DECISIONS", len(self.stream))  # the own tail's position covers it

    # -- feedback ----------------------------------------------------------------------------

    def _event(self, user: str, data: dict[str, Any]) -> bytes:
        return orjson.dumps({"id": f"f-{len(self.feedback)}", "type": "tip.reacted", "user_id": user, "ts": NOW,
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
    @rule(pick=st.integers(0, 1_000), which=st.sampled_from(WHICH), reaction=st.sampled_from(sorted(DEFAULT_REWARDS)))
    def react(self, pick: int, which: str, reaction: str) -> None:
        self._react(pick, which, reaction, self.sides)

    def _react(self, pick: int, which: str, reaction: str, sides: tuple[Side, ...]) -> None:
        if not self.order:
            return
        decision_id = self.order[-1 - pick % min(len(self.order), 6)]  # mostly recent decisions
        decision = self.decisions[decision_id]["decision"]
        user = decision["user_id"]
        tip = {"first": decision["ranked"][0]["tip_id"], "second": decision["ranked"][1]["tip_id"],
               "not_a_candidate": "z", "wrong_user": decision["ranked"][0]["tip_id"]}[which]
        if which == "wrong_user":
            user = next(u for u in USERS if u != user)
        message = self._append(self._event(user, {"tip_id": tip, "decision_id": decision_id, "reaction": reaction}))
        want = self.expected(decision_id, tip, user, reaction, message[2])
        for got in self._read_live(message, len(self.feedback), sides):
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
        data = orjson.loads(event)["data"]
        decision_id = data.get("decision_id")
        for side, got in zip(self.sides, self._read_live((event, reply, stored), None), strict=True):
            if decision_id is None:  # counted only by a learner whose fold had not seen it (`new`)
                assert got in ({}, {"no_decision": 1}), got
                side.delivered -= not got
                continue
            assert sum(got.get(n, 0) for n in OUTCOMES if n != "unknown_decision") == 1, got
            assert "credited" not in got, got

    # -- time, checkpoints, restarts -----------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 30, 200, WAIT_S, WAIT_S + 10, 1_800, WINDOW_S + 100]))
    def time_passes(self, seconds: int) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + TICK_S)
            for side in self.sides:
                side.tick()

    @rule(fail=st.sampled_from([False, False, True]))
    def checkpoint(self, fail: bool) -> None:
        """The checkpointer's: both services, the crashing one's transaction failing in some (the database away)."""
        self.main.checkpoint(fail)
        self.twin.checkpoint()

    @rule(clean=st.booleans(), down_s=st.sampled_from([0, 5, 300, WINDOW_S + 100]),
          while_down=st.lists(st.tuples(st.integers(0, 1_000), st.sampled_from(WHICH),
                                        st.sampled_from(sorted(DEFAULT_REWARDS))), max_size=3))
    def crash_and_restart(self, clean: bool, down_s: int, while_down: list[tuple[int, str, str]]) -> None:
        """kill -9 (or a clean stop), down a while (FEEDBACK goes on: the twin reads it), then a start."""
        main = self.main
        if clean:  # a clean stop: its last checkpoint, whatever the spacing
            main.learner.snapshot_at_next_checkpoint()
            main.checkpoint()
            self.twin.tick()
        # Served and not acknowledged at the stop: it reached JetStream, the ack was lost.
        for decision_id in self.pending:
            self.stream.append(decision_id)
            self.twin.learner.published(decision_id, self.decisions[decision_id]["payload"])
            self.twin.world.store.advance("DECISIONS", len(self.stream))
        self.pending = []
        end = self.clock.now + down_s
        reacting = iter(while_down)
        while True:  # the twin lives on, ticking, reading what FEEDBACK stores; main is down
            for pick, which, reaction in itertools.islice(reacting, 1):
                self._react(pick, which, reaction, (self.twin,))
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
        for seq in range(resume.get("DECISIONS", 0) + 1, len(self.stream) + 1):
            decision_id = self.stream[seq - 1]
            learner.add_logged(LoggedDecision(decision_id, self.decisions[decision_id]["payload"]))
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
            assert [m.n_learned for _, m in side.world.lineup.learning] == [len(side.learned)] * 2

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


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


assert SILENCE_READ_ALLOWANCE_MS < TICK_S * 1000  # a tick after a silence is due learns it

LearnerMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=30, derandomize=True,
                                            deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestLearnerStateful = LearnerMachine.TestCase

"""The learner without a server: joins, credits once, waits for late decisions, bounded memory, snapshots."""

from __future__ import annotations

import asyncio
import gc
import math
import random
import threading
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from app import db, evaluation, migrate
from app.checkpoint_rows import write_tip_scores
from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoints import Checkpointer
from app.credit_log import split_row
from app.db import make_engine
from app.decision_ids import decision_time_ms
from app.decisions import LoggedDecision, TipScoresLog, tip_score_row
from app.join_cache import ENTRY_OVERHEAD
from app.learner import Learner
from app.learning_metrics import FEEDBACK, LEARN_DELAY, MODEL_USERS, REFUSED, SKIPPED
from app.lineup import Lineup, RetiredModel
from app.registry_store import RegistryStore
from app.score_request import parse_request
from app.scoring import Scorer
from app.settings import DEFAULT_REWARDS
from models import reward
from models.policy import make_policy
from models.registry import RegistryError
from models.reward import TipModel
from streams.events import Refused, parse_event
from streams.read_up_to import ReadUpTo
from streams.store import OnlineStore
from tests.conftest import eventually

NOW = "2026-11-26T09:00:00+01:00"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class World:
    """A scorer and a learner over one store and lineup, as the service wires them."""

    def __init__(self, tmp_path: Path, **learner: Any) -> None:
        self.url = f"sqlite:///{tmp_path / 'l.db'}"  # a second World on the same path: a restart
        migrate.upgrade(self.url)
        self.engine = make_engine(self.url)
        self.store = OnlineStore()
        # As the service wires them (`bootstrap`): a card's policy value counts silence as the learner learns it.
        self.lineup = Lineup(RegistryStore(self.engine), self.engine, eval_max_rewards=100,
                             silence_reward=learner.get("silence_reward"))
        self.lineup.load("logreg", "logreg", learning_rate=0.1)  # v1 champion, v2 shadow: both learn
        self.log = TipScoresLog()
        self.clock = Clock()
        # The simulated clock also times serialising models: it takes no time unless a test says so.
        options = {"cache_mb": 64, "window_s": 3600, "pending_max": 100, "pending_max_age_s": 60,
                   "snapshot_every_s": 0, "timer": self.clock} | learner
        self.learner = Learner(self.lineup, self.store, self.log, rewards=DEFAULT_REWARDS, clock=self.clock, **options)
        self.scorer = Scorer(self.store, self.lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
        self.sink = self.learner.feedback_sink()
        self._ids = 0

    def score(self, user: str = "u-1", tips: tuple[str, ...] = ("a", "b"), serve: bool = True,
              explore: bool = True) -> Any:
        body = {"user_id": user, "context": {"now": NOW}, "candidates": [{"tip_id": t} for t in tips],
                "explore": explore}
        scored = self.scorer.score(parse_request(orjson.dumps(body)))
        if serve:
            self.learner.served(scored.decision_id, scored.payload, scored.decision)
        return scored

    def react(self, decision_id: str | None, tip: str, reaction: str = "acted", user: str = "u-1",
              event_id: str | None = None) -> None:
        self._ids += 1
        data = {"tip_id": tip, "reaction": reaction} | ({"decision_id": decision_id} if decision_id else {})
        event = {"id": event_id or f"f-{self._ids}", "type": "tip.reacted", "user_id": user, "ts": NOW, "data": data}
        self.sink(parse_event(orjson.dumps(event)))


def forget(learner: Learner, user_id: str, at_ms: int) -> int:
    """What the eraser's step 2 asks of the learner: the look over its join cache, then the drop; the decisions
    held that went."""
    went = learner.forget_user(user_id, at_ms, asyncio.run(learner.decisions_to_forget(user_id, at_ms)))
    return went["decisions_held"]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.engine.dispose()


def outcomes() -> dict[str, float]:
    names = ("credited", "duplicate", "late", "no_decision", "waiting", "unknown_decision", "expired", "unknown_tip",
             "wrong_user")
    return {n: FEEDBACK.labels(n).value for n in names}


def delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in outcomes().items() if v != before[k]}


def test_feedback_trains_champion_and_shadow_once_per_decision_and_tip(world: World) -> None:
    before = outcomes()
    scored = world.score()
    world.react(scored.decision_id, "a", "acted", event_id="f-1")
    world.react(scored.decision_id, "a", "acted", event_id="f-1")  # redelivered
    world.react(scored.decision_id, "a", "liked", event_id="f-9")  # re-sent with a new id
    world.react(scored.decision_id, "b", "dismissed")
    world.react(scored.decision_id, "zzz", "acted")  # not a candidate
    world.react(None, "a", "liked")  # no decision
    assert delta(before) == {"credited": 2, "duplicate": 2, "unknown_tip": 1, "no_decision": 1}
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 2, "v2": 2}
    assert world.lineup.prior.count("a") == 1.0 and world.lineup.prior.count("b") == 1.0
    # Learned from the features as served: the model's input is the logged decision's.
    assert world.lineup.champion.feature_names == sorted(
        set(orjson.loads(scored.payload)["features"]) | {"tip_id"})



def test_inputs_past_a_models_bounds_are_counted_and_told_once_per_version(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    scored = world.score()
    world.react(scored.decision_id, "a")
    held = len(world.lineup.champion.feature_names)
    monkeypatch.setattr(reward, "MAX_INPUTS", held)  # full: every new name is left out
    refused = {v: REFUSED.labels(v).value for v in ("v1", "v2")}
    for i in range(3):
        body = {"user_id": "u-1", "context": {"now": NOW},
                "candidates": [{"tip_id": "a", "features": {f"made_up_{i}": 1.0, f"also_{i}": "x"}}, {"tip_id": "b"}]}
        made = world.scorer.score(parse_request(orjson.dumps(body)))
        world.learner.served(made.decision_id, made.payload, made.decision)
        world.react(made.decision_id, "a")
    assert {v: REFUSED.labels(v).value - refused[v] for v in refused} == {"v1": 6, "v2": 6}
    assert {v: len(m.feature_names) for v, m in world.lineup.learning} == {"v1": held, "v2": held}
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 4, "v2": 4}  # learned without them
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream.learner" and "bound" in r.getMessage()]
    assert len(told) == 2 and all("tipstream_inputs_refused_total" in m for m in told)


def test_a_logged_example_with_a_huge_number_is_skipped_counted_and_poisons_no_model(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    # A decision logged before numbers were bounded, read back from the stream: a replay.
    scored = world.score(serve=False)
    decision = orjson.loads(scored.payload)
    decision["ranked"][0]["features"] = {"len": 1e160}
    poisoned = decision["ranked"][0]["tip_id"]
    skipped = {v: SKIPPED.labels(v).value for v in ("v1", "v2")}
    world.learner.add_logged(LoggedDecision(scored.decision_id, orjson.dumps(decision)))
    world.react(scored.decision_id, poisoned)
    later = world.score()
    world.react(later.decision_id, "a")
    assert {v: SKIPPED.labels(v).value - skipped[v] for v in skipped} == {"v1": 1, "v2": 1}
    assert {v: (m.n_learned, m.n_skipped) for v, m in world.lineup.learning} == {"v1": (1, 1), "v2": (1, 1)}
    for _, model in world.lineup.learning:
        assert 0.0 < model.predict_one({"tip_id": "zz", "user_id": "u-7"}) < 1.0
    other = world.score(user="u-9", tips=("x", "y"))
    assert all(c["model_score"] is not None for c in orjson.loads(other.payload)["ranked"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "tipstream.learner"]
    assert len(warnings) == 1 and scored.decision_id in warnings[0] and "v1, v2" in warnings[0]


def test_feedback_before_its_decision_waits_then_joins(world: World) -> None:
    before = outcomes()
    scored = world.score(serve=False)  # served elsewhere: only the stream brings it
    world.react(scored.decision_id, "a")
    assert delta(before) == {"waiting": 1} and world.lineup.champion.n_learned == 0
    assert world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    assert delta(before) == {"waiting": 1, "credited": 1} and not world.learner.waiting.by_decision
    assert not world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload)), "a redelivery"
    [row] = world.log.dirty.values()
    assert row["decision_id"] == scored.decision_id and row["rewards"] == {"a": 1.0}


def test_a_spooled_decision_served_again_joins_the_feedback_read_before_it(world: World) -> None:
    """A start reads FEEDBACK while it publishes the spool: a reaction to a spooled decision read
    first waited, and no read-back brings one of our own decisions again to join it."""
    before = outcomes()
    spooled = world.score(serve=False)
    world.react(spooled.decision_id, "a")
    assert delta(before) == {"waiting": 1}
    world.learner.served(spooled.decision_id, spooled.payload, spooled.decision)
    assert delta(before) == {"waiting": 1, "credited": 1} and not world.learner.waiting.by_decision
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 1, "v2": 1}


def test_a_spooled_decision_is_joinable_for_the_window_from_when_it_was_served_not_from_the_start(
        world: World) -> None:
    """NATS away for over an hour, then a clean stop: a decision served before the outage is spooled,
    served again at the start. A reaction stored more than the window after it was made is `expired`,
    as without the stop; held from the start, it was credited (and its silence, its credits past the
    window not restored, learned a second time)."""
    t0 = world.clock.now
    spooled = world.score(serve=False)
    world.clock.now = t0 + 3600 + 100
    world.learner.served(spooled.decision_id, spooled.payload, spooled.decision, spooled=True)
    before = outcomes()
    world.sink(_reaction("f-1", spooled.decision_id, "a"), _ack(world.clock.now, 1))
    assert delta(before) == {"expired": 1}
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 0, "v2": 0}


def test_feedback_delivered_again_after_it_gave_up_waiting_is_not_learned(world: World) -> None:
    """Another publisher's decision stored 70 s after a reaction naming it: the reaction gave up
    waiting after 60 s. JetStream delivers it again (its ack lost) after the decision came: it is
    `unknown_decision` again, not credited; and delivered again before the decision came, it is not
    held afresh, where it took the place of a reaction to the same tip sent since, counted a duplicate."""
    t0 = world.clock.now
    decision = _foreign(world, "ext-1")
    before = outcomes()
    world.sink(_reaction("f-1", "ext-1", "a", "disliked"), _ack(t0, 1))
    world.sink(_reaction("f-2", "ext-1", "b", "disliked"), _ack(t0, 2))
    world.clock.now = t0 + 61
    world.learner.expire()
    assert delta(before) == {"waiting": 2, "unknown_decision": 2}
    world.sink(_reaction("f-1", "ext-1", "a", "disliked"), _ack(t0, 1, delivered=2))  # again, before the decision
    world.sink(_reaction("f-3", "ext-1", "a", "acted"), _ack(t0 + 61, 3))  # sent again since, a new id
    assert delta(before) == {"waiting": 3, "unknown_decision": 3}
    world.clock.now = t0 + 70
    world.learner.add_logged(decision, _decisions_ack(t0 + 70, 1))
    world.sink(_reaction("f-2", "ext-1", "b", "disliked"), _ack(t0, 2, delivered=2))  # again, after the decision
    assert delta(before) == {"waiting": 3, "unknown_decision": 4, "credited": 1}
    assert world.learner.joins.cache["ext-1"].credits == {"a": 1.0}
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 1, "v2": 1}


def test_feedback_waits_for_another_publisher_s_decision_whatever_the_nats_server_s_clock(world: World) -> None:
    """A NATS server whose clock is behind this one's by more than the wait (60 s here): a reaction
    JetStream delivers for the first time, its decision not come yet, waits for it. Judged a redelivery
    after it gave up by its stored time, every such reaction was given up at once."""
    t0 = world.clock.now
    decision = _foreign(world, "ext-1")
    before = outcomes()
    world.sink(_reaction("f-1", "ext-1", "a", "acted"), _ack(t0 - 1_200, 1))  # NATS 20 minutes behind
    assert delta(before) == {"waiting": 1}
    world.learner.add_logged(decision, _decisions_ack(t0 - 1_199, 1))
    assert delta(before) == {"waiting": 1, "credited": 1}


def test_feedback_a_publisher_got_wrong_is_told_in_the_log_at_most_once_a_minute(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tip id or user id the decision does not have showed in tipstream_feedback_total only."""
    import logging

    from app import learner_told
    from streams.log_throttle import LogThrottle

    monkeypatch.setattr(learner_told, "_TOLD", LogThrottle())
    scored = world.score(user="u-1", tips=("a", "b"))
    with caplog.at_level(logging.WARNING, logger="tipstream.learner"):
        world.react(scored.decision_id, "zzz", "acted")
        world.react(scored.decision_id, "yyy", "acted")  # within the minute: counted, not told again
        world.react(scored.decision_id, "a", "acted", user="u-2")
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 2, told
    assert told[0].startswith(f"feedback names tip 'zzz', which is not a candidate of decision {scored.decision_id!r} "
                              "('a', 'b'); not learned (tipstream_feedback_total{outcome=\"unknown_tip\"}"), told[0]
    assert told[1].startswith(f"feedback of user 'u-2' names decision {scored.decision_id!r}, which /score made for "
                              "user 'u-1'; not learned"), told[1]


def test_feedback_that_gave_up_waiting_is_told_with_the_decision_it_named(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's reaction names a decision by a placeholder (`d-019c5e8a2b10...`): the log said only how many
    reactions gave up waiting, so a publisher could not tell which of theirs named a decision /score never made."""
    import logging

    from app import learner_told
    from streams.log_throttle import LogThrottle

    monkeypatch.setattr(learner_told, "_TOLD", LogThrottle())
    before = outcomes()
    world.react("d-019c5e8a2b10...", "tip-focus-1", "acted", user="u-42")
    world.clock.now += 61  # pending_max_age_s is 60
    with caplog.at_level(logging.WARNING, logger="tipstream.learner"):
        world.learner.expire()
    assert delta(before) == {"waiting": 1, "unknown_decision": 1}
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and ("gave up waiting for the decisions they name (the last: decision "
                               "'d-019c5e8a2b10...', tip 'tip-focus-1', of user 'u-42')") in told[0], told


def test_the_gave_up_line_says_another_publisher_s_decision_may_have_come_and_been_let_go(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feedback for another publisher's decision the join cache had let go waits (its id says not when it was
    made), and the line said the decision "never came". Of ours, let go, feedback is `expired`: "never came" holds."""
    import logging

    from app import learner_told
    from streams.log_throttle import LogThrottle

    def gave_up(decision_id: str) -> str:
        monkeypatch.setattr(learner_told, "_TOLD", LogThrottle())
        caplog.clear()
        world.react(decision_id, "a")
        world.clock.now += 61  # pending_max_age_s is 60
        with caplog.at_level(logging.WARNING, logger="tipstream.learner"):
            world.learner.expire()
        [told] = [r.getMessage() for r in caplog.records if r.name == "tipstream.learner"]
        return told

    elsewhere = world.score(serve=False)
    assert world.learner.add_logged(LoggedDecision("external-1", elsewhere.payload))
    world.learner.joins.evict(int(world.clock.now * 1000) + 1)  # as the join window's end does
    assert world.learner.joins.get("external-1") is None
    told = gave_up("external-1")
    assert "(the last: decision 'external-1', tip 'a', of user 'u-1'), which did not come to DECISIONS within " \
           "TIPSTREAM_LEARNER_PENDING_MAX_AGE_S (60 s), or came before the feedback and the join cache let it go " \
           "(TIPSTREAM_LEARNER_JOIN_CACHE_MB, TIPSTREAM_LEARNER_JOIN_WINDOW_S)" in told, told
    assert "never came" not in told, told
    never = world.score(serve=False).decision_id  # served by /score, never published
    told = gave_up(never)
    assert f"(the last: decision {never!r}, tip 'a', of user 'u-1'), which never came to DECISIONS within " \
           "TIPSTREAM_LEARNER_PENDING_MAX_AGE_S (60 s): a decision_id /score did not answer" in told, told


def test_a_publisher_s_decision_id_or_feature_name_cannot_forge_log_lines(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another publisher's decision (DECISIONS) with CR/LF in its id or a feature's name put them
    into the log as they were: a line of the attacker's own wording after the real one."""
    import logging

    from app import learner_told
    from app.decisions import decode_decision
    from streams.log_throttle import LogThrottle

    monkeypatch.setattr(learner_told, "_TOLD", LogThrottle())
    forged = "\n2026-12-04 18:00:00,000 ERROR tipstream: forged"
    scored = world.score(serve=False, tips=("a", "b"))
    decision = orjson.loads(scored.payload)
    refused = decode_decision("decisions.score", orjson.dumps(
        {**decision, "features": {**decision["features"], f"x{forged}": [1]}}))
    assert not isinstance(refused, LoggedDecision) and "\n" not in refused.reason and "\r" not in refused.reason
    decision["id"] = f"d-1{forged}"
    found = decode_decision("decisions.score", orjson.dumps(decision))
    assert isinstance(found, LoggedDecision)
    world.learner.add_logged(found)
    with caplog.at_level(logging.WARNING, logger="tipstream.learner"):
        world.react(decision["id"], "zzz", "acted")
        world.react(decision["id"], "a", "acted", user="u-2")
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 2 and not any("\n" in line for line in told), told


def test_feedback_from_another_user_trains_nothing(world: World) -> None:
    before = outcomes()
    served = world.score(user="u-1")
    world.react(served.decision_id, "a", "disliked", user="u-2")
    # The same through the wait for a decision that has not arrived yet.
    elsewhere = world.score(user="u-1", serve=False)
    world.react(elsewhere.decision_id, "b", "acted", user="u-3")
    world.learner.add_logged(LoggedDecision(elsewhere.decision_id, elsewhere.payload))
    assert delta(before) == {"wrong_user": 2, "waiting": 1}
    assert world.lineup.champion.n_learned == 0 and world.lineup.prior.count("a") == 0.0
    world.react(served.decision_id, "a", "acted", user="u-1")  # its own user's reaction still counts
    assert delta(before) == {"wrong_user": 2, "waiting": 1, "credited": 1}
    # Once it is credited, another user's reaction to it is still theirs, not a redelivery.
    world.react(served.decision_id, "a", "liked", user="u-2")
    assert delta(before) == {"wrong_user": 3, "waiting": 1, "credited": 1}
    world.react(served.decision_id, "a", "liked", user="u-1")
    assert delta(before) == {"wrong_user": 3, "waiting": 1, "credited": 1, "duplicate": 1}


@pytest.mark.parametrize("wrong_first", [True, False])
def test_another_user_s_reaction_waiting_does_not_shut_out_the_decision_s_user_s_own(
        world: World, wrong_first: bool) -> None:
    """Reactions to a decision not come yet, one from another user (an app's bug, or someone naming
    another user's decision id): held first, it took the (decision, tip), the decision's user's own
    reaction to that tip was counted a duplicate, and when the decision came the other user's was
    refused (`wrong_user`) and the right one was lost. Both wait now; the decision tells them apart."""
    elsewhere = world.score(user="u-1", serve=False)
    decision_id = elsewhere.decision_id
    before = outcomes()
    right = {"tip": "a", "reaction": "acted", "user": "u-1", "event_id": "f-right"}
    wrong = {"tip": "a", "reaction": "disliked", "user": "u-2", "event_id": "f-wrong"}
    for reaction in ([wrong, right] if wrong_first else [right, wrong]):
        world.react(decision_id, **reaction)
    assert delta(before) == {"waiting": 2} and len(world.learner.waiting) == 2
    world.react(decision_id, **right)  # redelivered while both wait
    world.react(decision_id, **wrong)
    world.react(decision_id, "a", "liked", user="u-1")  # re-sent with a new event id
    assert delta(before) == {"waiting": 2, "duplicate": 3}
    assert world.learner.add_logged(LoggedDecision(decision_id, elsewhere.payload))
    assert delta(before) == {"waiting": 2, "duplicate": 3, "credited": 1, "wrong_user": 1}
    assert not world.learner.waiting.by_decision and len(world.learner.waiting) == 0
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 1, "v2": 1}
    assert world.lineup.prior.count("a") == 1.0 and world.learner.joins.cache[decision_id].credits == {"a": 1.0}
    world.react(decision_id, **right)  # redelivered after the join: learned once
    world.react(decision_id, **wrong)
    assert delta(before) == {"waiting": 2, "duplicate": 4, "credited": 1, "wrong_user": 2}
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 1, "v2": 1}


def test_waiting_is_bounded_in_count_and_age(tmp_path: Path) -> None:
    w = World(tmp_path, pending_max=3, pending_max_age_s=10)
    before = outcomes()
    for i in range(5):
        w.react(f"d-unknown-{i}", "a")
    assert delta(before) == {"waiting": 5, "unknown_decision": 2} and len(w.learner.waiting._order) == 3
    w.clock.now += 11
    w.learner.expire()
    assert delta(before) == {"waiting": 5, "unknown_decision": 5} and not w.learner.waiting.by_decision
    w.engine.dispose()


def test_the_join_cache_is_bounded_and_older_feedback_is_expired(tmp_path: Path) -> None:
    w = World(tmp_path, cache_mb=0.01)  # about ten decisions
    first = w.score()
    for _ in range(30):
        w.score()
    assert first.decision_id not in w.learner.joins.cache and len(w.learner.joins.cache) < 15
    assert w.learner.joins.bytes <= 0.01 * 1024 * 1024
    before = outcomes()
    w.react(first.decision_id, "a")
    assert delta(before) == {"expired": 1}
    # A credit is saved with the snapshot after it (in its minute's row, `credit_log`).
    credited = w.score()
    w.react(credited.decision_id, "a")
    rows = w.learner.snapshot()["credits"]
    assert [set(split_row(orjson.loads(data))[0]) for data in rows.values()] == [{credited.decision_id}]
    w.engine.dispose()


def test_a_reaction_whose_decision_the_memory_budget_let_go_is_told_with_the_setting(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the join window, but after the cache's budget let its decision go: counted `expired` as a
    reaction past the window is, and nothing in the log said the budget was too small for the app's reactions
    (the default 256 MB holds ~9 minutes of decisions at 230 a second)."""
    from app import learner_told
    from streams.log_throttle import LogThrottle

    monkeypatch.setattr(learner_told, "_TOLD", LogThrottle())  # once a minute per outcome, this process's
    w = World(tmp_path, cache_mb=0.01)  # about ten decisions
    first = w.score()
    for _ in range(30):
        w.score()
    w.react(first.decision_id, "a")
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream.learner"]
    assert len(told) == 1, told
    assert first.decision_id in told[0] and "TIPSTREAM_LEARNER_JOIN_CACHE_MB=0.01" in told[0], told[0]
    assert "let go" in told[0] and 'outcome="expired"' in told[0], told[0]
    w.engine.dispose()


def test_after_a_restart_the_decisions_read_back_are_evicted_before_fresh_ones(tmp_path: Path) -> None:
    """/score serves while DECISIONS is re-read: a full cache must not evict what it just served
    (nor call feedback for decisions not yet re-read `expired`)."""
    before_crash = World(tmp_path, cache_mb=0.01)  # about ten decisions
    stream = []
    for _ in range(10):
        scored = before_crash.score()
        stream.append(LoggedDecision(scored.decision_id, scored.payload))
        time.sleep(0.002)  # ids carry their creation time in ms: each its own
    again = World(tmp_path, cache_mb=0.01)
    again.learner.restore(again.engine)
    live = again.score()  # answered right after the start
    for logged in stream[:-1]:
        again.learner.add_logged(logged)
    before = outcomes()
    again.react(live.decision_id, "a")
    again.react(stream[-1].id, "b")  # its decision is still to be re-read: it waits
    assert delta(before) == {"credited": 1, "waiting": 1}
    again.learner.add_logged(stream[-1])
    again.learner.caught_up()
    assert delta(before) == {"credited": 2, "waiting": 1}
    held = list(again.learner.joins.cache)
    assert held[-1] == live.decision_id and held[:-1] == [d.id for d in stream][-len(held) + 1:]
    # A later reaction to the oldest decision re-read, now evicted, is reported as such.
    assert stream[0].id not in again.learner.joins.cache
    again.react(stream[0].id, "a")
    assert delta(before) == {"credited": 2, "waiting": 1, "expired": 1}
    before_crash.engine.dispose()
    again.engine.dispose()


def _ack(stored_s: float, seq: int, delivered: int = 1) -> bytes:
    """A FEEDBACK message's ack subject: it says when JetStream stored the message, and how many times
    it has delivered it."""
    return f"$JS.ACK.FEEDBACK.ingest.{delivered}.{seq}.{seq}.{int(stored_s * 1e9)}.0".encode()


def test_the_join_window_is_judged_in_feedbacks_time_across_an_outage(tmp_path: Path) -> None:
    """Window 1 h; the service stops for 2 h. A reaction stored 10 minutes after its decision,
    during the outage, is read after the restart: it is credited. Judged by this clock, the
    decision re-read from DECISIONS was 2 h old and skipped, and the reaction never learned."""
    before_stop = World(tmp_path)
    served = before_stop.score(serve=False)
    decision = LoggedDecision(served.decision_id, served.payload)
    before_stop.learner.add_logged(decision)
    t0 = before_stop.clock.now
    other = before_stop.score()
    reaction = {"id": "f-0", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                "data": {"tip_id": "a", "decision_id": other.decision_id, "reaction": "acted"}}
    before_stop.sink(parse_event(orjson.dumps(reaction)), _ack(t0, 1))
    before_stop.learner.feedback_read.advance(int(t0 * 1000), caught_up=True)  # as the FEEDBACK ingest does
    with before_stop.engine.begin() as conn:
        before_stop.learner.write(conn, before_stop.learner.snapshot(force=True))

    after = World(tmp_path)
    after.clock.now = t0 + 7200
    after.learner.restore(after.engine)
    after.learner.feedback_read = ReadUpTo()  # FEEDBACK is behind
    assert after.learner.feedback_ms == int(t0 * 1000)  # as far as it had been read: the snapshot says
    assert after.learner.add_logged(decision)  # DECISIONS re-read
    before = outcomes()
    late = {**reaction, "id": "f-1", "data": {**reaction["data"], "decision_id": decision.id, "tip_id": "b"}}
    after.sink(parse_event(orjson.dumps(late)), _ack(t0 + 600, 2))
    assert delta(before) == {"credited": 1}
    assert after.log.dirty[decision.id]["rewarded_at"].timestamp() == pytest.approx(t0 + 600, abs=0.001)
    # Once FEEDBACK has caught up, the window is the clock's again: the 2-hour-old decision goes.
    after.learner.feedback_read.advance(int((t0 + 7200) * 1000), caught_up=True)
    after.score()
    assert decision.id not in after.learner.joins.cache and decision.id not in after.learner.joins.replayed
    after.sink(parse_event(orjson.dumps({**late, "id": "f-2", "data": {**late["data"], "tip_id": "a"}})),
               _ack(t0 + 7200, 3))
    assert delta(before) == {"credited": 1, "expired": 1}
    before_stop.engine.dispose()
    after.engine.dispose()


def test_the_models_forget_a_user_who_left_by_when_feedback_was_stored_not_by_the_clock(world: World) -> None:
    """`user_ttl_days` (90 by default) counts in the log's time, the feedback's stored time, which
    a rebuild replays; a clock that jumps (a restart weeks later) forgets no one."""
    day = 86_400
    t0 = world.clock.now

    def react(user: str, stored_s: float, seq: int) -> None:
        scored = world.score(user=user)
        event = {"id": f"f-{seq}", "type": "tip.reacted", "user_id": user, "ts": NOW,
                 "data": {"tip_id": "a", "decision_id": scored.decision_id, "reaction": "acted"}}
        world.sink(parse_event(orjson.dumps(event)), _ack(stored_s, seq))

    def holding(user: str) -> list[bool]:
        return [f"user_id_{user}" in model.classifier._weights for _, model in world.lineup.learning]

    before = outcomes()
    react("u-1", t0, 1)
    world.clock.now += 100 * day
    react("u-2", t0 + 89 * day, 2)
    assert holding("u-1") == [True, True]
    react("u-2", t0 + 93 * day, 3)  # gone within 1/32 of the TTL past it (`UserExpiry`)
    assert holding("u-1") == [False, False] and holding("u-2") == [True, True]
    assert delta(before) == {"credited": 3}
    world.learner.snapshot(force=True)
    held = {s.labels["version"]: s.value for s in MODEL_USERS.collect()[0].samples}
    assert held["v1"] == held["v2"] == 1
    world.lineup.learning = world.lineup.learning[:1]  # as retiring v2 leaves it
    world.learner.snapshot(force=True)
    assert "v2" not in {s.labels["version"] for s in MODEL_USERS.collect()[0].samples}


def _learn_delays() -> dict[str, float]:
    """tipstream_reward_learn_delay_seconds: its cumulative bucket counts by bound, and its sum."""
    samples = next(iter(LEARN_DELAY.collect())).samples
    return {s.labels.get("le", s.name.rsplit("_", 1)[-1]): s.value for s in samples}


def test_the_learn_delay_runs_from_when_jetstream_stored_the_reaction_to_when_it_was_learned(world: World) -> None:
    """Live only: a start's read-back learns minutes-old feedback, which says nothing of the learner."""
    t0, before = world.clock.now, _learn_delays()

    def react(stored_s: float, seq: int, wait_s: float = 0.0) -> None:
        scored = world.score()
        world.clock.now = stored_s + wait_s
        event = {"id": f"f-{seq}", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                 "data": {"tip_id": "a", "decision_id": scored.decision_id, "reaction": "acted"}}
        world.sink(parse_event(orjson.dumps(event)), _ack(stored_s, seq))

    react(t0, 1, wait_s=0.3)
    after = _learn_delays()
    added = {bound: after[bound] - before[bound] for bound in ("0.25", "0.5", "+Inf", "sum")}
    assert added == {"0.25": 0, "0.5": 1, "+Inf": 1, "sum": pytest.approx(0.3, abs=0.002)}  # stored times are to the ms
    world.learner.feedback_read = ReadUpTo()  # FEEDBACK read back after a start
    react(t0 + 1, 2, wait_s=600)
    assert _learn_delays() == after and world.lineup.champion.n_learned == 2


def _foreign(world: World, decision_id: str) -> LoggedDecision:
    """A decision another publisher logged: an id of its own, with no time in it."""
    body = orjson.loads(world.score(serve=False).payload) | {"id": decision_id}
    return LoggedDecision(decision_id, orjson.dumps(body))


def _decisions_ack(stored_s: float, seq: int) -> bytes:
    """A DECISIONS message's ack subject: it says when JetStream stored the message."""
    return f"$JS.ACK.DECISIONS.tipstream-decisions.1.{seq}.{seq}.{int(stored_s * 1e9)}.0".encode()


def _reaction(event_id: str, decision_id: str, tip: str, kind: str = "acted", user: str = "u-1") -> Any:
    return parse_event(orjson.dumps({"id": event_id, "type": "tip.reacted", "user_id": user, "ts": NOW,
                                     "data": {"tip_id": tip, "decision_id": decision_id, "reaction": kind}}))


def read_live(live: World, log: list[tuple[float, str, Any]]) -> None:
    """`log`'s (stored at, "decision" or "feedback", what), across both streams in the order JetStream stored them,
    as the live service reads them: each when it is stored, by the clock."""
    for seq, (stored_s, kind, item) in enumerate(log, 1):
        live.clock.now = stored_s
        live.learner.expire()
        if kind == "decision":
            live.learner.add_logged(item, _decisions_ack(stored_s, seq))
        else:
            live.sink(item, _ack(stored_s, seq))


def _learned_as_live(rebuilt: World, live: World) -> None:
    """The rebuild's tip_scores rewards and model bytes are live's; both worlds' engines are let go."""
    try:
        assert ({d: r["rewards"] for d, r in rebuilt.log.dirty.items()}
                == {d: r["rewards"] for d, r in live.log.dirty.items()})
        for version in ("v1", "v2"):
            assert rebuilt.lineup.models[version].to_bytes() == live.lineup.models[version].to_bytes()
    finally:
        live.engine.dispose()
        rebuilt.engine.dispose()


def test_a_replay_learns_feedback_that_came_before_another_publisher_s_decision_as_live(tmp_path: Path) -> None:
    """Another publisher's decision can reach DECISIONS after feedback naming it: live, the feedback
    waits and is learned when the decision comes, after the rewards stored in between; or, once it
    has waited `pending_max_age_s`, never. A rebuild reads DECISIONS ahead of FEEDBACK, and found the
    decision already there: it learned the first at its own place in FEEDBACK and the second at all,
    so its models differed from the live ones, which docs/operations.md says they equal."""
    live = World(tmp_path / "live")
    t0 = live.clock.now
    d0, d1, d2 = (_foreign(live, f"ext-{i}") for i in range(3))
    # (stored at, what): the log, in the order it was stored, across both streams.
    log: list[tuple[float, str, Any]] = [
        (t0, "decision", d0),
        (t0 + 1, "feedback", _reaction("f-1", "ext-1", "a", "acted")),  # before its decision
        (t0 + 2, "feedback", _reaction("f-2", "ext-0", "a", "disliked")),
        (t0 + 3, "feedback", _reaction("f-3", "ext-0", "b", "acted")),
        (t0 + 4, "decision", d1),
        (t0 + 5, "feedback", _reaction("f-4", "ext-1", "b", "liked")),
        (t0 + 6, "feedback", _reaction("f-5", "ext-2", "a", "acted")),  # its decision comes too late
        (t0 + 6 + 120, "decision", d2),  # pending_max_age_s is 60
    ]
    before = outcomes()
    read_live(live, log)
    assert delta(before) == {"waiting": 2, "credited": 4, "unknown_decision": 1}

    rebuilt = World(tmp_path / "rebuilt")
    rebuilt.clock.now = t0 + 3600
    assert rebuilt.learner.restore(rebuilt.engine) is None
    rebuilt.learner.feedback_read = ReadUpTo()  # FEEDBACK follows DECISIONS, which is read further
    before = outcomes()
    for seq, (stored_s, _, item) in enumerate((e for e in log if e[1] == "decision"), 1):
        rebuilt.learner.add_logged(item, _decisions_ack(stored_s, seq))
    rebuilt.learner.caught_up()
    for seq, (stored_s, _, item) in enumerate((e for e in log if e[1] == "feedback"), 1):
        rebuilt.sink(item, _ack(stored_s, seq))
    rebuilt.learner.feedback_read.advance(int(log[-1][0] * 1000), caught_up=True)
    rebuilt.learner.snapshot()
    # The reaction whose decision came too late is given up as it is read: it does not wait again.
    assert delta(before) == {"waiting": 1, "credited": 4, "unknown_decision": 1}

    _learned_as_live(rebuilt, live)


def test_the_join_cache_bytes_metric_counts_the_decisions_read_ahead_of_feedback(tmp_path: Path) -> None:
    """A rebuild holds the decisions read past FEEDBACK's time apart (`JoinCache.ahead`), and counts them against
    TIPSTREAM_LEARNER_JOIN_CACHE_MB (`Learner.room_for`). tipstream_join_cache_bytes left them out: an operator
    sizing the budget from it saw room that the read-back did not have, while tipstream_join_cache_decisions
    counted them."""
    from app.learning_metrics import JOIN_CACHE, JOIN_CACHE_BYTES

    def gauge(metric: Any) -> float:
        return metric.collect()[0].samples[0].value

    rebuilt = World(tmp_path)
    assert rebuilt.learner.restore(rebuilt.engine) is None
    rebuilt.learner.feedback_read = ReadUpTo()  # FEEDBACK follows DECISIONS, read 10 s further
    rebuilt.learner.add_logged(_foreign(rebuilt, "ext-1"), _decisions_ack(rebuilt.clock.now, 1))
    joins = rebuilt.learner.joins
    assert list(joins.ahead) == ["ext-1"] and joins.bytes == 0 and joins.ahead_bytes > 0
    assert (gauge(JOIN_CACHE), gauge(JOIN_CACHE_BYTES)) == (1, joins.ahead_bytes)
    assert rebuilt.learner.room_for([joins.limit - joins.ahead_bytes - ENTRY_OVERHEAD + 1]) == 0  # as the metric says
    rebuilt.learner.feedback_read.advance(int(rebuilt.clock.now * 1000), caught_up=True)
    rebuilt.learner.caught_up()
    assert not joins.ahead and gauge(JOIN_CACHE_BYTES) == joins.bytes > 0
    rebuilt.engine.dispose()


def test_another_publisher_s_decision_is_held_a_window_from_when_it_was_stored_not_from_each_start(
    tmp_path: Path,
) -> None:
    """A decision with no time in its id was held for the join window from each time it was read:
    every start read it back and held it a window more, so the DECISIONS position the snapshots
    saved never passed it, and every start re-read all of DECISIONS logged since (its retention, 90
    days by default), FEEDBACK waiting behind. It is held a window from when JetStream stored it."""
    def checkpoint(world: World) -> None:
        checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                    participants=[world.learner, world.log])
        world.learner.snapshot_at_next_checkpoint()
        assert asyncio.run(checkpointer.checkpoint())

    first = World(tmp_path)
    t0 = first.clock.now
    assert first.learner.restore(first.engine) is None
    first.learner.add_logged(_foreign(first, "ext-1"), _decisions_ack(t0, 1))
    first.store.advance("DECISIONS", 1)
    first.learner.caught_up()  # DECISIONS read to its end
    checkpoint(first)

    # Ten minutes on (the window is an hour): read back, held, and its feedback still joins.
    again = World(tmp_path)
    again.clock.now = t0 + 600
    again.store.positions.update(again.learner.restore(again.engine) or {})  # as the service resumes
    assert again.store.positions == {"FEEDBACK": 0, "DECISIONS": 0}
    assert again.learner.add_logged(_foreign(again, "ext-1"), _decisions_ack(t0, 1))
    again.store.advance("DECISIONS", 1)
    again.learner.caught_up()  # DECISIONS read to its end
    before = outcomes()
    again.sink(_reaction("f-1", "ext-1", "a"), _ack(t0 + 600, 1))
    again.store.advance("FEEDBACK", 1)
    assert delta(before) == {"credited": 1}
    checkpoint(again)

    # Two hours on: it left the window an hour ago. Each start used to hold it again, from then.
    later = World(tmp_path)
    later.clock.now = t0 + 7200
    later.store.positions.update(later.learner.restore(later.engine) or {})
    assert later.store.positions == {"FEEDBACK": 1, "DECISIONS": 0}
    later.learner.add_logged(_foreign(later, "ext-1"), _decisions_ack(t0, 1))
    later.store.advance("DECISIONS", 1)
    later.learner.caught_up()  # DECISIONS read to its end
    assert later.learner.joins.get("ext-1") is None
    checkpoint(later)
    last = World(tmp_path)
    last.clock.now = t0 + 7260
    assert last.learner.restore(last.engine) == {"FEEDBACK": 1, "DECISIONS": 1}, "the next start reads on"
    assert not later.log.dirty, "read back past the window, its row (with its reward) is left as it is"
    for world in (first, again, later, last):
        world.engine.dispose()


def test_a_replay_does_not_let_a_reaction_that_gave_up_take_the_place_of_a_later_one(tmp_path: Path) -> None:
    """Another publisher's decision is stored 70 s after a reaction to its tip "a" (which gives up after
    60 s) and 5 s after another to the same tip: live, the second is credited. Read back, the decision
    is read first and the first reaction was held until FEEDBACK's time reached the decision; the
    second, to the same tip, was then a duplicate, and the reward live learned was lost."""
    live = World(tmp_path / "live")
    t0 = live.clock.now
    decision = _foreign(live, "ext-1")
    log = [(t0, _reaction("f-1", "ext-1", "a", "disliked")), (t0 + 65, _reaction("f-2", "ext-1", "a", "acted"))]
    for seq, (stored_s, reaction) in enumerate(log, 1):
        live.clock.now = stored_s
        live.learner.expire()
        live.sink(reaction, _ack(stored_s, seq))
    live.clock.now = t0 + 70
    live.learner.add_logged(decision, _decisions_ack(t0 + 70, 1))
    assert live.learner.joins.cache["ext-1"].credits == {"a": 1.0}

    replay = World(tmp_path / "replay")
    replay.clock.now = t0 + 600
    replay.learner.feedback_read = ReadUpTo()  # FEEDBACK is read back, behind DECISIONS
    before = outcomes()
    replay.learner.add_logged(decision, _decisions_ack(t0 + 70, 1))
    for seq, (stored_s, reaction) in enumerate(log, 1):
        replay.sink(reaction, _ack(stored_s, seq))
    replay.learner.feedback_read.advance(int((t0 + 65) * 1000), caught_up=True)
    replay.learner.snapshot()
    assert delta(before) == {"unknown_decision": 1, "waiting": 1, "credited": 1}
    assert replay.learner.joins.cache["ext-1"].credits == {"a": 1.0}
    for version in ("v1", "v2"):
        assert replay.lineup.models[version].to_bytes() == live.lineup.models[version].to_bytes()
    live.engine.dispose()
    replay.engine.dispose()


def test_read_back_a_reaction_that_gave_up_does_not_take_the_place_of_a_later_one(tmp_path: Path) -> None:
    """Read back before another publisher's decision: a reaction to tip "a" waits; another to "a" stored
    65 s later finds it given up (FEEDBACK's time passed it by 60 s), as live, and waits in its place:
    it was a duplicate, and the reward live learned when the decision came was lost."""
    replay = World(tmp_path)
    t0 = replay.clock.now
    decision = _foreign(replay, "ext-1")
    replay.clock.now = t0 + 600
    replay.learner.feedback_read = ReadUpTo()  # FEEDBACK is read back
    before = outcomes()
    replay.sink(_reaction("f-1", "ext-1", "a", "disliked"), _ack(t0, 1))
    replay.sink(_reaction("f-2", "ext-1", "a", "acted"), _ack(t0 + 65, 2))
    assert delta(before) == {"waiting": 2, "unknown_decision": 1}
    replay.learner.add_logged(decision, _decisions_ack(t0 + 70, 1))
    replay.learner.feedback_read.advance(int((t0 + 65) * 1000), caught_up=True)
    replay.learner.snapshot()  # FEEDBACK has caught up: the decision's wait is over
    assert delta(before) == {"waiting": 2, "unknown_decision": 1, "credited": 1}
    assert replay.learner.joins.cache["ext-1"].credits == {"a": 1.0}
    replay.engine.dispose()


def test_read_back_another_user_s_reaction_deferred_does_not_shut_out_the_decision_s_user_s_own(
        tmp_path: Path) -> None:
    """Read back, reactions stored before another publisher's decision wait until FEEDBACK's time passes
    it, as live (`_defer`), though DECISIONS brought it already: another user's to a tip, held first,
    shut out the decision's user's own to that tip, counted a duplicate, where live it was learned."""
    replay = World(tmp_path)
    t0 = replay.clock.now
    decision = _foreign(replay, "ext-1")  # made for u-1
    replay.clock.now = t0 + 600
    replay.learner.feedback_read = ReadUpTo()  # FEEDBACK is read back, behind DECISIONS
    replay.learner.add_logged(decision, _decisions_ack(t0 + 5, 1))
    before = outcomes()
    replay.sink(_reaction("f-1", "ext-1", "a", "disliked", user="u-2"), _ack(t0 + 1, 1))
    replay.sink(_reaction("f-2", "ext-1", "a", "acted"), _ack(t0 + 2, 2))
    replay.sink(_reaction("f-1", "ext-1", "a", "disliked", user="u-2"), _ack(t0 + 1, 1, delivered=2))
    assert delta(before) == {"waiting": 2, "duplicate": 1}
    replay.sink(_reaction("f-3", "ext-1", "b", "liked"), _ack(t0 + 6, 3))  # FEEDBACK's time passes the decision's
    assert delta(before) == {"waiting": 2, "duplicate": 1, "credited": 2, "wrong_user": 1}
    assert replay.learner.joins.cache["ext-1"].credits == {"a": 1.0, "b": 0.8} and len(replay.learner.waiting) == 0
    replay.engine.dispose()


def test_feedback_deferred_while_feedback_is_read_back_is_not_given_up_by_the_clock(tmp_path: Path) -> None:
    """Another publisher's decision stored 5 s after feedback naming it: live the feedback waited 5 s
    and was learned. Read back, the decision is read first and the feedback is deferred until FEEDBACK's
    time passes the decision's; if the read-back stalls longer than `pending_max_age_s` (the database
    or NATS away, ingest paused for checkpoints), a checkpoint gave it up by the clock, and a reward
    live learned was lost as `unknown_decision`. It waits in FEEDBACK's time."""
    live = World(tmp_path / "live")
    t0 = live.clock.now
    decision = _foreign(live, "ext-1")
    before = outcomes()
    live.sink(_reaction("f-1", "ext-1", "a"), _ack(t0, 1))
    live.clock.now = t0 + 5
    live.learner.add_logged(decision, _decisions_ack(t0 + 5, 1))
    live.clock.now = t0 + 6
    live.sink(_reaction("f-2", "ext-1", "b", "liked"), _ack(t0 + 6, 2))
    assert delta(before) == {"waiting": 1, "credited": 2}

    replay = World(tmp_path / "replay")
    replay.clock.now = t0 + 30
    replay.learner.feedback_read = ReadUpTo()  # FEEDBACK is read back, behind DECISIONS
    before = outcomes()
    replay.learner.add_logged(decision, _decisions_ack(t0 + 5, 1))
    replay.sink(_reaction("f-1", "ext-1", "a"), _ack(t0, 1))
    assert delta(before) == {"waiting": 1}, "deferred: FEEDBACK had not reached the decision yet, live"
    replay.clock.now = t0 + 120  # the read-back stalls for two minutes; waiting gives up after 60 s
    replay.learner.snapshot()
    replay.sink(_reaction("f-2", "ext-1", "b", "liked"), _ack(t0 + 6, 2))
    assert delta(before) == {"waiting": 1, "credited": 2}
    assert replay.log.dirty["ext-1"]["rewards"] == live.log.dirty["ext-1"]["rewards"]
    for version in ("v1", "v2"):
        assert replay.lineup.models[version].to_bytes() == live.lineup.models[version].to_bytes()
    live.engine.dispose()
    replay.engine.dispose()


@pytest.mark.parametrize("then", ["a later reaction", "feedback read to its end"])
def test_a_replay_credits_deferred_feedback_whose_decision_the_memory_budget_lets_go_before_it_is_due(
        tmp_path: Path, then: str) -> None:
    """A join cache of 0.01 MB (about ten decisions). A reaction, then another publisher's decision it names, then
    more decisions than the cache holds, with no feedback between (or none at all): live, the decision's arrival
    credited the waiting reaction. Read back, the reaction is deferred until FEEDBACK's time reaches the decision
    (`_defer`), but DECISIONS must first fold every decision stored until the next reaction (what FEEDBACK waits for,
    `ReadUpTo.wanted_ms`), or all of them once FEEDBACK has reached its end (`room_for`): the memory budget let the
    decision go, the release found it gone and the reaction stayed waiting, given up as `unknown_decision`. It is
    credited as its decision leaves, at its place: the same credits, rows and model bytes as live."""
    live = World(tmp_path / "live", cache_mb=0.01)
    t0 = live.clock.now
    named = _foreign(live, "ext-named")
    after = [_foreign(live, f"ext-{n}") for n in range(30)]
    log: list[tuple[float, str, Any]] = [(t0 + 1, "feedback", _reaction("f-1", "ext-named", "a", "acted")),
                                         (t0 + 2, "decision", named)]
    log += [(t0 + 3, "decision", decision) for decision in after]  # 30 in one millisecond
    if then == "a later reaction":
        log.append((t0 + 4, "feedback", _reaction("f-2", "ext-29", "b", "liked")))
    before = outcomes()
    read_live(live, log)
    credited = 2 if then == "a later reaction" else 1
    assert delta(before) == {"waiting": 1, "credited": credited}
    assert "ext-named" not in live.learner.joins.cache, "the budget let it go live too, once credited"

    rebuilt = World(tmp_path / "rebuilt", cache_mb=0.01)
    rebuilt.clock.now = t0 + 600
    assert rebuilt.learner.restore(rebuilt.engine) is None
    rebuilt.learner.feedback_read = ReadUpTo()  # FEEDBACK follows DECISIONS
    decisions = [(stored_s, item) for stored_s, kind, item in log if kind == "decision"]
    reactions = [(stored_s, item) for stored_s, kind, item in log if kind == "feedback"]
    before = outcomes()
    rebuilt.learner.add_logged(named, _decisions_ack(t0 + 2, 1))  # read ahead, within the cache's room
    rebuilt.sink(reactions[0][1], _ack(reactions[0][0], 1))  # deferred: live, it waited for the decision
    if then == "feedback read to its end":
        rebuilt.learner.feedback_read.advance(int(reactions[0][0] * 1000), caught_up=True)
    for seq, (stored_s, item) in enumerate(decisions[1:], 2):  # what FEEDBACK waits for, or all: room_for
        rebuilt.learner.add_logged(item, _decisions_ack(stored_s, seq))
    assert "ext-named" not in rebuilt.learner.joins.cache
    for seq, (stored_s, item) in enumerate(reactions[1:], 2):
        rebuilt.sink(item, _ack(stored_s, seq))
    rebuilt.learner.caught_up()
    rebuilt.learner.feedback_read.advance(int(log[-1][0] * 1000), caught_up=True)
    rebuilt.learner.snapshot()
    assert delta(before) == {"waiting": 1, "credited": credited}
    assert len(rebuilt.learner.waiting) == 0 and not rebuilt.learner._due
    _learned_as_live(rebuilt, live)


def test_a_replay_credits_deferred_feedback_whose_decision_is_larger_than_the_join_cache(tmp_path: Path) -> None:
    """A decision larger than the join cache's whole budget is let go as it comes: live, the reaction waiting for it
    was credited with the decision in hand. Read back, it was deferred after the decision had gone already, and the
    release found nothing: given up as `unknown_decision`."""
    live = World(tmp_path / "live")
    t0 = live.clock.now
    big = _foreign(live, "ext-big")
    limit = len(big.data)  # the entry costs ENTRY_OVERHEAD more than the budget
    live.learner.joins.limit = limit
    log: list[tuple[float, str, Any]] = [(t0 + 1, "feedback", _reaction("f-1", "ext-big", "a", "acted")),
                                         (t0 + 2, "decision", big)]
    before = outcomes()
    read_live(live, log)
    assert delta(before) == {"waiting": 1, "credited": 1}

    rebuilt = World(tmp_path / "rebuilt")
    rebuilt.learner.joins.limit = limit
    rebuilt.clock.now = t0 + 600
    assert rebuilt.learner.restore(rebuilt.engine) is None
    rebuilt.learner.feedback_read = ReadUpTo()  # FEEDBACK follows DECISIONS
    before = outcomes()
    rebuilt.sink(log[0][2], _ack(t0 + 1, 1))
    rebuilt.learner.add_logged(big, _decisions_ack(t0 + 2, 1))
    rebuilt.learner.caught_up()
    rebuilt.learner.feedback_read.advance(int((t0 + 1) * 1000), caught_up=True)
    rebuilt.learner.snapshot()
    assert delta(before) == {"waiting": 1, "credited": 1}
    _learned_as_live(rebuilt, live)


def test_feedback_waiting_while_feedback_is_read_back_waits_in_feedback_s_time(tmp_path: Path) -> None:
    """While FEEDBACK is read back, feedback waiting for a decision DECISIONS has not brought yet is
    given up once FEEDBACK's time is `pending_max_age_s` past it, as live, not by the clock: a stall
    of the read-back does not give it up, and it is still given up in the end."""
    w = World(tmp_path)
    t0 = w.clock.now
    w.learner.feedback_read = ReadUpTo()  # FEEDBACK is read back
    before = outcomes()
    w.sink(_reaction("f-1", "ext-1", "a"), _ack(t0, 1))  # its decision is stored 5 s later
    w.sink(_reaction("f-2", "ext-never", "a"), _ack(t0 + 1, 2))  # its decision never comes
    w.clock.now = t0 + 600  # the read-back stalls for ten minutes
    w.learner.snapshot()
    assert delta(before) == {"waiting": 2}
    w.learner.add_logged(_foreign(w, "ext-1"), _decisions_ack(t0 + 5, 1))
    w.sink(_reaction("f-3", "ext-1", "b", "liked"), _ack(t0 + 6, 3))
    assert delta(before) == {"waiting": 2, "credited": 2}
    w.sink(_reaction("f-4", "ext-2", "a"), _ack(t0 + 30, 4))  # waits: FEEDBACK's time is 29 s past f-2
    w.learner.snapshot()
    assert delta(before) == {"waiting": 3, "credited": 2}
    w.sink(_reaction("f-5", "ext-3", "a"), _ack(t0 + 62, 5))  # 61 s past f-2, 32 s past f-4
    assert delta(before) == {"waiting": 4, "credited": 2, "unknown_decision": 1}
    assert set(w.learner.waiting.by_decision) == {"ext-2", "ext-3"}
    # FEEDBACK has caught up: waiting is the clock's again, and both waited longer than 60 s of it.
    w.learner.feedback_read.advance(int((t0 + 600) * 1000), caught_up=True)
    w.learner.snapshot()
    assert delta(before) == {"waiting": 4, "credited": 2, "unknown_decision": 3}
    assert not w.learner.waiting.by_decision and len(w.learner.waiting) == 0
    w.engine.dispose()


def test_feedback_read_back_waits_in_feedback_s_time_until_decisions_has_caught_up_too(tmp_path: Path) -> None:
    """FEEDBACK can reach its end before DECISIONS does (decisions stored after the last feedback):
    judged by the clock from then, feedback read back from longer ago than `pending_max_age_s` was
    given up at once, though DECISIONS was still to bring its decision, stored 5 s after it."""
    w = World(tmp_path)
    t0 = w.clock.now
    w.clock.now = t0 + 3600  # a rebuild an hour later
    assert w.learner.restore(w.engine) is None  # DECISIONS is read back until `caught_up`
    w.learner.feedback_read = ReadUpTo()
    before = outcomes()
    w.sink(_reaction("f-1", "ext-1", "a"), _ack(t0, 1))
    w.learner.feedback_read.advance(int(t0 * 1000), caught_up=True)  # FEEDBACK's last message
    w.learner.snapshot()
    assert delta(before) == {"waiting": 1}
    w.learner.add_logged(_foreign(w, "ext-1"), _decisions_ack(t0 + 5, 1))
    assert delta(before) == {"waiting": 1, "credited": 1}
    # Live again (both caught up): feedback whose decision never comes is given up by the clock.
    w.learner.caught_up()
    w.sink(_reaction("f-2", "ext-never", "a"), _ack(t0 + 3600, 2))
    w.clock.now += 61
    w.learner.snapshot()
    assert delta(before) == {"waiting": 2, "credited": 1, "unknown_decision": 1}
    w.engine.dispose()


def test_feedback_deferred_at_a_snapshot_is_deferred_again_after_a_restart(tmp_path: Path) -> None:
    """The deferred order (`Learner._due`) is not in the snapshot, only the waiting feedback: a
    restart mid-read-back defers it again when DECISIONS brings its decision back, and learns what
    live learned, in the same order."""
    live = World(tmp_path / "live")
    t0 = live.clock.now
    decisions = [(t0, _foreign(live, "ext-0")), (t0 + 4, _foreign(live, "ext-1"))]
    feedback = [(t0 + 1, _reaction("f-1", "ext-1", "a")), (t0 + 2, _reaction("f-2", "ext-0", "a", "disliked")),
                (t0 + 5, _reaction("f-3", "ext-1", "b", "liked"))]
    for stored_s, item in sorted([*decisions, *feedback], key=lambda e: e[0]):
        live.clock.now = stored_s
        if isinstance(item, LoggedDecision):
            live.learner.add_logged(item, _decisions_ack(stored_s, decisions.index((stored_s, item)) + 1))
        else:
            live.sink(item, _ack(stored_s, feedback.index((stored_s, item)) + 1))

    first = World(tmp_path / "rebuilt")
    first.clock.now = t0 + 3600
    assert first.learner.restore(first.engine) is None
    first.learner.feedback_read = ReadUpTo()  # FEEDBACK follows DECISIONS, which is read to its end
    for seq, (stored_s, decision) in enumerate(decisions, 1):
        first.learner.add_logged(decision, _decisions_ack(stored_s, seq))
        first.store.advance("DECISIONS", seq)
    first.learner.caught_up()
    before = outcomes()
    first.sink(feedback[0][1], _ack(feedback[0][0], 1))
    first.store.advance("FEEDBACK", 1)
    first.learner.feedback_read.advance(int(feedback[0][0] * 1000), caught_up=False)
    assert delta(before) == {"waiting": 1}, "deferred: live, its decision came 3 s later"
    with first.engine.begin() as conn:
        first.learner.write(conn, first.learner.snapshot(force=True))

    again = World(tmp_path / "rebuilt")  # stopped there, and started again
    again.clock.now = t0 + 3700
    positions = again.learner.restore(again.engine)
    assert positions == {"FEEDBACK": 1, "DECISIONS": 0}
    again.learner.feedback_read = ReadUpTo()
    for seq, (stored_s, decision) in enumerate(decisions, 1):
        again.learner.add_logged(decision, _decisions_ack(stored_s, seq))
    again.learner.caught_up()
    for seq, (stored_s, item) in enumerate(feedback[1:], 2):
        again.sink(item, _ack(stored_s, seq))
    again.learner.feedback_read.advance(int(feedback[-1][0] * 1000), caught_up=True)
    again.learner.snapshot()
    assert delta(before) == {"waiting": 1, "credited": 3}
    for version in ("v1", "v2"):
        assert again.lineup.models[version].to_bytes() == live.lineup.models[version].to_bytes()
    for world in (live, first, again):
        world.engine.dispose()


def test_feedback_deferred_while_feedback_is_read_back_is_held_within_pending_max(tmp_path: Path) -> None:
    w = World(tmp_path, pending_max=2)
    t0 = w.clock.now
    w.learner.feedback_read = ReadUpTo()  # FEEDBACK is read back
    before = outcomes()
    for i in range(3):
        w.learner.add_logged(_foreign(w, f"ext-{i}"), _decisions_ack(t0 + 5, i + 1))
    for i in range(3):
        w.sink(_reaction(f"f-{i}", f"ext-{i}", "a"), _ack(t0 + i * 0.1, i + 1))  # deferred
    assert delta(before) == {"waiting": 3, "unknown_decision": 1} and len(w.learner.waiting) == 2
    w.sink(_reaction("f-9", "ext-0", "b"), _ack(t0 + 6, 9))
    assert delta(before) == {"waiting": 3, "unknown_decision": 1, "credited": 3}
    assert len(w.learner.waiting) == 0
    w.engine.dispose()


def test_a_rebuild_gives_every_decision_read_back_its_row_however_old(tmp_path: Path) -> None:
    """No snapshot (the database dropped to rebuild from the log): a decision older than the
    join window still gets its `tip_scores` row. With a snapshot it is skipped, as its row exists."""
    earlier = World(tmp_path / "a")
    old = earlier.score(serve=False)
    rebuilt = World(tmp_path / "b")
    rebuilt.clock.now += 7200  # window 1 h: the decision is 2 h old
    assert rebuilt.learner.restore(rebuilt.engine) is None
    assert rebuilt.learner.add_logged(LoggedDecision(old.decision_id, old.payload))
    assert rebuilt.log.dirty[old.decision_id]["decision_id"] == old.decision_id
    rebuilt.learner.caught_up()
    newer = earlier.score(serve=False)
    assert not rebuilt.learner.add_logged(LoggedDecision(newer.decision_id, newer.payload))  # the rebuild is over
    earlier.engine.dispose()
    rebuilt.engine.dispose()


def test_the_join_cache_holds_what_its_budget_counts(tmp_path: Path) -> None:
    """The memory the cached decisions really take (tracemalloc) is within a quarter of what
    `cache_bytes` counts: the budget is the memory. Payloads as orjson returned them held 4-16
    KB each for ~2 KB of decision."""
    w = World(tmp_path, cache_mb=64)
    tips = tuple(f"tip-{i}" for i in range(10))
    w.score(tips=tips)  # caches warm: the models' and the scorer's own allocations come first
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = []
        for _ in range(300):
            scored = w.score(tips=tips)
            w.learner.published(scored.decision_id)  # the parsed decision is let go, as on an ack
            kept.append(scored.decision_id)
        w.log.dirty.clear()  # tip_scores rows wait for the next checkpoint: not the cache's
        del scored
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert all(d in w.learner.joins.cache for d in kept)
    counted = w.learner.joins.bytes
    assert held <= 1.25 * counted, f"{held} bytes held for {counted} counted"
    w.engine.dispose()


def test_a_snapshot_restores_models_credits_and_waiting_feedback(world: World, tmp_path: Path) -> None:
    scored = world.score()
    world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    world.react(scored.decision_id, "a")
    world.react("d-later", "b")
    world.store.advance("FEEDBACK", 2)
    checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                participants=[world.learner, world.log])
    assert asyncio.run(checkpointer.checkpoint())
    assert world.learner.snapshot() is None, "confirmed, nothing new"

    again = World(tmp_path)  # a restart: new objects over the same database
    positions = again.learner.restore(again.engine)
    assert positions == {"FEEDBACK": 2, "DECISIONS": 0}
    assert again.lineup.champion.n_learned == 1 and again.lineup.prior.count("a") == 1.0
    assert "d-later" in again.learner.waiting.by_decision
    # The decision comes back from the stream with its credit: the replayed feedback is a duplicate.
    again.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    before = outcomes()
    again.learner.on_feedback(parse_event(orjson.dumps({
        "id": "f-1", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
        "data": {"tip_id": "a", "decision_id": scored.decision_id, "reaction": "acted"}})), False)
    assert delta(before) == {"duplicate": 1}
    assert [row["rewards"] for row in again.log.dirty.values()] == [{"a": 1.0}]
    again.engine.dispose()


def test_feedback_that_gave_up_waiting_is_not_saved_as_waiting(world: World, tmp_path: Path) -> None:
    """Giving up on a reaction changed what the learner holds, but not its snapshot: the next checkpoints
    saved none, so a restart held the reaction again, waited `pending_max_age_s` afresh and counted it
    `unknown_decision` a second time."""
    world.react("d-never", "b")
    world.store.advance("FEEDBACK", 1)
    checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                participants=[world.learner, world.log])
    assert asyncio.run(checkpointer.checkpoint())
    world.clock.now += 61  # pending_max_age_s is 60
    before = outcomes()
    asyncio.run(checkpointer.checkpoint())  # gives it up, and saves that
    assert delta(before) == {"unknown_decision": 1}

    again = World(tmp_path)  # a restart: new objects over the same database
    again.learner.restore(again.engine)
    assert "d-never" not in again.learner.waiting.by_decision
    again.clock.now = world.clock.now + 61
    before = outcomes()
    again.learner.snapshot()
    assert delta(before) == {}, "given up once already"
    again.engine.dispose()


def checkpointed_waiting(world: World) -> Any:
    """A reaction waiting for a decision served elsewhere, saved by a checkpoint; that decision."""
    elsewhere = world.score(serve=False)
    world.react(elsewhere.decision_id, "a")
    world.store.advance("FEEDBACK", 1)
    checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                participants=[world.learner, world.log])
    assert asyncio.run(checkpointer.checkpoint())
    return elsewhere


def test_waiting_feedback_survives_a_long_stop(world: World, tmp_path: Path) -> None:
    """Feedback saved while waiting for its decision waits afresh after a restart, however long
    the stop: its FEEDBACK position is saved past it, so expiring it at once would lose it."""
    elsewhere = checkpointed_waiting(world)
    again = World(tmp_path)
    again.clock.now = world.clock.now + 3_600  # back an hour later; waiting gives up after 60 s
    again.learner.restore(again.engine)
    before = outcomes()
    again.learner.snapshot()  # the first checkpoint after the start expires what waited too long
    again.learner.add_logged(LoggedDecision(elsewhere.decision_id, elsewhere.payload))
    assert delta(before) == {"credited": 1} and again.lineup.champion.n_learned == 1
    again.engine.dispose()


def test_waiting_feedback_restored_survives_a_stalled_re_read_of_decisions(tmp_path: Path) -> None:
    """Restored, waiting feedback waits from the start; until DECISIONS has been re-read, in FEEDBACK's
    time: a re-read stalled longer than `pending_max_age_s` (60 s here) gave it up by the clock."""
    before_stop = World(tmp_path)
    t0 = before_stop.clock.now
    before_stop.sink(_reaction("f-1", "ext-1", "a"), _ack(t0, 1))
    before_stop.learner.feedback_read.advance(int(t0 * 1000), caught_up=True)  # as the FEEDBACK ingest does
    with before_stop.engine.begin() as conn:
        before_stop.learner.write(conn, before_stop.learner.snapshot(force=True))

    again = World(tmp_path)
    again.clock.now = t0 + 600  # back 10 minutes later (the window is an hour)
    again.learner.restore(again.engine)  # FEEDBACK has nothing new; DECISIONS is re-read
    before = outcomes()
    again.clock.now += 120  # the re-read stalls (the database away)
    again.learner.snapshot()
    again.learner.add_logged(_foreign(again, "ext-1"), _decisions_ack(t0 + 5, 1))
    assert delta(before) == {"credited": 1}
    before_stop.engine.dispose()
    again.engine.dispose()


def test_model_snapshots_are_spaced_by_what_serialising_the_models_costs(tmp_path: Path) -> None:
    class SlowToSerialise:  # each reading 0.25 s later: a snapshot's models take 0.5 s
        now = 0.0

        def __call__(self) -> float:
            self.now += 0.25
            return self.now

    w = World(tmp_path, snapshot_every_s=1, timer=SlowToSerialise())

    def learn_one_more() -> None:
        scored = w.score()
        w.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
        w.react(scored.decision_id, "a")

    learn_one_more()
    first = w.learner.snapshot()
    assert first is not None and set(first["models"]) == {"v1", "v2"}
    w.learner.saved(first)
    learn_one_more()
    timer = w.learner.timer
    timer.now += 2  # past TIPSTREAM_MODEL_SNAPSHOT_EVERY_S, but 0.5 s of serialising allow one per 50 s
    assert w.learner.snapshot() is None
    timer.now += 48
    second = w.learner.snapshot()
    assert second is not None and second["models"] and second["learn_seq"] == 2
    w.engine.dispose()


def test_snapshots_are_spaced_on_the_timer_not_the_wall_clock(tmp_path: Path) -> None:
    """NTP stepping the wall clock back an hour (a VM after a suspend) held every learner snapshot back for
    that hour: the spacing was measured on the wall clock, so a restart then replayed the whole hour."""
    class Timer:  # monotonic, as time.perf_counter is
        now = 1_000.0

        def __call__(self) -> float:
            return self.now

    timer = Timer()
    w = World(tmp_path, snapshot_every_s=5, timer=timer)
    for _ in range(2):
        scored = w.score()
        w.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
        w.react(scored.decision_id, "a")
        snapshot = w.learner.snapshot()
        assert snapshot is not None and snapshot["models"]
        w.learner.saved(snapshot)
        w.clock.now -= 3600  # the wall clock steps back an hour...
        timer.now += 6  # ...as the snapshot spacing passes
    w.engine.dispose()


def test_failed_saves_are_retried_by_the_next_checkpoint(world: World) -> None:
    scored = world.score()
    world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    first = world.log.snapshot()
    assert first is not None and len(first[1]) == 1
    # The transaction failed (no `saved`): the rows come again with the next snapshot.
    other = world.score()
    world.learner.add_logged(LoggedDecision(other.decision_id, other.payload))
    second = world.log.snapshot()
    assert sorted(r["decision_id"] for r in second[1]) == sorted([scored.decision_id, other.decision_id])
    world.log.saved(second)
    assert world.log.snapshot() is None and world.log.backlog == 0
    world.react(scored.decision_id, "a")
    learner_snapshot = world.learner.snapshot()
    assert learner_snapshot is not None and set(learner_snapshot["models"]) == {"v1", "v2"}
    again = world.learner.snapshot()
    assert again is not None and again["models"], "unconfirmed: taken again, models and all"
    world.learner.saved(again)
    world.score()  # a change, but nothing learned: the models in SQL are current
    assert world.learner.snapshot()["models"] == {}


def champion_likes_a_and_shadow_b(world: World, users: list[str], tips: tuple[str, ...]) -> None:
    for user in users:  # every tip has a reward history, so the models' scores count in the blend
        for tip in tips:  # (these decisions were never acknowledged by JetStream: they have no row)
            world.react(world.score(user=user, tips=tips).decision_id, tip, "liked", user=user)
    for _ in range(300):  # the shadow comes to prefer "b", the champion "a"
        for version, liked in (("v1", "a"), ("v2", "b")):
            for tip in tips:
                world.lineup.models[version].learn_one({"tip_id": tip}, 1.0 if tip == liked else 0.0)


def test_cards_estimate_what_the_champion_and_the_shadow_would_have_earned(world: World) -> None:
    users, tips = [f"u-{i}" for i in range(5)], ("a", "b", "c")
    champion_likes_a_and_shadow_b(world, users, tips)
    world.scorer.policy = make_policy("epsilon_greedy", epsilon=0.5)
    served = []
    for i in range(60):
        user = users[i % 5]
        scored = world.score(user=user, tips=tips)
        world.learner.published(scored.decision_id)  # JetStream acknowledged it: the row is marked
        first = scored.decision["ranked"][0]
        best = max(scored.decision["ranked"], key=lambda c: c["score"])["tip_id"]
        reward = 1.0 if first["tip_id"] == "b" else 0.0
        served.append((first["tip_id"], first["propensity"], reward, best, scored.decision["shadow"]["first"]))
        world.react(scored.decision_id, first["tip_id"], "acted" if reward else "dismissed", user=user)
    with world.engine.begin() as conn:
        write_tip_scores(conn, world.log.snapshot())

    def snips(agrees: list[bool]) -> float:
        weights = [1 / p if a else 0.0 for a, (_, p, _, _, _) in zip(agrees, served)]
        return sum(w * r for w, (_, _, r, _, _) in zip(weights, served)) / sum(weights)

    card = asyncio.run(world.lineup.evaluate("v2", "ops", "before promoting"))
    refreshed = world.lineup.registry.history[-1]
    assert (refreshed.action, refreshed.version, refreshed.actor, refreshed.note) == (
        "evaluate", "v2", "ops", "before promoting")  # an admin change: in the history, as docs/operations.md says
    shadow = card.offline_metrics["policy_value"]["as_shadow"]
    as_shadow = [tip == first for tip, _, _, _, first in served]
    as_champion = [tip == best for tip, _, _, best, _ in served]
    assert 0 < sum(as_shadow) < 60 and 0 < sum(as_champion) < 60, "both agree with the log only sometimes"
    assert shadow["decisions"] == 60 and shadow["logged_reward"] == sum(r for _, _, r, _, _ in served) / 60
    assert shadow["estimate"]["agreed"] == sum(as_shadow) and shadow["champion_greedy"]["agreed"] == sum(as_champion)
    assert shadow["estimate"]["snips"] == pytest.approx(snips(as_shadow))
    assert shadow["champion_greedy"]["snips"] == pytest.approx(snips(as_champion))
    assert shadow["estimate"]["snips"] > shadow["champion_greedy"]["snips"], "the shadow's choice is the rewarded one"
    markdown = world.lineup.registry.card_markdown("v2")
    assert "## Policy value" in markdown and "| effective n | left out |" in markdown


def _rewarded_and_checkpointed(w: World, users: int) -> None:
    """Users u-0... each rewarded once, then checkpointed: their rewards in `tip_scores`, where a training
    reads them. The learner takes part in registrations."""
    w.lineup.participants.append(w.learner)
    for i in range(users):
        scored = w.score(user=f"u-{i}")
        w.learner.published(scored.decision_id)
        w.react(scored.decision_id, "a", user=f"u-{i}")
    w.store.advance("FEEDBACK", users)
    checkpointer = Checkpointer(w.store, SqlCheckpointStore(w.engine), every_events=1, every_s=60,
                                participants=[w.learner, w.log])
    assert asyncio.run(checkpointer.checkpoint())


def test_a_version_registered_learns_the_rewards_the_log_did_not_hold_yet(tmp_path: Path) -> None:
    """A new version is trained on the rewards in SQL; those credited since the last checkpoint,
    and while its registration is saved, reach it too, and a restart keeps them."""
    w = World(tmp_path)
    _rewarded_and_checkpointed(w, 3)
    for i in range(3, 7):  # credited since: rows not written
        scored = w.score(user=f"u-{i}")
        w.learner.published(scored.decision_id)
        w.react(scored.decision_id, "b", user=f"u-{i}")
    w.store.advance("FEEDBACK", 7)
    late = w.score(user="u-7")
    save, saving = w.lineup.store.save, threading.Event()

    def slow_save(*args: Any, **kwargs: Any) -> None:
        saving.set()
        assert release.wait(60), "the reward was not credited during the save"
        save(*args, **kwargs)

    async def register_while_a_reward_comes() -> None:
        registering = asyncio.create_task(w.lineup.register("v3", "logreg", {}, actor="t"))
        # Not a bound on the training: on a loaded machine its process took over 5 s to reach the save, and the
        # reward, credited before it, was saved with v3 (n_learned 8 after the restart, not 7).
        assert await asyncio.to_thread(saving.wait, 60), "the registration never reached its save"
        w.react(late.decision_id, "a", user="u-7")  # credited while the registration is saved
        release.set()
        await registering

    release = threading.Event()
    w.lineup.store.save = slow_save  # type: ignore[method-assign]
    asyncio.run(register_while_a_reward_comes())
    assert {v: m.n_learned for v, m in w.lineup.learning} == {"v1": 8, "v2": 8, "v3": 8}
    again = World(tmp_path)  # a restart: v3 from its saved bytes, then the feedback after its snapshot
    positions = again.learner.restore(again.engine)
    assert positions is not None and positions["FEEDBACK"] == 7
    assert again.lineup.models["v3"].n_learned == 7, "the reward that came during the save is replayed"
    w.engine.dispose()
    again.engine.dispose()


def test_users_forgotten_are_held_for_a_training_running_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version trained over the log while a user is forgotten drops their features before it learns,
    so the lineup notes who is forgotten. Noted for the whole run, every request to forget stayed in
    memory for good: only those made while a training runs are, until it ends."""
    w = World(tmp_path)
    _rewarded_and_checkpointed(w, 3)
    at_ms = int(w.clock.now * 1000)
    forget(w.learner, "u-0", at_ms)
    assert w.lineup.forgotten == [], "no training runs: nothing to hold"
    evaluated = Lineup._evaluated

    async def forgotten_while_trained(self: Lineup, params: dict[str, Any], version: str | None = None) -> Any:
        result = await evaluated(self, params, version)
        learner = self.participants[0]  # as the eraser's step 2 does, on the loop, while the training runs
        learner.forget_user("u-1", at_ms, await learner.decisions_to_forget("u-1", at_ms))
        assert self.forgotten == ["u-1"]
        return result

    monkeypatch.setattr(Lineup, "_evaluated", forgotten_while_trained)
    asyncio.run(w.lineup.register("v3", "logreg", {}, actor="t"))
    v3 = w.lineup.models["v3"]
    assert isinstance(v3, TipModel) and v3.forget_user("u-1") == 0, "dropped before it joined"
    assert v3.forget_user("u-2") > 0, "it learned the others"
    assert w.lineup.forgotten == [], "the training ended"
    w.engine.dispose()


def cold_decisions(world: World, count: int, pay: dict[str, float]) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """`count` decisions of tips nobody has reacted to yet, as logged, each with the reward of
    the tip served first: half over ("a", "b", "c"), whose scores all tie at the base rate, half
    over "d" alone."""
    decisions = []
    for i in range(count):
        tips = ("a", "b", "c") if i % 2 else ("d",)
        scored = world.score(user=f"u-{i}", tips=tips, serve=False)
        served = scored.decision["ranked"][0]["tip_id"]
        decisions.append((orjson.loads(orjson.dumps(scored.decision)), {served: pay[served]}))
    return decisions


def test_the_greedy_estimate_takes_the_champion_s_own_choice_among_tied_tips(world: World) -> None:
    world.scorer.policy = make_policy("epsilon_greedy", epsilon=0.3)
    decisions = cold_decisions(world, 6000, {"a": 0.0, "b": 1.0, "c": 1.0, "d": 0.0})
    assert len({c["score"] for c in decisions[1][0]["ranked"]}) == 1, "the three tips tie"
    greedy = evaluation.policy_value(decisions, "v1")["as_champion"]["greedy"]
    # Without exploring, the champion serves the caller's first of the tied tips, "a", worth 0;
    # "d" alone is worth 0 too. Taking the best-scored tip in served order counted every
    # explored decision as agreeing (0.66).
    assert greedy["snips"] == 0.0 and greedy["ips"] == 0.0 and greedy["agreed"] > 1000
    # Decisions logged before the champion's choice was: each tied tip is its choice with
    # probability 1/3, worth 2/3 on average over the callers' orders.
    for decision, _ in decisions:
        del decision["greedy"]
    greedy = evaluation.policy_value(decisions, "v1")["as_champion"]["greedy"]
    truth = 0.5 * 2 / 3 + 0.5 * 0.0
    assert greedy["snips"] == pytest.approx(truth, abs=0.03) and greedy["ips"] == pytest.approx(truth, abs=0.03)
    assert greedy["ci95"][0] <= truth <= greedy["ci95"][1]


def test_decisions_that_could_not_serve_the_target_s_choice_are_left_out_and_counted(world: World) -> None:
    users = [f"u-{i}" for i in range(5)]
    champion_likes_a_and_shadow_b(world, users, ("a", "b"))
    world.scorer.policy = make_policy("epsilon_greedy", epsilon=0.3)
    decisions = []
    for i in range(2000):
        # A widget asks with explore=false, and there "b" (the shadow's choice) would pay 0.8.
        explore = i % 2 == 1
        pay = {"a": 0.2, "b": 0.1} if explore else {"a": 0.2, "b": 0.8}
        decision = world.score(user=users[i % 5], explore=explore, serve=False).decision
        scores = {c["tip_id"]: c["score"] for c in decision["ranked"]}
        assert decision["shadow"]["first"] == "b" and scores["a"] > scores["b"], "no ties"
        served = decision["ranked"][0]["tip_id"]
        decisions.append((orjson.loads(orjson.dumps(decision)), {served: pay[served]}))
    shadow = evaluation.policy_value(decisions, "v2")["as_shadow"]
    # Greedy answers give "b" propensity 0: what it would have earned there (0.8) is not in the
    # log at any weight. The estimate is of the exploring half only, and says so.
    own = shadow["estimate"]
    assert (own["n"], own["skipped_unsupported"]) == (1000, 1000)
    assert own["snips"] == pytest.approx(0.1) and own["ips"] == pytest.approx(0.1, abs=0.03)
    # The champion's best was served with propensity 1 on greedy answers, but the two are
    # compared on the same decisions: those that could have served either tip.
    champion = shadow["champion_greedy"]
    assert (champion["n"], champion["skipped_unsupported"]) == (1000, 1000)
    assert champion["snips"] == pytest.approx(0.2)
    # As champion alone, greedy answers count (its choice was served with propensity 1).
    assert evaluation.policy_value(decisions, "v1")["as_champion"]["greedy"]["n"] == 2000


def test_a_shadow_is_not_credited_with_the_greedy_answers_it_happened_to_agree_with() -> None:
    rng = random.Random(3)
    decisions = []
    for i in range(4000):
        greedy_answer = i % 2 == 0
        # On greedy answers "a" was served; the shadow agrees on the well-paid ones (reward 1)
        # and prefers "b" on the others. Kept, the agreeing ones would lift its estimate.
        reward = float(rng.random() < 0.5)
        if greedy_answer:
            ranked = [{"tip_id": "a", "score": 0.9, "propensity": 1.0}, {"tip_id": "b", "score": 0.1, "propensity": 0.0}]
            shadow_first, served, paid = ("a" if reward else "b"), "a", reward
        else:
            served = "a" if rng.random() < 0.5 else "b"
            ranked = [{"tip_id": t, "score": s, "propensity": 0.5} for t, s in ((served, 0.9), ("b" if served == "a" else "a", 0.1))]
            shadow_first, paid = "b", 0.3 if served == "b" else 0.0
        decision = {"model_version": "v1", "greedy": "a", "shadow": {"version": "v2", "first": shadow_first}, "ranked": ranked}
        decisions.append((decision, {served: paid}))
    own = evaluation.policy_value(decisions, "v2")["as_shadow"]["estimate"]
    assert (own["n"], own["skipped_unsupported"]) == (2000, 2000)
    assert own["snips"] == pytest.approx(0.3)


def test_progressive_validation_predicts_a_decision_s_tips_before_learning_any_of_them() -> None:
    rng = random.Random(0)
    decisions = []
    for i in range(1500):  # one decision per user, who reacts to both tips alike, at random
        reward = float(rng.random() < 0.5)
        ranked = [{"tip_id": "a", "score": 0.5, "propensity": 0.9}, {"tip_id": "b", "score": 0.5, "propensity": 0.1}]
        decisions.append(({"features": {"user_id": f"u-{i}", "hour_of_day": 9}, "ranked": ranked},
                          {"a": reward, "b": reward}))
    _, card = evaluation.evaluate({}, evaluation.rewarded_log(decisions, 10_000))
    # Nothing known when serving says anything about the reaction. Learning the first tip's
    # reward before predicting the second (same user, same features) would make it look known.
    assert card.offline_metrics["n"] == 3000
    assert abs(card.offline_metrics["roc_auc"] - 0.5) < 0.08



def delayed_log(tmp_path: Path, delay_s: float) -> Any:
    """`tip_scores` of 600 users served twice, 10 minutes apart, each reacting alike to both by
    mood (at random); the rewards of both arrive `delay_s` after their decision."""
    rng = random.Random(1)
    url = f"sqlite:///{tmp_path / 'log.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    start = datetime(2026, 11, 26, 8, tzinfo=UTC)
    rows = []
    for i in range(600):
        reward = float(rng.random() < 0.5)
        for k in range(2):
            served = start + timedelta(minutes=2 * i + 10 * k)  # other users are served in between
            ms = int(served.timestamp() * 1000)
            decision = {"id": f"d-{ms:012x}{i:08x}{k:08x}", "ts": served.isoformat(), "user_id": f"u-{i}",
                        "model_version": "v1", "features": {"user_id": f"u-{i}", "hour_of_day": 9},
                        "ranked": [{"tip_id": "a", "category": "focus", "score": 0.5, "propensity": 1.0}]}
            rows.append(tip_score_row(decision, orjson.dumps(decision), {"a": reward}, ms + int(delay_s * 1000)))
    with engine.begin() as conn:
        write_tip_scores(conn, (1, rows))
    return engine


def test_progressive_validation_learns_a_reward_only_once_it_had_arrived(tmp_path: Path) -> None:
    # The user's second decision is served 10 minutes after the first, their reactions to both
    # come an hour later: when it served the second, the model knew nothing of this user's mood.
    late = delayed_log(tmp_path / "late", delay_s=3600)
    decisions = evaluation.rewarded_decisions(late, 10_000).decisions
    model, card = evaluation.evaluate({}, evaluation.rewarded_log(decisions, 10_000))
    # Learning the first reaction before predicting the second read ROC AUC 0.87, log loss 0.51 (now 0.47, 0.71).
    assert card.offline_metrics["n"] == 1200 and model.n_learned == 1200, "every reward is learned, at the end"
    assert abs(card.offline_metrics["roc_auc"] - 0.5) < 0.06
    # Had the reactions come within a minute, the second decision would have been served knowing the first.
    prompt = delayed_log(tmp_path / "prompt", delay_s=60)
    decisions = evaluation.rewarded_decisions(prompt, 10_000).decisions
    _, card = evaluation.evaluate({}, evaluation.rewarded_log(decisions, 10_000))
    assert card.offline_metrics["roc_auc"] > 0.7
    late.dispose()
    prompt.dispose()


def test_the_card_summary_counts_rewards_not_decisions() -> None:
    from app.models_cli import _card_summary

    ranked = [{"tip_id": "a", "score": 0.5, "propensity": 0.9}, {"tip_id": "b", "score": 0.5, "propensity": 0.1}]
    decisions = [({"features": {"hour_of_day": 9}, "ranked": ranked}, {"a": 1.0, "b": 0.0}),
                 ({"features": {"hour_of_day": 9}, "ranked": ranked}, {"b": 1.0})]
    _, card = evaluation.evaluate({}, evaluation.rewarded_log(decisions, 10))
    assert card.offline_metrics["n"] == 3  # two decisions, three rewarded tips
    summary = _card_summary("v1", {"card": card.to_dict()})
    assert "progressive validation over 3 rewards (rewarded tips of the logged decisions)" in summary

def test_a_registration_does_not_save_its_learner_snapshot_beside_a_checkpoint(tmp_path: Path) -> None:
    """Both snapshot the learner: were the older one to commit last, the database would hold
    models newer than the positions beside them, and a restart would learn rewards twice."""
    w = World(tmp_path)
    w.lineup.participants.append(w.learner)
    scored = w.score()
    w.learner.published(scored.decision_id)
    w.react(scored.decision_id, "a")
    target = SqlCheckpointStore(w.engine)
    asked: list[bool] = []  # the lock held when each asked for it

    class NotedLock(asyncio.Lock):
        async def acquire(self) -> bool:
            asked.append(self.locked())
            return await super().acquire()

    w.lineup.snapshot_lock = NotedLock()
    checkpointer = Checkpointer(w.store, target, every_events=1, every_s=60, participants=[w.learner, w.log],
                                lock=w.lineup.snapshot_lock)
    saves: list[str] = []
    writing, release = threading.Event(), threading.Event()
    checkpoint_save, registry_save = target.save, w.lineup.store.save

    def slow_checkpoint_save(*args: Any) -> None:
        writing.set()
        assert release.wait(60), "never released"
        checkpoint_save(*args)
        saves.append("checkpoint")

    def registry_save_logged(*args: Any, **kwargs: Any) -> None:
        registry_save(*args, **kwargs)
        saves.append("registration")

    async def both() -> None:
        checkpointing = asyncio.create_task(checkpointer.checkpoint())
        assert await asyncio.to_thread(writing.wait, 60), "the save was never reached"
        registering = asyncio.create_task(w.lineup.register("v3", "logreg", {}, actor="t"))
        # Until the registration waits for the lock the checkpoint holds: not a pause it may or may not
        # save within (its training in a thread can outlast any on a loaded machine).
        await eventually(lambda: len(asked) == 2 or registering.done(), timeout=60)
        assert asked == [False, True] and not registering.done(), (asked, registering)
        release.set()
        await asyncio.gather(checkpointing, registering)

    target.save = slow_checkpoint_save  # type: ignore[method-assign]
    w.lineup.store.save = registry_save_logged  # type: ignore[method-assign]
    asyncio.run(both())
    assert saves == ["checkpoint", "registration"]
    w.engine.dispose()


def test_a_decision_the_join_cache_let_go_before_its_ack_still_gets_its_row(tmp_path: Path) -> None:
    """The DECISIONS position moves past an acknowledged decision, so no re-read would write its
    row later: the acknowledgement carries the decision's bytes for that case."""
    w = World(tmp_path, cache_mb=0.01)  # about ten decisions
    waiting = [w.score(user=f"u-{i}") for i in range(40)]  # JetStream away: none acknowledged yet
    assert waiting[0].decision_id not in w.learner.joins.cache
    for scored in waiting:
        w.learner.published(scored.decision_id, scored.payload)
    assert sorted(w.log.dirty) == sorted(s.decision_id for s in waiting)
    row = w.log.dirty[waiting[0].decision_id]
    assert row["user_id"] == "u-0" and row["tip_id"] == waiting[0].decision["ranked"][0]["tip_id"]
    w.engine.dispose()


def test_a_decision_the_join_cache_let_go_before_its_ack_is_not_held_again_when_read_back(tmp_path: Path) -> None:
    """NATS away: the budget lets a credited decision go before JetStream acknowledged it, and the
    DECISIONS ingest reads it back after the reconnect. Held again, it had lost its credits, and the
    reaction sent again was learned a second time. It stays let go (`expired`, as `_wait` counts
    feedback for it), and so does another tipstream's decision made before it, which gets its row."""
    w = World(tmp_path, cache_mb=0.002)  # about one decision
    t0 = w.clock.now
    let_go = w.score()
    w.sink(_reaction("f-1", let_go.decision_id, "a"), _ack(t0, 1))
    for _ in range(3):
        w.score()
    assert w.learner.joins.get(let_go.decision_id) is None
    elsewhere = _foreign(w, f"d-{decision_time_ms(let_go.decision_id):012x}{0xE15E:08x}{0:08x}")
    before = outcomes()
    assert w.learner.add_logged(LoggedDecision(let_go.decision_id, let_go.payload), _decisions_ack(t0 + 1, 1))
    assert w.learner.add_logged(elsewhere, _decisions_ack(t0 + 1, 2))
    w.sink(_reaction("f-2", let_go.decision_id, "a"), _ack(t0 + 1, 2))  # the reaction sent again
    w.sink(_reaction("f-3", let_go.decision_id, "b"), _ack(t0 + 1, 3))
    w.sink(_reaction("f-4", elsewhere.id, "a"), _ack(t0 + 1, 4))
    assert delta(before) == {"expired": 3}
    assert {v: m.n_learned for v, m in w.lineup.learning} == {"v1": 1, "v2": 1}
    assert w.learner.joins.get(let_go.decision_id) is None and w.learner.joins.get(elsewhere.id) is None
    assert w.log.dirty[elsewhere.id]["rewards"] is None
    w.engine.dispose()


def test_a_decision_served_during_a_start_s_read_back_and_let_go_is_not_held_again_without_its_credits(
        tmp_path: Path) -> None:
    """A start reads DECISIONS back to its end while /score serves: one served meanwhile, credited and let go by
    the budget before the read-back reaches it, was held again, its credits (this run's) not among those the
    snapshot restores, and the reaction delivered again was learned a second time."""
    w = World(tmp_path, cache_mb=0.004)  # a few decisions
    w.learner.replaying = True  # as `restore` leaves it until the DECISIONS tail has caught up
    t0 = w.clock.now
    served = w.score()
    w.learner.published(served.decision_id)
    w.sink(_reaction("f-1", served.decision_id, "a"), _ack(t0, 1))
    for _ in range(3):
        w.score()
    assert w.learner.joins.get(served.decision_id) is None
    assert w.learner.joins.bytes + len(served.payload) + ENTRY_OVERHEAD <= w.learner.joins.limit, "room to hold it"
    before = outcomes()
    w.learner.add_logged(LoggedDecision(served.decision_id, served.payload), _decisions_ack(t0 + 1, 1))
    w.sink(_reaction("f-1", served.decision_id, "a"), _ack(t0 + 1, 2, delivered=2))  # its ack lost
    assert delta(before) == {"expired": 1}
    assert {v: m.n_learned for v, m in w.lineup.learning} == {"v1": 1, "v2": 1}
    w.engine.dispose()


def test_a_decision_stored_twice_read_again_by_a_start_after_the_budget_let_it_go_keeps_its_credits(
        tmp_path: Path) -> None:
    """A start's read-back of DECISIONS holds again what it reads. The first copy of a decision stored twice (the
    spool's send after JetStream's duplicate window) came back with the snapshot's credits; let go by the budget
    before the second copy was read, that one was held without them, and a reaction delivered again was learned a
    second time."""
    first = World(tmp_path)
    assert first.learner.restore(first.engine) is None
    first.learner.caught_up()
    t0 = first.clock.now
    decision = first.score()
    first.learner.published(decision.decision_id)
    first.sink(_reaction("f-1", decision.decision_id, "a"), _ack(t0, 1))
    first.store.advance("FEEDBACK", 1)
    checkpointer = Checkpointer(first.store, SqlCheckpointStore(first.engine), every_events=1, every_s=60,
                                participants=[first.learner, first.log])
    first.learner.snapshot_at_next_checkpoint()
    assert asyncio.run(checkpointer.checkpoint())
    first.engine.dispose()

    again = World(tmp_path)
    again.learner.restore(again.engine)
    large = again.score(tips=tuple(f"t-{n}" for n in range(12)), serve=False)
    medium = again.score(tips=tuple(f"m-{n}" for n in range(6)), serve=False)
    # Room for the decision and the large one; the medium one served after makes both go, and leaves room again.
    again.learner.joins.limit = len(decision.payload) + len(large.payload) + 2 * ENTRY_OVERHEAD
    again.learner.add_logged(LoggedDecision(decision.decision_id, decision.payload), _decisions_ack(t0 + 1, 1))
    for served in (large, medium):
        again.learner.served(served.decision_id, served.payload, served.decision)
    assert again.learner.joins.get(decision.decision_id) is None
    again.learner.add_logged(LoggedDecision(decision.decision_id, decision.payload), _decisions_ack(t0 + 2, 4))
    assert again.learner.joins.get(decision.decision_id).credits == {"a": 1.0}
    before = outcomes()
    again.sink(_reaction("f-1", decision.decision_id, "a"), _ack(t0 + 3, 2, delivered=2))
    assert delta(before) == {"duplicate": 1}
    assert {v: m.n_learned for v, m in again.lineup.learning} == {"v1": 1, "v2": 1}
    again.engine.dispose()


def test_a_registry_change_cancelled_while_it_is_saved_leaves_memory_as_sql_has_it(world: World) -> None:
    """The transaction runs on in its thread after the request is cancelled (a client gone, a
    shutdown) and commits: memory must follow, or later changes are checked against stale roles."""
    save, saving, release = world.lineup.store.save, threading.Event(), threading.Event()

    def slow_save(*args: Any, **kwargs: Any) -> None:
        saving.set()
        assert release.wait(60), "never released"
        save(*args, **kwargs)

    async def cancel_a_promotion() -> None:
        world.lineup.store.save = slow_save  # type: ignore[method-assign]
        promoting = asyncio.create_task(world.lineup.promote("v2", actor="t"))
        assert await asyncio.to_thread(saving.wait, 60), "the save was never reached"
        promoting.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the change while its save still runs
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await promoting

    asyncio.run(cancel_a_promotion())
    stored, _ = world.lineup.store.load()
    assert stored.champion == world.lineup.registry.champion == "v2"
    assert world.lineup.champion_version == "v2"


def test_a_rebuild_stopped_half_way_goes_on_as_a_rebuild(tmp_path: Path) -> None:
    """A rebuild from the log checkpoints as it goes; stopped (or crashed) half way, the next
    start has a snapshot. Before, that start was an ordinary restart: a decision older than the
    window, not re-read yet, was skipped (no `tip_scores` row, its reaction never learned), and
    one re-read again was marked without the credits of the first pass (the restore dropped them
    as too old), erasing its reward from its row."""
    earlier = World(tmp_path / "a")
    first, second = earlier.score(serve=False), earlier.score(serve=False)
    rebuild = World(tmp_path / "b")
    rebuild.clock.now += 7200  # window 1 h: both decisions are 2 h old
    assert rebuild.learner.restore(rebuild.engine) is None
    assert rebuild.learner.add_logged(LoggedDecision(first.decision_id, first.payload))
    t0 = earlier.clock.now
    reaction = {"id": "f-0", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                "data": {"tip_id": "a", "decision_id": first.decision_id, "reaction": "acted"}}
    rebuild.sink(parse_event(orjson.dumps(reaction)), _ack(t0 + 60, 1))
    assert rebuild.log.dirty[first.decision_id]["rewards"] == {"a": 1.0}
    other = {**reaction, "id": "f-1", "data": {"tip_id": "a", "reaction": "acted"}}  # FEEDBACK read further
    rebuild.sink(parse_event(orjson.dumps(other)), _ack(t0 + 5400, 2))
    with rebuild.engine.begin() as conn:  # a checkpoint, then the rebuild stops
        rebuild.learner.write(conn, rebuild.learner.snapshot(force=True))

    resumed = World(tmp_path / "b")
    resumed.clock.now = rebuild.clock.now + 60
    assert resumed.learner.restore(resumed.engine) is not None
    before = outcomes()
    resumed.react(second.decision_id, "b", "liked")  # FEEDBACK is read from its position: not waiting
    resumed.learner.add_logged(LoggedDecision(first.decision_id, first.payload))  # DECISIONS from the front
    assert resumed.log.dirty.get(first.decision_id, {"rewards": {"a": 1.0}})["rewards"] == {"a": 1.0}
    assert resumed.learner.add_logged(LoggedDecision(second.decision_id, second.payload))
    assert resumed.log.dirty[second.decision_id]["rewards"] == {"b": 0.8}
    assert delta(before) == {"waiting": 1, "credited": 1}
    for world in (earlier, rebuild, resumed):
        world.engine.dispose()


def test_feedback_that_teaches_nothing_still_moves_the_snapshots_position(world: World) -> None:
    """Feedback without a decision changes no model, but FEEDBACK has been read past it. A snapshot
    left at its old position had every restart re-read FEEDBACK from there: all of it, for an app
    that never names decisions."""
    world.learner.saved(world.learner.snapshot(force=True))
    for _ in range(3):
        world.react(None, "a")
    world.store.advance("FEEDBACK", 3)
    moved = world.learner.snapshot()
    assert moved is not None and orjson.loads(moved["state"])["positions"]["FEEDBACK"] == 3
    assert moved["models"] == {}, "nothing learned: the models are not copied again"
    world.learner.saved(moved)
    assert world.learner.snapshot() is None


def test_a_registration_makes_the_new_model_s_bytes_off_the_event_loop(world: World, monkeypatch: Any) -> None:
    """Serialising a large model takes ~100 ms (240k weights), a stall for every /score waiting on
    the loop; a frozen copy takes ~18. The loop copies, the saving thread serialises."""
    from models.reward import TipModel

    serialised_on, to_bytes = [], TipModel.to_bytes

    def recording(model: TipModel) -> bytes:
        serialised_on.append(threading.current_thread())
        return to_bytes(model)

    monkeypatch.setattr(TipModel, "to_bytes", recording)
    asyncio.run(world.lineup.register("v3", "logreg", {}, actor="t"))
    assert serialised_on and threading.main_thread() not in serialised_on
    with world.engine.connect() as conn:
        saved = conn.execute(sa.text("select model, n_learned from model_versions where version = 'v3'")).one()
    assert TipModel.from_bytes(bytes(saved[0])).n_learned == saved[1] == world.lineup.models["v3"].n_learned


@pytest.mark.parametrize("layout", ["list", "map", "buckets"])
def test_waiting_feedback_saved_by_an_older_release_is_restored(world: World, tmp_path: Path, layout: str) -> None:
    """Snapshots before 2026-12-03 listed waiting feedback as [decision, tip, reaction, at, user,
    stored] (`pending`), then kept the learner's whole map (`waiting`), then that map by bucket of
    arrival (`waiting_buckets`, before 2026-12-05), which holds one user's reaction a tip; they are
    now saved as those rows by bucket (`waiting_rows`), each serialised again only when it changed."""
    elsewhere = checkpointed_waiting(world)
    with world.engine.begin() as conn:
        state = orjson.loads(bytes(conn.execute(sa.text("select state from learner_state where name = 'learner'"))
                                   .scalar_one()))
        row = [elsewhere.decision_id, "a", "acted", world.clock.now, "u-1", None]
        assert state["waiting_rows"] == [[row]]
        assert state["waiting_buckets"] == [] and state["waiting"] == {} and state["pending"] == []
        held = {elsewhere.decision_id: {"a": row[2:]}}
        old = {k: v for k, v in state.items() if k not in ("waiting_rows", "waiting_buckets", "waiting", "pending")}
        old |= {"list": {"pending": [row]}, "map": {"waiting": held}, "buckets": {"waiting_buckets": [held]}}[layout]
        conn.execute(sa.text("update learner_state set state = :s where name = 'learner'"), {"s": orjson.dumps(old)})
    again = World(tmp_path)
    again.learner.restore(again.engine)
    before = outcomes()
    again.learner.add_logged(LoggedDecision(elsewhere.decision_id, elsewhere.payload))
    assert delta(before) == {"credited": 1} and again.lineup.champion.n_learned == 1
    again.engine.dispose()


# The learner's snapshot as the release before 2026-12-05 (main at 03c6b2e) wrote it, `Learner.snapshot`'s
# "state": u-1's reactions to tips a (at T) and b (at T + 6, the next bucket) of another publisher's decision
# ext-1, u-2's to tip a of ext-2, both decisions made for u-1 and not come yet.
WAITING_BUCKETS_STATE = (
    b'{"positions":{"FEEDBACK":3,"DECISIONS":0},"credits":{},"waiting_buckets":[{"ext-1":{"a":["acted",'
    b'1780000000.5,"u-1",1780000000500]}},{"ext-2":{"a":["liked",1780000006.5,"u-2",1780000006500]},"ext-1":{"b":'
    b'["liked",1780000006.5,"u-1",1780000006500]}}],"waiting":{},"pending":[],"evicted_upto_ms":0,'
    b'"feedback_ms":1780000006500,"rows_to_rebuild":false}')


def test_waiting_feedback_in_a_snapshot_the_release_before_wrote_is_joined_once_after_the_upgrade(
        world: World) -> None:
    """Stop the release before, start this one: the reactions its snapshot held waiting are joined
    when their decisions come, once each (another user's refused); redelivered then, a duplicate."""
    t = 1_780_000_000.5
    with world.engine.begin() as conn:
        conn.execute(sa.insert(db.learner_state).values(name="learner", state=WAITING_BUCKETS_STATE,
                                                        updated_at=datetime.now(UTC)))
    world.clock.now = t + 30
    assert world.learner.restore(world.engine) == {"FEEDBACK": 3, "DECISIONS": 0}
    assert held_waiting(world.learner) == {("ext-1", "a", "u-1"): ["acted", t + 30, "u-1", int(t * 1000)],
                                           ("ext-1", "b", "u-1"): ["liked", t + 30, "u-1", int(t * 1000) + 6000],
                                           ("ext-2", "a", "u-2"): ["liked", t + 30, "u-2", int(t * 1000) + 6000]}
    before = outcomes()
    for seq, decision_id in enumerate(("ext-1", "ext-2"), 1):
        world.learner.add_logged(_foreign(world, decision_id), _decisions_ack(t + 20, seq))
    world.learner.caught_up()
    assert delta(before) == {"credited": 2, "wrong_user": 1} and len(world.learner.waiting) == 0
    assert world.learner.joins.cache["ext-1"].credits == {"a": 1.0, "b": 0.8} and not world.learner.joins.cache["ext-2"].credits
    world.sink(_reaction("f-1", "ext-1", "a"), _ack(t, 1))  # FEEDBACK redelivers what the snapshot held
    assert delta(before) == {"credited": 2, "wrong_user": 1, "duplicate": 1}
    assert {v: m.n_learned for v, m in world.lineup.learning} == {"v1": 2, "v2": 2}
    state = orjson.loads(world.learner.snapshot(force=True)["state"])
    assert state["waiting_rows"] == [] and state["waiting_buckets"] == []


def saved_waiting(state: dict[str, Any]) -> dict[tuple[str, str, str], list[Any]]:
    saved = [((d, t, entry[2]), entry) for bucket in state["waiting_rows"] for d, t, *entry in bucket]
    assert len(saved) == len(dict(saved)), "a reaction saved in two buckets"
    return dict(saved)


def held_waiting(learner: Learner) -> dict[tuple[str, str, str], list[Any]]:
    return {(d, t, u): list(entry) for d, held in learner.waiting.by_decision.items() for (t, u), entry in held.items()}


def test_a_snapshot_serialises_again_only_the_waiting_buckets_that_changed(world: World) -> None:
    """Waiting feedback is saved by bucket of arrival: at the 100k bound, serialising all of it
    took 22-29 ms of the event loop every snapshot."""
    from app.waiting import BUCKET_S

    old = [world.score(serve=False) for _ in range(3)]
    for scored in old:
        world.react(scored.decision_id, "a")
        world.clock.now += BUCKET_S
    world.learner.snapshot(force=True)
    serialised = dict(world.learner.waiting._json)
    assert len(serialised) == 3
    new = world.score(serve=False)
    world.react(new.decision_id, "b")  # a fourth bucket
    world.learner.add_logged(LoggedDecision(old[0].decision_id, old[0].payload))  # the first bucket's joined
    state = orjson.loads(world.learner.snapshot(force=True)["state"])
    again = world.learner.waiting._json
    assert len(again) == 3 and all(again[b] is serialised[b] for b in list(serialised)[1:])
    assert saved_waiting(state) == held_waiting(world.learner) and len(held_waiting(world.learner)) == 3


@pytest.mark.parametrize("seed", range(6))
def test_waiting_feedback_saved_by_bucket_is_exactly_what_waits(tmp_path: Path, seed: int) -> None:
    """Reactions (some from another user than the decision's) wait, are joined by their decision,
    expire by age and past the bound, with snapshots between: every snapshot holds exactly what waits (each bucket it reuses unchanged),
    and a restart restores it."""
    rng = random.Random(seed)
    world = World(tmp_path, pending_max=12, pending_max_age_s=60)
    unserved: list[Any] = []
    snapshots = 0
    for _ in range(400):
        action = rng.random()
        if action < 0.5:
            if not unserved or rng.random() < 0.3:
                unserved.append(world.score(serve=False, tips=("a", "b", "c")))
            world.react(rng.choice(unserved).decision_id, rng.choice("abc"), user=rng.choice(["u-1", "u-1", "u-2"]))
        elif action < 0.6 and unserved:
            scored = unserved.pop(rng.randrange(len(unserved)))
            world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
        elif action < 0.85:
            world.clock.now += rng.uniform(0, 12)
        else:
            snapshot = world.learner.snapshot(force=True)
            assert snapshot is not None
            assert saved_waiting(orjson.loads(snapshot["state"])) == held_waiting(world.learner)
            with world.engine.begin() as conn:
                world.learner.write(conn, snapshot)
            world.learner.saved(snapshot)
            snapshots += 1
    assert snapshots > 20 and len(world.learner.waiting) == len(held_waiting(world.learner))
    final = world.learner.snapshot(force=True)
    with world.engine.begin() as conn:
        world.learner.write(conn, final)
    world.learner.saved(final)
    again = World(tmp_path, pending_max=12, pending_max_age_s=60)
    again.learner.restore(again.engine)
    assert {k: (v[0], *v[2:]) for k, v in held_waiting(again.learner).items()} == \
        {k: (v[0], *v[2:]) for k, v in held_waiting(world.learner).items()}  # arrival: the restart's time
    world.engine.dispose()
    again.engine.dispose()


def test_a_registration_learns_no_reward_older_than_what_its_read_of_the_log_kept(world: World) -> None:
    """A read of the log cut at its limit left older rewards out on purpose (`TrainedOn.from_ms`):
    the credits here of those decisions are not 'unseen', only the newer ones are."""
    from app.decision_ids import decision_time_ms
    from app.evaluation import TrainedOn

    older = world.score()
    newer = world.score()
    while decision_time_ms(newer.decision_id) == decision_time_ms(older.decision_id):
        newer = world.score()  # ids a millisecond apart at least
    seen = world.score()
    for scored in (older, newer, seen):
        world.react(scored.decision_id, "a")
    read = TrainedOn(frozenset({(seen.decision_id, "a")}), from_ms=decision_time_ms(newer.decision_id))
    examples = asyncio.run(world.learner.unseen_rewards(read))
    assert len(examples) == 1 and examples[0][1] == DEFAULT_REWARDS["acted"]
    assert len(asyncio.run(world.learner.unseen_rewards(TrainedOn(frozenset(), None)))) == 3


def test_a_registration_finds_each_unseen_reward_once_while_its_look_yields_to_the_loop(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The look goes over the credited decisions a chunk at a time, yielding between chunks (at
    100k decisions it held the loop 70 ms in one go). Feedback credited meanwhile, for a decision
    already looked at, one not yet, or one not held before, is found once; a decision the join
    cache lets go meanwhile is passed over."""
    import app.learner
    from app.evaluation import TrainedOn

    monkeypatch.setattr(app.learner, "UNSEEN_SCAN_CHUNK", 1)
    decisions = [world.score(tips=("a", "b")) for _ in range(4)]
    for scored in decisions:
        world.react(scored.decision_id, "a")
    first, second, third, _ = (s.decision_id for s in decisions)
    read = TrainedOn(frozenset((d, "a") for d in (first, second, third)), None)  # the fourth's row not read
    look = world.learner.unseen_rewards(read)
    turns = 0
    while True:
        try:
            look.send(None)
        except StopIteration as done:
            found = done.value
            break
        turns += 1
        if turns == 2:  # `first` looked at, the others not yet
            world.react(first, "b", "liked")
            world.react(third, "b", "disliked")
            late = world.score(tips=("c",))
            world.react(late.decision_id, "c", "snoozed")
            world.learner.joins.credited.pop(second)  # as the join cache's eviction does
    assert turns == 4  # a yield before each decision looked at, the first after the copy of the ids
    rewards = sorted(reward for _, reward, _ in found)
    assert rewards == sorted([DEFAULT_REWARDS["acted"], DEFAULT_REWARDS["liked"], DEFAULT_REWARDS["disliked"],
                              DEFAULT_REWARDS["snoozed"]])
    assert world.learner.joins.credited_during_scan is None


def test_a_reward_credited_while_the_look_yields_is_found_though_the_join_cache_lets_it_go(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credited during the look, every live model learned it: the new one must too, even when the
    join cache lets its decision go before the look's second pass."""
    import app.learner
    from app.evaluation import TrainedOn

    monkeypatch.setattr(app.learner, "UNSEEN_SCAN_CHUNK", 1)
    decisions = [world.score() for _ in range(2)]
    for scored in decisions:
        world.react(scored.decision_id, "a")
    look = world.learner.unseen_rewards(TrainedOn(frozenset((s.decision_id, "a") for s in decisions), None))
    look.send(None)  # after the copy of the ids
    late = world.score(tips=("c",))
    world.react(late.decision_id, "c", "liked")
    world.learner.joins.credited.pop(late.decision_id)  # as the join cache's eviction does
    with pytest.raises(StopIteration) as done:
        while True:
            look.send(None)
    assert [reward for _, reward, _ in done.value.value] == [DEFAULT_REWARDS["liked"]]


def test_a_reaction_waiting_again_is_not_expired_by_its_earlier_wait(world: World) -> None:
    """A decision without a time in its id joins its waiting reaction, the join cache lets it go,
    and the reaction is sent again: it waits afresh, its full age, not from the first wait."""
    scored = world.score(serve=False)
    world.react("external-1", "a")
    assert world.learner.add_logged(LoggedDecision("external-1", scored.payload))
    world.learner.joins.evict(int(world.clock.now * 1000) + 1)  # as the join window's end does
    assert "external-1" not in world.learner.joins.cache
    world.clock.now += 30
    before = outcomes()
    world.react("external-1", "a", event_id="f-resent")
    world.clock.now += 31  # the first wait is 61 s old, this one 31
    world.learner.expire()
    assert delta(before) == {"waiting": 1} and world.learner.waiting.holds("external-1", "a", "u-1")
    assert len(world.learner.waiting) == 1
    world.clock.now += 30
    world.learner.expire()
    assert delta(before) == {"waiting": 1, "unknown_decision": 1} and not world.learner.waiting.by_decision
    assert not world.learner.waiting._buckets and len(world.learner.waiting) == 0


def test_a_rollback_to_a_champion_that_diverged_since_is_refused(world: World) -> None:
    """promote and shadow refused a diverged version; a rollback restored one, and /score ranked
    by the prior."""
    asyncio.run(world.lineup.promote("v2", "ops"))
    world.lineup.models["v1"].classifier.intercept = math.nan  # as a step that overflowed leaves it
    with pytest.raises(RegistryError, match="v1.*diverged"):
        asyncio.run(world.lineup.rollback("ops"))
    assert world.lineup.champion_version == "v2" and world.lineup.registry.previous_champions == ["v1"]


def test_a_rollback_waiting_for_another_change_checks_the_version_it_restores(world: World) -> None:
    """The rollback checked the previous champion before waiting for the lineup's lock: v1 was on top
    then, but the promote it waited for pushed v2, which had diverged, and the rollback restored v2."""
    asyncio.run(world.lineup.promote("v2", "ops"))
    asyncio.run(world.lineup.set_shadow("v1", "ops"))
    world.lineup.models["v2"].classifier.intercept = math.nan  # the champion's step overflowed

    async def both() -> list[Any]:
        return await asyncio.gather(world.lineup.promote("v1", "alice"), world.lineup.rollback("bob"),
                                    return_exceptions=True)

    promoted, rolled_back = asyncio.run(both())
    assert promoted is None
    assert isinstance(rolled_back, RegistryError) and "diverged" in str(rolled_back), rolled_back
    assert world.lineup.champion_version == "v1" and world.lineup.registry.previous_champions == ["v2"]


@pytest.mark.parametrize("where", ["features", "candidate"])
def test_a_decision_whose_feature_is_not_a_scalar_goes_to_the_dlq_not_into_every_card(
        world: World, where: str) -> None:
    """A decision from another publisher with a list or an object as a feature value passed the
    check: the learner credited its feedback (no model could learn it: a TypeError each), and once
    its row held the reward, every `register` and `evaluate` failed on it (a 500) while it stayed
    among the newest rewarded decisions."""
    from app.decisions import decode_decision

    scored = world.score(serve=False)
    decision = orjson.loads(scored.payload)
    if where == "features":
        decision["features"]["labels"] = ["work", "home"]
    else:
        decision["ranked"][0]["features"] = {"size": {"w": 3}}
    found = decode_decision("decisions.score", orjson.dumps(decision))
    assert not isinstance(found, LoggedDecision), "refused, with the reason"
    assert found.kind == "invalid_field" and "number, a string, true/false or null" in found.reason
    # What it did once joined: the card's progressive validation could not read it.
    tip = decision["ranked"][0]["tip_id"]
    with pytest.raises(TypeError):
        evaluation.evaluate({}, evaluation.rewarded_log([(decision, {tip: 1.0})], 10))
    # Scalars of every kind pass.
    decision["features"]["labels"] = None
    decision["ranked"][0]["features"] = {"size": 3, "unit": "s", "short": True, "note": None, "w": 2.5}
    if where == "features":
        decision["ranked"][0].pop("features")
    assert isinstance(decode_decision("decisions.score", orjson.dumps(decision)), LoggedDecision)


def test_a_decision_listing_a_tip_twice_goes_to_the_dlq(world: World) -> None:
    """/score refuses a tip listed twice; a decision from another publisher that did so was joined,
    and the learner learned its reward with the first listing's features while a registration's
    training (`examples_of`) took the last one's: the same reward, two inputs."""
    from app.decisions import decode_decision

    scored = world.score(serve=False, tips=("a", "b"))
    decision = orjson.loads(scored.payload)
    first = decision["ranked"][0]
    decision["ranked"] = [{**first, "category": "focus"}, {**first, "category": "breaks"}]
    found = decode_decision("decisions.score", orjson.dumps(decision))
    assert not isinstance(found, LoggedDecision), "refused, with the reason"
    assert found.kind == "invalid_field" and found.reason.startswith("ranked[1]: ") and "also ranked[0]" in found.reason
    # What it did once joined: two inputs for one reward.
    world.learner.add_logged(LoggedDecision(scored.decision_id, orjson.dumps(decision)))
    learned: list[dict[str, Any]] = []
    world.lineup.champion.learn_one = lambda x, reward, at_ms=None: learned.append(x)  # type: ignore[method-assign]
    world.react(scored.decision_id, first["tip_id"])
    [(trained, _)] = evaluation.examples_of(decision, {first["tip_id"]: 1.0})
    assert learned[0]["category"] == "focus" and trained["category"] == "breaks"


@pytest.mark.parametrize("change", [{"greedy": ["a"]}, {"shadow": "v2"}, {"shadow": {"version": "v2"}},
                                    {"shadow": {"version": "v2", "first": ["a"]}}])
def test_a_decision_whose_greedy_or_shadow_a_card_cannot_read_goes_to_the_dlq(
        world: World, change: dict[str, Any]) -> None:
    """A card's policy value reads every rewarded decision's `greedy` and `shadow`: one from another
    publisher with a list there, or a shadow that is text or names no first tip, passed the check,
    and once its row held a reward every `evaluate` failed on it (a 500)."""
    from app.decisions import decode_decision

    scored = world.score(serve=False)
    decision = orjson.loads(scored.payload) | change
    found = decode_decision("decisions.score", orjson.dumps(decision))
    assert not isinstance(found, LoggedDecision), "refused, with the reason"
    assert found.kind == "invalid_field" and next(iter(change)) in found.reason
    with pytest.raises((TypeError, AttributeError, KeyError)):  # what it did to the card once joined
        evaluation.policy_value([(decision, {decision["ranked"][0]["tip_id"]: 1.0})], "v2")
    for fine in ({"greedy": None, "shadow": None}, {"shadow": {"version": "v2", "first": "a"}}, {}):
        decision = {k: v for k, v in orjson.loads(scored.payload).items() if k not in ("greedy", "shadow")} | fine
        assert isinstance(decode_decision("decisions.score", orjson.dumps(decision)), LoggedDecision), fine


def test_a_card_leaves_out_a_logged_decision_the_dlq_would_now_refuse(world: World) -> None:
    """Rows written before decisions were checked for it (a feature value that is a list, a shadow
    as text) failed every `register` and `evaluate` for as long as they were among the newest
    rewarded: they are left out of the card, and counted as seen, so a registration does not
    learn them afterwards either."""
    from app.lineup import evaluate_log

    good, bad = world.score(user="u-1", serve=False), world.score(user="u-2", serve=False)
    broken = orjson.loads(bad.payload)
    broken["features"]["labels"] = ["work"]
    broken["shadow"] = "v2"
    rows = [tip_score_row(orjson.loads(good.payload), good.payload, {"a": 1.0}, 1_795_694_400_000),
            tip_score_row(broken, orjson.dumps(broken), {"a": 1.0}, 1_795_694_400_000)]
    with world.engine.begin() as conn:
        write_tip_scores(conn, (1, rows))
    model, card, trained = evaluate_log(world.engine, 100, {}, "v1")
    assert card.offline_metrics["n"] == 1 and model.n_learned == 1
    assert card.offline_metrics["policy_value"]["as_champion"]["decisions"] == 1
    assert trained.credits == {(good.decision_id, "a"), (bad.decision_id, "a")}


def test_a_card_s_policy_value_reads_the_same_decisions_as_its_offline_metrics(world: World) -> None:
    """TIPSTREAM_CARD_EVAL_MAX_REWARDS bounds the decisions read and then the examples (one a rewarded tip): with
    two rewards a decision, the metrics kept the newest half of the decisions read, and the policy value beside
    them went on over all of them, twice as far back, so the two sections of a card told of different logs."""
    from app.lineup import evaluate_log

    rows = []
    for _ in range(6):
        scored = world.score(serve=False)
        rows.append(tip_score_row(orjson.loads(scored.payload), scored.payload, {"a": 1.0, "b": 0.0},
                                  1_795_694_400_000))
    with world.engine.begin() as conn:
        write_tip_scores(conn, (1, rows))
    _, card, _ = evaluate_log(world.engine, 6, {}, "v1")
    assert card.offline_metrics["n"] == 6  # the newest three decisions' two rewards each
    assert card.offline_metrics["policy_value"]["as_champion"]["decisions"] == 3
    _, card, _ = evaluate_log(world.engine, 100, {}, "v1")  # nothing cut: every decision read, in both
    assert card.offline_metrics["n"] == 12 and card.offline_metrics["policy_value"]["as_champion"]["decisions"] == 6


def test_evaluating_a_version_trained_before_soft_labels_learns_soft_rewards_as_it_does(world: World) -> None:
    """A version trained before soft labels learns a reward of 0.8 as two weighted binary steps for good
    (`TipModel.soft_labels`, absent from its snapshot); `evaluate` trained a fresh model of its parameters,
    which learns in one step, so its refreshed card measured a learning rule the version does not use."""
    rows = []
    for _ in range(4):
        scored = world.score(serve=False)
        rows.append(tip_score_row(orjson.loads(scored.payload), scored.payload, {"a": 0.8}, 1_795_694_400_000))
    with world.engine.begin() as conn:
        write_tip_scores(conn, (1, rows))
    world.lineup.models["v1"].soft_labels = False  # as read back from a snapshot taken before soft labels
    card = asyncio.run(world.lineup.evaluate("v1", "ops"))
    assert card.offline_metrics["soft_rewards_learned"] == "as two weighted binary steps"
    world.lineup.models["v1"].soft_labels = True
    card = asyncio.run(world.lineup.evaluate("v1", "ops"))
    assert card.offline_metrics["soft_rewards_learned"] == "in one step, as a soft label"


@pytest.mark.parametrize("feedback", ["live", "read back"])
def test_feedback_stored_more_than_the_window_after_its_decision_is_expired_though_no_serve_evicted_it(
        tmp_path: Path, feedback: str) -> None:
    """Window 1 h. A reaction JetStream stored 2 h after its decision is `expired`, whether or not
    something evicted the decision first: the join cache lets decisions go only when another is
    added or a snapshot is taken, so on an idle service, or within a read-back of FEEDBACK (a
    restart, a rebuild from the log), it was credited and learned, where a busier moment (or the
    live run a rebuild repeats) had expired it."""
    w = World(tmp_path)
    t0 = w.clock.now
    served = w.score()
    if feedback == "read back":
        w.learner.feedback_read = ReadUpTo()  # FEEDBACK is behind: its own time ends the window
    reaction = {"id": "f-0", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                "data": {"tip_id": "a", "decision_id": served.decision_id, "reaction": "acted"}}
    before = outcomes()
    w.sink(parse_event(orjson.dumps(reaction)), _ack(t0 + 600, 1))  # within the window
    w.clock.now = t0 + 7200
    late = {**reaction, "id": "f-1", "data": {**reaction["data"], "tip_id": "b"}}
    w.sink(parse_event(orjson.dumps(late)), _ack(t0 + 7200, 2))
    assert delta(before) == {"credited": 1, "expired": 1}
    assert [m.n_learned for _, m in w.lineup.learning] == [1, 1]
    assert w.learner.joins.cache[served.decision_id].credits == {"a": 1.0}
    w.engine.dispose()


def test_feedback_for_one_of_our_decisions_older_than_the_window_and_not_held_is_expired_at_once(
        world: World) -> None:
    """Window 1 h; the decision (its id says when it was served) is not in the join cache: a start
    skipped it for its age, and none can bring it back. The reaction waited for it, then counted
    as unknown_decision, as if the decision might still come."""
    t0 = world.clock.now
    old = f"d-{int((t0 - 7200) * 1000):012x}" + "0" * 16
    reaction = {"id": "f-0", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                "data": {"tip_id": "a", "decision_id": old, "reaction": "acted"}}
    before = outcomes()
    world.sink(parse_event(orjson.dumps(reaction)), _ack(t0, 1))
    assert delta(before) == {"expired": 1} and not world.learner.waiting.holds(old, "a", "u-1")


def test_a_retired_versions_model_leaves_memory_and_is_not_loaded_at_a_start(tmp_path: Path) -> None:
    """Retiring is for good, but every version ever registered kept its whole model in memory, and
    every start loaded them all again: one model's weights per registration, for the process's life."""
    world = World(tmp_path)
    for user in ("u-1", "u-2"):
        scored = world.score(user=user)
        world.react(scored.decision_id, "a", user=user)
    retired = weakref.ref(world.lineup.models["v2"])
    asyncio.run(world.lineup.retire("v2", actor="ops"))
    gc.collect()
    assert retired() is None, "the retired model is still held"
    assert [v for v, _ in world.lineup.learning] == ["v1"]
    assert {d["version"]: (d["role"], d["n_learned"], d["users_held"]) for d in world.lineup.listing()} == {
        "v1": ("champion", 2, 2), "v2": ("retired", 2, None)}
    with pytest.raises(RegistryError, match="retired"):
        asyncio.run(world.lineup.promote("v2", actor="ops"))
    card = asyncio.run(world.lineup.evaluate("v2", "ops"))
    assert card.inputs == world.lineup.registry.get("v2").card.inputs
    world.engine.dispose()
    again = World(tmp_path)  # a restart
    try:
        assert isinstance(again.lineup.models["v2"], RetiredModel)
        assert isinstance(again.lineup.models["v1"], TipModel)
        assert again.lineup.describe("v2")["role"] == "retired"
    finally:
        again.engine.dispose()


def test_a_decision_served_while_decisions_are_read_back_is_re_read_after_a_restart(world: World) -> None:
    """A start reads DECISIONS back (`replaying`) while /score serves. Served at position 0, its decision
    came after the ones the read-back brought later (position 6, after our own read back and known), and
    a snapshot resumed from the front's position: the restart re-read from 7, so the served one was not
    held any more and its reaction was `unknown_decision`, never learned (helper-76's fault campaign)."""
    world.learner.replaying = True
    served = world.score()
    world.store.positions["DECISIONS"] = 6  # the read-back has passed our own decisions, held already
    other = world.score(user="u-2", serve=False)  # another publisher's, read back
    world.learner.add_logged(LoggedDecision(other.decision_id, other.payload))
    world.learner.caught_up()
    snapshot = world.learner.snapshot(force=True)
    assert snapshot is not None
    assert orjson.loads(snapshot["state"])["positions"]["DECISIONS"] == 0, "re-read from where it was served"
    assert world.learner.joins.get(served.decision_id) is not None


def test_forgetting_a_user_drops_their_decisions_waiting_reactions_and_own_features(world: World) -> None:

    mine, theirs = world.score(user="u-1"), world.score(user="u-10")
    world.react(mine.decision_id, "a", user="u-1")
    world.react(theirs.decision_id, "a", user="u-10")
    coming = world.score(user="u-1", serve=False)  # a decision still to come, a reaction waiting for it
    world.react(coming.decision_id, "b", user="u-1")
    world.react(coming.decision_id, "b", user="u-10")  # another user's, waiting beside it
    x = {"user_id": "u-10", "tip_id": "a"}
    kept = {v: m.predict_one(x) for v, m in world.lineup.learning}
    cached = world.learner.joins.bytes
    world.learner.saved(world.learner.snapshot())
    assert world.learner.snapshot(force=False) is None or not world.learner.snapshot()["models"]

    at_ms = int(time.time() * 1000) + 1  # as the service acts: by the clock the decision ids are timed by
    assert forget(world.learner, "u-1", at_ms) == 1
    assert list(world.learner.joins.cache) == [theirs.decision_id]
    assert world.learner.joins.bytes == cached - len(mine.payload) - ENTRY_OVERHEAD
    assert [key for waits in world.learner.waiting.by_decision.values() for key in waits] == [("b", "u-10")]
    assert len(world.learner.waiting) == 1
    assert all(m.forget_user("u-1") == 0 for _, m in world.lineup.learning), "nothing of theirs left in a model"
    assert {v: m.predict_one(x) for v, m in world.lineup.learning} == kept
    # Their decisions made until then are not held again, read back from DECISIONS or acknowledged late,
    # and get no tip_scores row; another user's are, and a decision of theirs made later is new.
    snapshot = world.learner.snapshot()
    assert snapshot is not None and set(snapshot["models"]) == {"v1", "v2"}, "saved without them, though no reward came"
    assert not world.learner.add_logged(LoggedDecision(mine.decision_id, mine.payload))
    world.learner.published(coming.decision_id, coming.payload)
    assert mine.decision_id not in world.learner.joins.cache and coming.decision_id not in world.learner.joins.cache
    assert coming.decision_id not in world.log.dirty
    while int(time.time() * 1000) <= at_ms:  # a decision made later is timed later
        time.sleep(0.001)
    later = world.score(user="u-1")
    assert later.decision_id in world.learner.joins.cache
    before = outcomes()
    world.react(later.decision_id, "a", user="u-1")
    assert delta(before) == {"credited": 1}


def test_a_forgotten_user_s_decision_the_join_cache_let_go_with_credits_comes_back_without_them(world: World) -> None:
    """Another publisher's decision the memory budget let go with credits is remembered (`let_go_credited`), so a copy
    stored again is held with them. The forget looked over the decisions held only: a copy stored after the request
    was done came back with the forgotten user's rewards, its tip_scores row written with them and the decision's
    body (their features as served), and the credit log kept them for the join window."""
    payload = orjson.dumps({**orjson.loads(world.score(user="u-1", serve=False).payload), "id": "external-1"})
    assert world.learner.add_logged(LoggedDecision("external-1", payload))
    world.react("external-1", "a", user="u-1")
    world.learner.joins.limit = 0  # the memory budget lets it go
    world.learner.joins.evict(0)
    assert world.learner.joins.get("external-1") is None and "external-1" in world.learner.joins.let_go_credited
    world.learner.joins.limit = 64 << 20
    world.log.dirty.clear()
    at_ms = int(time.time() * 1000) + 1
    forget(world.learner, "u-1", at_ms)
    assert "external-1" not in world.learner.joins.let_go_credited
    assert "external-1" in world.learner.snapshot(force=True)["forgotten_credits"]
    del world.learner.erasing["u-1"]  # the request is done: the user may come back
    before = outcomes()
    assert world.learner.add_logged(LoggedDecision("external-1", payload))  # its publisher sends it again
    assert world.log.dirty["external-1"]["rewards"] is None and world.log.dirty["external-1"]["decision"] is None
    world.react("external-1", "a", user="u-1")
    assert delta(before) == {"credited": 1}, "a new decision of the user come back"


@pytest.mark.parametrize("caught_up", [False, True], ids=["reading-back", "caught-up-meanwhile"])
def test_a_decision_read_back_while_a_forget_looks_over_the_join_cache_goes_with_the_user(
        tmp_path: Path, caught_up: bool) -> None:
    """While a start reads DECISIONS back, what it brings waits in `replayed`. `served_since` walked /score's
    decisions alone: another publisher's decision of the user, stored after the look began (so `erasing` let it
    in) and read back during it, stayed held after the forget, its reactions credited and learned with their
    features. Also once the read-back, caught up meanwhile, has put it in front of /score's decisions."""
    w = World(tmp_path)
    assert w.learner.restore(w.engine) is None  # a start: DECISIONS is read back
    w.score(user="u-2")  # served meanwhile: the mark
    at_ms = int(w.clock.now * 1000)
    mark = w.learner.served_mark()
    theirs = asyncio.run(w.learner.decisions_to_forget("u-1", at_ms))
    assert theirs == []
    w.clock.now += 1  # during the look: its event loop ran the DECISIONS ingest
    assert w.learner.add_logged(_foreign(w, "ext-1"), _decisions_ack(w.clock.now, 1))
    if caught_up:
        w.learner.caught_up()
    at_ms = int(w.clock.now * 1000)  # the eraser acts as of after the look
    since = w.learner.served_since(mark, frozenset({"u-1"}), at_ms)
    assert since == {"u-1": ["ext-1"]}
    assert w.learner.forget_user("u-1", at_ms, theirs + since["u-1"])["decisions_held"] == 1
    assert w.learner.joins.get("ext-1") is None
    before = outcomes()
    w.sink(_reaction("f-1", "ext-1", "a"), _ack(w.clock.now, 1))
    assert delta(before) == {"waiting": 1}, "not credited: the decision it names went"
    w.engine.dispose()


def test_forgetting_a_user_finds_their_decisions_another_publisher_spelt_with_escapes(world: World) -> None:
    """JSON may spell an id with escapes (Python's `json.dumps` writes "zo\\u00eb"): such a decision of
    theirs, read back from DECISIONS, goes too, and would otherwise be credited, learned and given a row."""
    import json

    body = orjson.loads(world.score(user="zoë", serve=False).payload) | {"id": "other-1"}
    escaped = json.dumps(body).encode()  # ensure_ascii: every non-ASCII character escaped
    assert b"zo\\u00eb" in escaped
    assert world.learner.add_logged(LoggedDecision("other-1", escaped))
    assert world.learner.joins.get("other-1") is not None
    assert forget(world.learner, "zoë", int(time.time() * 1000) + 1) == 1
    assert world.learner.joins.get("other-1") is None


@pytest.mark.parametrize("forge", [
    lambda d: {**d, "features": {**d["features"], "user_id": "ana"}},
    lambda d: {**d, "features": {**d["features"], "user_id_ana": 1}},
    lambda d: {**d, "features": {**d["features"], "user": "id_ana"}},
    lambda d: {**d, "ranked": [{**d["ranked"][0], "features": {"user_id": "ana"}}, *d["ranked"][1:]]},
    lambda d: {**d, "ranked": [{**d["ranked"][0], "features": {"user_id_ana": 1.0}}, *d["ranked"][1:]]},
    lambda d: {**d, "ranked": [{**d["ranked"][0], "features": {"user": "id*category=ana*focus"}}, *d["ranked"][1:]]},
], ids=["shared user_id", "shared one-hot", "shared text", "own user_id", "own one-hot", "own cross"])
def test_a_publisher_s_decision_whose_features_name_another_user_is_refused(world: World, forge: Any) -> None:
    # eve's app, publishing on decisions.> (docs/operations.md: "decisions of their own"), logged a decision of eve's
    # whose features were ana's, then reacted to it as eve: not another user's reaction, so it trained ana's own
    # weights. Forgetting ana left that message in DECISIONS (it is eve's), and a rebuild learned ana back.
    from app.decisions import decode_decision
    from streams.scrub import belongs, spellings

    decision = orjson.loads(world.score(user="eve", serve=False).payload)
    payload = orjson.dumps(forge(decision))
    assert not belongs(payload, frozenset({"ana"}), spellings({"ana"})), "the scrub keeps it when ana is forgotten"
    found = decode_decision("decisions.score", payload)
    if isinstance(found, LoggedDecision):  # as it was: joined, and ana's own weights learned from eve's reaction
        world.learner.add_logged(found)
        world.react(decision["id"], decision["ranked"][0]["tip_id"], "acted", user="eve")
    assert not isinstance(found, LoggedDecision), f"ana's own features learned: {world.lineup.champion.forget_user('ana')}"
    assert "ana" in found.reason or "user_id" in found.reason, found.reason


@pytest.mark.parametrize(("version", "kind", "says"), [
    (2, "unsupported_version", "v=2 is newer than the decisions this server reads (v1): upgrade tipstream"),
    (0, "unsupported_version", "v=0 is not a decision contract version: this server reads v1 only"),
    (True, "invalid_field", "field 'v': must be the decision contract's version as a JSON integer"),
    ("1", "invalid_field", "field 'v': must be the decision contract's version as a JSON integer"),
    (None, "invalid_field", "not null"),
    (1.5, "invalid_field", "not 1.5"),
])
def test_a_publisher_s_decision_of_another_contract_version_is_refused_naming_it(
        world: World, version: Any, kind: str, says: str) -> None:
    """A decision on decisions.> from another publisher with `"v": 2` (or `true`) was joined as v1: its reactions
    learned from fields a newer contract may mean otherwise. Refused as an event of that version is, to the DLQ."""
    from app.decisions import decode_decision

    decision = orjson.loads(world.score(user="eve", serve=False).payload)
    assert decision["v"] == 1
    found = decode_decision("decisions.score", orjson.dumps({**decision, "v": version}))
    assert not isinstance(found, LoggedDecision), f"v={version!r} joined as v1"
    assert (found.kind, says in found.reason) == (kind, True), found.reason
    for same in ({**decision, "v": 1.0}, {key: value for key, value in decision.items() if key != "v"}):
        assert isinstance(decode_decision("decisions.score", orjson.dumps(same)), LoggedDecision)


@pytest.mark.parametrize(("digits", "served"), [("0fffffffffff", "2527-06-23T06:20:44.415+00:00"),
                                                 ("ffffffffffff", "281474976710655 ms since 1970")])
def test_a_decision_read_back_served_far_after_it_was_stored_is_refused_naming_when(
        tmp_path: Path, digits: str, served: str) -> None:
    """An id in our form beyond year 9999 (12 hex digits reach 10889) is refused as `future_ts` like any other.
    `served_after_stored` named the time with `app.decisions._utc`, redefined below it for `tip_score_row`
    (a datetime, no range check): it raised ValueError, and the decision went to the DLQ as `processing_failed`,
    logged as a bug in tipstream, its reason's time spelled as str(datetime)."""
    world = World(tmp_path, max_future_s=86_400.0)
    decision_id = f"d-{digits}" + "1" * 16
    with pytest.raises(Refused) as refused:
        world.learner.add_logged(_foreign(world, decision_id), _decisions_ack(world.clock.now, 1))
    assert refused.value.rejection.kind == "future_ts"
    assert f"served at {served}, more than 86400 s after" in refused.value.rejection.reason
    assert world.learner.decisions_until_ms == 0 and world.learner.joins.get(decision_id) is None
    world.engine.dispose()


def test_a_spooled_decision_read_back_before_it_is_served_again_keeps_its_rewards_in_its_row(tmp_path: Path) -> None:
    """A decision served and rewarded just before a stop whose acknowledgement was lost (it landed) is spooled.
    The start's DECISIONS read-back may bring it before the spool is served again: it waits in the read-back's
    segment, its restored credits in its row. JetStream then acknowledges the spooled copy (a duplicate): that
    acknowledgement looked for it among the decisions served only, found none, and marked its row anew
    without its rewards, which a rebuild's row holds."""
    before_stop = World(tmp_path)
    t0 = before_stop.clock.now
    spooled = before_stop.score()  # served; JetStream's acknowledgement never comes
    before_stop.sink(_reaction("f-1", spooled.decision_id, "a"), _ack(t0, 1))
    before_stop.learner.feedback_read.advance(int(t0 * 1000), caught_up=True)
    with before_stop.engine.begin() as conn:
        before_stop.learner.write(conn, before_stop.learner.snapshot(force=True))

    again = World(tmp_path)
    again.clock.now = t0 + 10
    again.learner.restore(again.engine)
    again.learner.add_logged(LoggedDecision(spooled.decision_id, spooled.payload), _decisions_ack(t0, 1))
    assert again.log.dirty[spooled.decision_id]["rewards"] == {"a": 1.0}
    again.learner.served(spooled.decision_id, spooled.payload, orjson.loads(spooled.payload), spooled=True)
    again.learner.published(spooled.decision_id, spooled.payload)  # the spool's copy, a duplicate, acknowledged
    again.learner.caught_up()
    assert again.log.dirty[spooled.decision_id]["rewards"] == {"a": 1.0}
    before_stop.engine.dispose()
    again.engine.dispose()


def test_feedback_waiting_within_its_bounds_is_not_given_up_for_the_reactions_joined_after_it(tmp_path: Path) -> None:
    """The waiting feedback's arrival order keeps the reactions joined since until they come to its front. Once it
    held twice `pending_max` of them, the one at its front went, waiting or not: a reaction well within the
    count and the age, behind which others had waited briefly (another publisher's decisions, read after the
    reactions naming them), was given up, and its reward, which came in time, never learned."""
    world = World(tmp_path, pending_max=3)
    t0 = world.clock.now
    slow = _foreign(world, "ext-0")
    before = outcomes()
    world.sink(_reaction("f-0", "ext-0", "a"), _ack(t0, 1))
    for i in range(1, 8):  # each waits a moment for its decision, then joins it
        world.sink(_reaction(f"f-{i}", f"ext-{i}", "a"), _ack(t0 + i, i + 1))
        world.learner.add_logged(_foreign(world, f"ext-{i}"), _decisions_ack(t0 + i, i))
    assert len(world.learner.waiting) == 1
    world.clock.now = t0 + 10  # well within the age (60 s)
    world.learner.add_logged(slow, _decisions_ack(t0 + 10, 8))
    assert delta(before) == {"waiting": 8, "credited": 8}
    world.engine.dispose()


def test_a_reward_saved_by_a_registration_reaches_its_row_across_a_crash(tmp_path: Path) -> None:
    """A registration saves the learner's state in its own transaction: the credits and FEEDBACK's position
    past the reaction. The `tip_scores` row that reaction marked waited for the next checkpoint; after a crash
    before it, the start restored the credit, replayed no feedback, and did not mark again the row of a
    decision the last checkpoint had read past: the row never held the reward, which a rebuild's holds."""
    w = World(tmp_path)
    w.lineup.participants.append(w.learner)
    scored = w.score()
    w.learner.published(scored.decision_id)  # acknowledged: its row, without a reward yet
    w.store.advance("DECISIONS", 1)
    checkpointer = Checkpointer(w.store, SqlCheckpointStore(w.engine), every_events=1, every_s=60,
                                participants=[w.learner, w.log])
    assert asyncio.run(checkpointer.checkpoint())
    w.react(scored.decision_id, "a")
    w.store.advance("FEEDBACK", 1)
    asyncio.run(w.lineup.register("v3", "logreg", {}, actor="t"))
    # A crash: no checkpoint after the registration's save.
    again = World(tmp_path)
    positions = again.learner.restore(again.engine)
    assert positions == {"FEEDBACK": 1, "DECISIONS": 0}
    again.learner.rows_written_upto = 1  # the checkpoint's DECISIONS position, as the service sets it
    again.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload), _decisions_ack(again.clock.now, 1))
    again.learner.caught_up()
    with again.engine.begin() as conn:
        write_tip_scores(conn, again.log.snapshot())
    with again.engine.connect() as conn:
        rewards = conn.execute(sa.select(db.tip_scores.c.rewards)
                               .where(db.tip_scores.c.decision_id == scored.decision_id)).scalar_one()
    assert rewards == {"a": 1.0}
    w.engine.dispose()
    again.engine.dispose()


def test_a_decision_let_go_before_its_acknowledgement_keeps_its_rewards_in_its_row(tmp_path: Path) -> None:
    """The memory budget can let a decision go while it waits for JetStream (large decisions, JetStream
    refusing for a while), after a reaction to it was credited. Its acknowledgement then marked its row
    without that reward, which a rebuild's row holds."""
    world = World(tmp_path, cache_mb=0.01)  # about ten decisions
    scored = world.score()
    world.react(scored.decision_id, "a")
    for _ in range(20):
        world.score()
    assert world.learner.joins.get(scored.decision_id) is None
    world.learner.published(scored.decision_id, scored.payload)
    row = world.log.dirty[scored.decision_id]
    assert row["rewards"] == {"a": 1.0} and row["decision"] is not None
    world.engine.dispose()

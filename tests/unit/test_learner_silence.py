"""Learning from silence: a decision nobody reacted to within the wait learns `silence_reward`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from app import learner_told, silence_learning
from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoints import Checkpointer
from app.decision_ids import decision_time_ms
from app.decisions import LoggedDecision
from app.learning_metrics import SILENCES
from app.settings import DEFAULT_REWARDS, Settings
from streams.log_throttle import LogThrottle
from streams.read_up_to import ReadUpTo
from tests.unit.test_scoring_learner import World, _ack, _decisions_ack, _foreign, _reaction, delta, forget, outcomes

WAIT_S = 600
ALLOWANCE_S = silence_learning.SILENCE_READ_ALLOWANCE_MS / 1000


def silences() -> dict[str, float]:
    return {n: SILENCES.labels(n).value for n in ("credited", "answered", "evicted")}


def silence_delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in silences().items() if v != before[k]}


def quiet_world(tmp_path: Path, **learner: Any) -> World:
    return World(tmp_path, **({"silence_reward": 0.0, "silence_after_s": WAIT_S} | learner))


def learned(world: World) -> dict[str, int]:
    return {v: m.n_learned for v, m in world.lineup.learning}


def served_at_s(decision_id: str) -> float:
    created = decision_time_ms(decision_id)
    assert created is not None
    return created / 1000


def test_a_decision_nobody_answers_learns_the_silence_reward_for_its_first_tip(tmp_path: Path) -> None:
    world = quiet_world(tmp_path)
    scored = world.score(tips=("a", "b", "c"))
    first = scored.decision["ranked"][0]["tip_id"]
    world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    before, told = silences(), outcomes()
    world.clock.now = served_at_s(scored.decision_id) + WAIT_S + ALLOWANCE_S - 0.5
    world.learner.expire()
    assert silence_delta(before) == {} and learned(world) == {"v1": 0, "v2": 0}, "not due yet by the clock"
    world.clock.now += 1
    world.learner.expire()
    assert silence_delta(before) == {"credited": 1} and delta(told) == {}, "not feedback: its own counter"
    assert learned(world) == {"v1": 1, "v2": 1}
    assert world.lineup.prior.count(first) == 1.0 and world.lineup.prior.mean(first) < 0.5
    row = world.log.dirty[scored.decision_id]
    assert row["rewards"] == {first: 0.0} and row["reward"] == 0.0
    # Stamped the millisecond after its wait, not when this clock noticed: a replay stamps it the same.
    assert row["rewarded_at"].timestamp() == pytest.approx(served_at_s(scored.decision_id) + WAIT_S + 0.001, abs=0.0005)
    world.learner.expire()
    assert silence_delta(before) == {"credited": 1}, "learned once"
    world.engine.dispose()


def test_a_reaction_within_the_wait_answers_the_decision_and_one_after_it_is_late(tmp_path: Path) -> None:
    world = quiet_world(tmp_path)
    answered, ignored = world.score(), world.score()
    t0 = served_at_s(ignored.decision_id)
    first = ignored.decision["ranked"][0]["tip_id"]
    second = ignored.decision["ranked"][1]["tip_id"]
    before, told = silences(), outcomes()
    # Any tip of a decision answers it: the other tip of `answered`, stored within the wait.
    other = answered.decision["ranked"][1]["tip_id"]
    world.sink(_reaction("f-1", answered.decision_id, other, "liked"), _ack(t0 + WAIT_S - 1, 1))
    world.clock.now = t0 + WAIT_S + ALLOWANCE_S + 1
    world.learner.expire()
    assert silence_delta(before) == {"credited": 1, "answered": 1}
    assert learned(world) == {"v1": 2, "v2": 2}
    # The ignored decision's first tip, answered after its silence was learned: late, not learned again.
    world.sink(_reaction("f-2", ignored.decision_id, first, "acted"), _ack(t0 + WAIT_S + 30, 2))
    assert delta(told) == {"credited": 1, "late": 1}
    # Another of its tips is another answer: learned.
    world.sink(_reaction("f-3", ignored.decision_id, second, "acted"), _ack(t0 + WAIT_S + 31, 3))
    assert delta(told) == {"credited": 2, "late": 1} and learned(world) == {"v1": 3, "v2": 3}
    world.engine.dispose()


def test_silence_is_learned_before_the_first_feedback_stored_after_it_was_due(tmp_path: Path) -> None:
    """Judged in FEEDBACK's time: a reaction to another decision stored after the silence was due
    learns the silence first, whatever this clock says, as a replay of the log would."""
    world = quiet_world(tmp_path)
    ignored, later = world.score(), world.score()
    t0 = served_at_s(ignored.decision_id)
    order: list[float] = []
    champion = world.lineup.champion
    learn_one = champion.learn_one
    champion.learn_one = lambda x, reward, at_ms=None: (order.append(reward), learn_one(x, reward, at_ms))[1]
    before = silences()
    world.sink(_reaction("f-1", later.decision_id, "a", "acted"), _ack(t0 + WAIT_S - 0.001, 1))  # at the due time
    assert order == [1.0] and silence_delta(before) == {}
    world.sink(_reaction("f-2", later.decision_id, "b", "acted"), _ack(t0 + WAIT_S + 0.002, 2))  # just after
    # `later`, made a moment after `ignored`, may be due by then too: answered (by "f-1").
    assert order == [1.0, 0.0, 1.0] and silence_delta(before).get("credited") == 1
    world.engine.dispose()


def test_while_feedback_is_read_back_silence_waits_for_feedback_s_time_not_the_clock(tmp_path: Path) -> None:
    world = quiet_world(tmp_path)
    scored = world.score()
    t0 = served_at_s(scored.decision_id)
    world.learner.feedback_read = ReadUpTo()  # FEEDBACK behind: a restart after an outage
    world.clock.now = t0 + 10 * WAIT_S
    before = silences()
    world.learner.expire()
    assert silence_delta(before) == {}, "feedback stored within the wait may still be read"
    world.learner.feedback_read.advance(int((t0 + WAIT_S + 1) * 1000), caught_up=False)
    world.learner.expire()
    assert silence_delta(before) == {"credited": 1}
    world.engine.dispose()


def test_a_restart_learns_no_silence_twice_and_learns_one_the_crash_lost(tmp_path: Path) -> None:
    world = quiet_world(tmp_path)
    saved = world.score()
    lost = world.score(serve=False)
    while served_at_s(lost.decision_id) < served_at_s(saved.decision_id) + 0.005:  # made 5 ms later at least
        lost = world.score(serve=False)
    world.learner.served(lost.decision_id, lost.payload, lost.decision)
    for scored in (saved, lost):
        world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    t0 = served_at_s(lost.decision_id)
    world.clock.now = served_at_s(saved.decision_id) + WAIT_S + ALLOWANCE_S + 0.002
    world.learner.expire()  # `saved`'s silence only
    assert learned(world) == {"v1": 1, "v2": 1}
    checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                participants=[world.learner, world.log])
    assert asyncio.run(checkpointer.checkpoint())
    world.clock.now = t0 + WAIT_S + ALLOWANCE_S + 1
    world.learner.expire()  # `lost`'s: learned, then the process dies before the next checkpoint
    assert learned(world) == {"v1": 2, "v2": 2}

    again = quiet_world(tmp_path)
    again.clock.now = world.clock.now + 60
    again.learner.restore(again.engine)
    assert learned(again) == {"v1": 1, "v2": 1}
    before = silences()
    for scored in (saved, lost):  # DECISIONS read back
        again.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    again.learner.caught_up()
    again.learner.expire()
    assert silence_delta(before) == {"credited": 1} and learned(again) == {"v1": 2, "v2": 2}
    assert {d: row["rewards"] is not None for d, row in again.log.dirty.items()} == {
        saved.decision_id: True, lost.decision_id: True}
    world.engine.dispose()
    again.engine.dispose()


def test_decisions_the_join_cache_lets_go_before_their_silence_are_counted_and_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("app.silence.SWEEP_SLACK", 5)
    monkeypatch.setattr(learner_told, "_TOLD", LogThrottle())
    world = quiet_world(tmp_path, cache_mb=0.01)  # ~10 KB: a few decisions
    served = [world.score() for _ in range(40)]
    held = len(world.learner.joins.cache)
    assert 0 < held < 30
    before = silences()
    with caplog.at_level(logging.WARNING, "tipstream.learner"):
        world.learner.expire()  # nothing due yet: the heap is swept of those let go
    assert silence_delta(before) == {"evicted": 40 - held}
    assert len(world.learner.silences) == held
    assert "TIPSTREAM_LEARNER_JOIN_CACHE_MB" in caplog.text
    world.clock.now = served_at_s(served[-1].decision_id) + WAIT_S + ALLOWANCE_S + 1
    world.learner.expire()
    assert silence_delta(before) == {"evicted": 40 - held, "credited": held}
    world.engine.dispose()


def test_off_by_default_and_only_positive_feedback_is_told_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(learner_told, "POSITIVE_ONLY_WARN_AFTER", 3)
    world = World(tmp_path)
    decisions = [world.score() for _ in range(5)]
    before = silences()
    world.clock.now += 10 * WAIT_S
    with caplog.at_level(logging.WARNING, "tipstream.learner"):
        world.learner.expire()
        for scored in decisions:
            world.react(scored.decision_id, "a", "acted")
    assert silence_delta(before) == {} and world.learner.silences is None
    assert caplog.text.count("were all positive") == 1 and "TIPSTREAM_SILENCE_REWARD" in caplog.text
    world.engine.dispose()


def test_no_warning_when_a_negative_reward_comes_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(learner_told, "POSITIVE_ONLY_WARN_AFTER", 3)
    world = World(tmp_path)
    with caplog.at_level(logging.WARNING, "tipstream.learner"):
        for i in range(6):
            world.react(world.score().decision_id, "a", "dismissed" if i == 1 else "acted")
    assert "were all positive" not in caplog.text
    world.engine.dispose()


def test_the_wait_must_be_shorter_than_the_join_window() -> None:
    with pytest.raises(ValueError, match="shorter than the join window"):
        Settings(silence_reward=0.0, silence_after_s=3600, learner_join_window_s=3600)
    assert Settings(silence_reward=0.2).silence_after_s == 600
    with pytest.raises(ValueError, match="less than or equal to 1"):
        Settings(silence_reward=1.5)


def test_a_join_window_shorter_than_the_default_wait_starts_with_silence_off() -> None:
    """The wait is checked against the join window only when silence is learned: off (the default),
    a window of 5 minutes, under the default wait of 10, must not refuse to start."""
    assert Settings(learner_join_window_s=300).learner_join_window_s == 300
    with pytest.raises(ValueError, match="shorter than the join window"):
        Settings(learner_join_window_s=300, silence_reward=0.0)
    assert Settings(learner_join_window_s=300, silence_reward=0.0, silence_after_s=60).silence_after_s == 60


def _record(world: World) -> list[float]:
    order: list[float] = []
    champion = world.lineup.champion
    learn_one = champion.learn_one
    champion.learn_one = lambda x, reward, at_ms=None: (order.append(reward), learn_one(x, reward, at_ms))[1]
    return order


@pytest.mark.parametrize("decision_after_due_s", [10, 2])
def test_a_replay_learns_a_silence_due_before_deferred_feedback_s_decision_came_as_live(
        tmp_path: Path, decision_after_due_s: float) -> None:
    """Feedback stored before another publisher's decision waits for it, live, and is learned when
    it comes; a silence due before then, and by more than the allowance, was learned first (by the
    clock, no feedback in between), one due just before then after it. Read back, the decision is
    read first and the feedback deferred until FEEDBACK's time passes the decision's: both fall due
    at the next feedback, and the deferred one was learned first, so the models learned in another
    order than live."""
    wait_s = 10
    live = quiet_world(tmp_path / "live", silence_after_s=wait_s)
    ignored = live.score()
    c1 = served_at_s(ignored.decision_id)
    stored_s = c1 + wait_s + decision_after_due_s  # the decision's
    foreign = _foreign(live, "ext-1")
    order = _record(live)
    live.clock.now = c1 + 1
    live.sink(_reaction("f-1", "ext-1", "a"), _ack(c1 + 1, 1))  # before its decision: waits
    for checkpoint_s in (c1 + wait_s + 1, c1 + wait_s + ALLOWANCE_S + 1, stored_s - 0.5):
        if checkpoint_s < stored_s:  # checkpoints: the silence, by the clock, once due by the allowance
            live.clock.now = checkpoint_s
            live.learner.snapshot()
    live.clock.now = stored_s
    live.learner.add_logged(foreign, _decisions_ack(stored_s, 2))  # f-1 learned now
    live.clock.now = stored_s + 5
    live.sink(_reaction("f-2", "ext-1", "b", "liked"), _ack(stored_s + 5, 2))
    silence_first = decision_after_due_s > ALLOWANCE_S
    assert order == ([0.0, 1.0] if silence_first else [1.0, 0.0]) + [DEFAULT_REWARDS["liked"]]

    replay = quiet_world(tmp_path / "replay", silence_after_s=wait_s)
    replay.clock.now = c1 + 3600
    assert replay.learner.restore(replay.engine) is None  # a rebuild from the log
    replay.learner.feedback_read = ReadUpTo()  # FEEDBACK follows DECISIONS, read further
    replayed = _record(replay)
    replay.learner.add_logged(LoggedDecision(ignored.decision_id, ignored.payload), _decisions_ack(c1 + 0.01, 1))
    replay.learner.add_logged(foreign, _decisions_ack(stored_s, 2))
    replay.learner.caught_up()
    replay.sink(_reaction("f-1", "ext-1", "a"), _ack(c1 + 1, 1))
    replay.sink(_reaction("f-2", "ext-1", "b", "liked"), _ack(stored_s + 5, 2))
    assert replayed == order
    for world in (live, replay):
        del world.lineup.champion.learn_one  # the recorder: models are compared by their bytes
    for version in ("v1", "v2"):
        assert replay.lineup.models[version].to_bytes() == live.lineup.models[version].to_bytes()
    live.engine.dispose()
    replay.engine.dispose()


def test_silences_due_at_once_are_learned_in_turns_of_the_loop(tmp_path: Path) -> None:
    """After a restart, every decision of the wait before the stop falls due at once (60,000 at 100
    decisions/s): learned in one turn of the loop, at the first feedback read back or at the first
    checkpoint, they held /score for seconds (~85 us each, two models). The FEEDBACK ingest awaits
    them before the message (`SilenceLearning.before_message`), the checkpointer before the snapshots
    (`before_snapshot`), `SILENCES_PER_TURN` per turn, in the same order as `on_feedback`."""
    n = 3 * silence_learning.SILENCES_PER_TURN + 10
    world = quiet_world(tmp_path)
    ids = [world.score().decision_id for _ in range(n)]
    gap = world.score(serve=False)
    while decision_time_ms(gap.decision_id) < decision_time_ms(ids[-1]) + 2:  # the second n made 2 ms later at least
        gap = world.score(serve=False)
    ids += [world.score().decision_id for _ in range(n)]
    world.learner.feedback_read = ReadUpTo()  # FEEDBACK read back after a start
    turns = 0
    at_turn: list[int] = []
    learn = world.learner._learn
    world.learner._learn = lambda *args: (at_turn.append(turns), learn(*args))[1]  # type: ignore[method-assign]

    async def main() -> None:
        nonlocal turns

        async def tick() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        # A feedback stored after the first n were due, read back: they are learned before it, in turns.
        stored_ms = decision_time_ms(ids[n - 1]) + 1 + WAIT_S * 1000
        due = sum(1 for d in ids if (decision_time_ms(d) or 0) + WAIT_S * 1000 < stored_ms)
        assert due == n
        ack = _ack((stored_ms + 0.5) / 1000, 1)  # half a ms over: seconds as a float lose the ms at times
        pending = world.learner.silences.before_message(ack)
        assert pending is not None
        await pending
        world.sink(_reaction("f-1", ids[-1], "a"), ack)
        assert len(at_turn) == due + 1 and at_turn[-1] == at_turn[-2], "then the feedback, in the same turn"
        await asyncio.sleep(0)  # the checkpoint is a task of its own
        # The rest by the clock, once caught up, at a checkpoint.
        world.learner.feedback_read.advance(0, caught_up=True)
        world.learner.caught_up()
        world.clock.now = served_at_s(ids[-1]) + WAIT_S + ALLOWANCE_S + 1
        checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                    participants=[world.learner, world.log])
        await checkpointer.checkpoint()
        ticker.cancel()

    before = silences()
    asyncio.run(main())
    assert silence_delta(before) == {"credited": 2 * n - 1, "answered": 1}
    per_turn: dict[int, int] = {}
    for turn in at_turn:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert max(per_turn.values()) <= silence_learning.SILENCES_PER_TURN + 1  # + the feedback after them
    assert len(per_turn) >= 2 * n // silence_learning.SILENCES_PER_TURN
    world.engine.dispose()


def spooled_with_a_late_reaction(tmp_path: Path, tip: int) -> tuple[World, World, Any, Any, bytes]:
    """A live world and one to rebuild in, a decision served just before a stop (spooled: not in DECISIONS
    yet), a reaction to its `tip`-th tip, and its ack subject: stored during the stop, a minute after the wait."""
    (tmp_path / "live").mkdir(), (tmp_path / "rebuild").mkdir()
    live, rebuilt = quiet_world(tmp_path / "live"), quiet_world(tmp_path / "rebuild")
    scored = live.score(serve=False)
    t0 = served_at_s(scored.decision_id)
    reaction = _reaction("f-1", scored.decision_id, scored.decision["ranked"][tip]["tip_id"], "acted")
    return live, rebuilt, scored, reaction, _ack(t0 + WAIT_S + 60, 1)


def test_a_spooled_decision_s_late_reaction_is_late_on_a_rebuild_too(tmp_path: Path) -> None:
    """A decision served just before a stop is spooled (not in DECISIONS yet) and published at the
    next start; a reaction to its first tip is stored during the stop, after the wait. The restart
    serves the spooled decision again before FEEDBACK is read back: its silence is learned first and
    the reaction is late. A rebuild reads DECISIONS only up to the reaction's time before it: the
    reaction waits for the decision, which once read must not take it as an answer."""
    live, rebuilt, scored, reaction, stored = spooled_with_a_late_reaction(tmp_path, tip=0)
    first = scored.decision["ranked"][0]["tip_id"]
    t0 = served_at_s(scored.decision_id)

    before = outcomes()
    live.learner.served(scored.decision_id, scored.payload, scored.decision)  # from the spool, at the start
    live.sink(reaction, stored)
    assert delta(before) == {"late": 1}

    rebuilt.learner.restore(rebuilt.engine)  # no snapshot: a rebuild
    rebuilt.learner.feedback_read = ReadUpTo()
    rebuilt.sink(reaction, stored)
    assert delta(before) == {"late": 1, "waiting": 1}
    rebuilt.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload), _decisions_ack(t0 + 3000, 1))
    assert delta(before) == {"late": 2, "waiting": 1}
    assert rebuilt.log.dirty[scored.decision_id]["rewards"] == {first: 0.0}
    assert learned(rebuilt) == learned(live) == {"v1": 1, "v2": 1}
    live.engine.dispose()
    rebuilt.engine.dispose()


def test_a_reaction_stored_as_the_wait_ends_answers_it_and_is_not_taken_for_its_silence(tmp_path: Path) -> None:
    """A reaction stored at the wait's last millisecond answers the decision (`Silences.due`): credited,
    stamped with that time. Stamped so too, the silence's credit was told from it by its stamp alone:
    the reaction sent again was counted `late` (its silence learned) and its wait not `answered`."""
    world = quiet_world(tmp_path)
    scored = world.score()
    created = decision_time_ms(scored.decision_id)
    assert created is not None
    due_ms = created + WAIT_S * 1000
    first = scored.decision["ranked"][0]["tip_id"]

    def ack(ms: int, seq: int) -> bytes:
        return f"$JS.ACK.FEEDBACK.ingest.1.{seq}.{seq}.{ms * 1_000_000}.0".encode()

    before, waits = outcomes(), silences()
    world.sink(_reaction("f-1", scored.decision_id, first), ack(due_ms, 1))
    world.sink(_reaction("f-2", scored.decision_id, first), ack(due_ms + 1, 2))
    assert delta(before) == {"credited": 1, "duplicate": 1}
    world.clock.now = due_ms / 1000 + WAIT_S
    world.learner.expire()
    assert silence_delta(waits) == {"answered": 1} and learned(world) == {"v1": 1, "v2": 1}
    world.engine.dispose()


def test_a_forgotten_users_decisions_wait_for_no_silence(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Their decisions left the join cache because the user was forgotten, not for want of memory: no
    `evicted` (an alert, and a warning to raise the cache's budget), and the others' silences are learned."""
    world = quiet_world(tmp_path)
    theirs, other = world.score(user="u-1"), world.score(user="u-2")
    for scored in (theirs, other):
        world.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload))
    assert forget(world.learner, "u-1", int(time.time() * 1000) + 1) == 1  # as of now on the decision ids' clock (the wall's)
    before = silences()
    world.clock.now = served_at_s(other.decision_id) + WAIT_S + ALLOWANCE_S + 1
    with caplog.at_level(logging.WARNING, logger="tipstream.learner"):
        world.learner.expire()
    assert silence_delta(before) == {"credited": 1}
    assert "left the join cache" not in caplog.text
    assert len(world.learner.silences) == 0
    world.engine.dispose()


def test_a_version_registered_as_a_silence_falls_due_learns_it_with_the_others(tmp_path: Path) -> None:
    """A registration takes the learner's snapshot once the new version has learned the rewards its training
    missed, and only then lets it learn with the others. That snapshot gave up on waiting feedback and learned
    the silences due by the clock: the other versions learned them, the new one never did (its saved bytes and
    the credits saved beside them without them), one reward behind the others for good."""
    world = quiet_world(tmp_path)
    world.lineup.participants.append(world.learner)
    scored = world.score()
    world.learner.published(scored.decision_id)
    world.clock.now = served_at_s(scored.decision_id) + WAIT_S + ALLOWANCE_S + 1  # its silence is due
    before = silences()
    asyncio.run(world.lineup.register("v3", "logreg", {}, actor="t"))
    world.learner.expire()
    assert silence_delta(before) == {"credited": 1}
    assert learned(world) == {"v1": 1, "v2": 1, "v3": 1}
    world.engine.dispose()


def test_a_first_tip_left_alone_counts_at_the_silence_reward_in_the_policy_value_whenever_another_was_answered(
        tmp_path: Path) -> None:
    """With TIPSTREAM_SILENCE_REWARD set, the card's policy value is per decision served: one nobody reacted to
    counts at that reward. A decision whose first tip was left alone while another tip got a reaction within
    the wait counted 0: below one nobody reacted to, and below the same decision with that reaction stored after
    the wait, where the silence is learned first and the row holds it."""
    world = quiet_world(tmp_path, silence_reward=0.3)
    answered_within, answered_after, ignored = world.score(), world.score(), world.score()
    for scored in (answered_within, answered_after, ignored):
        world.learner.published(scored.decision_id)
        assert [c["tip_id"] for c in scored.decision["ranked"]] == ["a", "b"]
    t0 = served_at_s(ignored.decision_id)
    world.sink(_reaction("f-1", answered_within.decision_id, "b", "acted"), _ack(t0 + WAIT_S - 1, 1))
    world.sink(_reaction("f-2", answered_after.decision_id, "b", "acted"), _ack(t0 + WAIT_S + 1, 2))
    world.clock.now = t0 + WAIT_S + ALLOWANCE_S + 2
    world.learner.expire()
    assert {d: row["rewards"] for d, row in world.log.dirty.items()} == {
        answered_within.decision_id: {"b": 1.0}, answered_after.decision_id: {"a": 0.3, "b": 1.0},
        ignored.decision_id: {"a": 0.3}}
    checkpointer = Checkpointer(world.store, SqlCheckpointStore(world.engine), every_events=1, every_s=60,
                                participants=[world.learner, world.log])
    assert asyncio.run(checkpointer.checkpoint())
    card = asyncio.run(world.lineup.evaluate("v1", actor="t"))  # in the evaluation process, as the service's
    champion = card.offline_metrics["policy_value"]["as_champion"]
    assert champion["decisions"] == 3 and champion["logged_reward"] == pytest.approx(0.3)
    assert champion["greedy"]["snips"] == pytest.approx(0.3)
    world.engine.dispose()


def test_the_service_s_cards_count_silence_at_the_reward_its_learner_learns(tmp_path: Path) -> None:
    from app.bootstrap import Service

    service = Service(Settings(data_dir=tmp_path, silence_reward=0.3))
    assert service.learner.silences is not None
    assert service.lineup.silence_reward == service.learner.silences.reward == 0.3
    service.engine.dispose()


def test_a_silence_learned_as_a_late_reaction_joins_its_decision_counts_the_wait_once(tmp_path: Path) -> None:
    """A rebuild reads a spooled decision's reaction to its second tip, stored after the wait, before the
    decision: the silence is learned as the reaction is credited (`Learner._credit`), as live. Its wait,
    still watched, came due later and was counted again, `answered` beside `credited`, where live counted
    it once."""
    live, rebuilt, scored, reaction, stored = spooled_with_a_late_reaction(tmp_path, tip=1)
    first, second = (c["tip_id"] for c in scored.decision["ranked"][:2])
    t0 = served_at_s(scored.decision_id)
    later = t0 + 3 * WAIT_S

    waits = silences()
    live.learner.served(scored.decision_id, scored.payload, scored.decision)  # from the spool, at the start
    live.sink(reaction, stored)
    live.clock.now = later
    live.learner.expire()
    assert silence_delta(waits) == {"credited": 1}

    waits = silences()
    rebuilt.learner.restore(rebuilt.engine)  # no snapshot: a rebuild
    rebuilt.learner.feedback_read = ReadUpTo()
    rebuilt.sink(reaction, stored)
    rebuilt.learner.add_logged(LoggedDecision(scored.decision_id, scored.payload), _decisions_ack(t0 + 3000, 1))
    rebuilt.learner.feedback_read = ReadUpTo(caught_up=True)
    rebuilt.learner.caught_up()
    rebuilt.clock.now = later
    rebuilt.learner.expire()
    assert silence_delta(waits) == {"credited": 1}
    for world in (live, rebuilt):
        entry = world.learner.joins.get(scored.decision_id)
        assert entry is not None and entry.credits == {first: 0.0, second: 1.0}
    assert learned(rebuilt) == learned(live) == {"v1": 2, "v2": 2}
    live.engine.dispose()
    rebuilt.engine.dispose()

"""Scoring without a server: request validation, feature assembly and caching, policies, the publisher."""

from __future__ import annotations

import asyncio
import math
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

import app.decision_spool
import app.decisions
import app.evaluation
import app.learner
import app.models_cli
import app.registry_store
import app.scoring
from app import migrate
from app.db import make_engine
from app.decision_publisher import DecisionLogFull, DecisionPublisher, DecisionTooLarge, DecisionWithdrawn
from app.lineup import Lineup
from app.registry_store import RegistryStore
from app.score_request import RequestError, parse_request
from app.scoring import Scorer
from app.settings import (
    DEFAULT_MAX_VALUES,
    DEFAULT_REWARDS,
    DEFAULT_USER_FORGETTING,
    DEFAULT_USER_TTL_DAYS,
    MAX_MAX_VALUES,
    MAX_USER_TTL_DAYS,
    POLICY_PARAMS,
    Settings,
)
from models import reward, validation
from models.policy import POLICIES, make_policy
from streams.events import parse_event
from streams.store import IDLE_DAYS, OnlineStore


def test_settings_mirror_the_models_defaults() -> None:
    assert DEFAULT_REWARDS == reward.DEFAULT_REWARDS
    assert DEFAULT_USER_FORGETTING == reward.DEFAULT_USER_FORGETTING
    assert DEFAULT_USER_TTL_DAYS == reward.DEFAULT_USER_TTL_DAYS
    assert MAX_USER_TTL_DAYS == reward.MAX_USER_TTL_DAYS
    assert MAX_MAX_VALUES == reward.MAX_MAX_VALUES
    assert DEFAULT_MAX_VALUES == reward.DEFAULT_MAX_VALUES
    assert Settings().idle_user_days == IDLE_DAYS  # the store's default, for what builds it without settings
    assert reward.TipModel(**Settings().model_params()).params == reward.TipModel().params
    assert POLICY_PARAMS == {name: cls.PARAMS for name, cls in POLICIES.items()}
    for name in POLICIES:
        assert make_policy(name, **Settings(policy=name).policy_params()).name == name


def test_an_unknown_reaction_in_the_reward_map_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="names unknown reactions"):
        Settings(rewards={"loved": 1.0})
    assert Settings(rewards={"snoozed": 0.5}).rewards == {**DEFAULT_REWARDS, "snoozed": 0.5}


@pytest.mark.parametrize("body, field", [
    (b"", "body"),
    (b'{"user_id": "", "candidates": [{"tip_id": "a"}]}', "user_id"),
    (b'{"user_id": "u", "candidates": [{"tip_id": "a", "category": ""}]}', "candidates.0.category"),
    (b'{"user_id": "u", "candidates": [{"tip_id": "a"}], "context": {"tasks": 3}}', "context.tasks"),
    (b'{"user_id": "u", "candidates": [{"tip_id": "a", "features": {"1bad": 1}}]}', "candidates.0.features.1bad"),
    (b'{"user_id": "u", "candidates": [{"tip_id": "a"}], "profile_features": {"preferred_hour": true}}',
     "profile_features.preferred_hour"),
    # Half an emoji (JSON.stringify's string cut inside one): pydantic's parser refuses the body, which named `body`.
    (b'{"user_id": "u", "candidates": [{"tip_id": "a", "features": {"title": "Breathe \\ud83d"}}]}',
     "candidates.0.features.title"),
    (b'{"user_id": "u\\udc00", "candidates": [{"tip_id": "a"}]}', "user_id"),
    # A key named "": the refusal named `body`, as if the body itself were the extra input.
    (b'{"user_id": "u", "candidates": [{"tip_id": "a"}], "": 1}', '""'),
    (b'{"user_id": "u", "candidates": [{"tip_id": "a", "": 1}]}', 'candidates.0.""'),
])
def test_bad_requests_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(RequestError) as error:
        parse_request(body)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


@pytest.mark.parametrize("body, field", [
    (b'{"user_id": "u", "candidates": [{"tip_id": "a"}], "note": "Breathe \\ud83d"}', "note"),
    (b'{"user_id": "u", "candidates": [{"tip_id": "a", "meta": {"title": "\\ud83d"}}]}', "candidates.0.meta"),
])
def test_half_a_pair_in_a_field_the_request_does_not_name_is_refused_for_the_field(body: bytes, field: str) -> None:
    # It was refused for the half pair: the caller who sent whole characters was then told the field is unknown.
    with pytest.raises(RequestError) as error:
        parse_request(body)
    assert (error.value.field, error.value.message) == (field, "Extra inputs are not permitted")


@pytest.mark.parametrize("name", ["a b", "1bad", "tone/level"])
def test_a_bad_candidate_feature_name_is_refused_with_the_rule_in_words(name: str) -> None:
    # It was pydantic's "String should match pattern '^[A-Za-z_][A-Za-z0-9_.:-]*$'".
    body = {"user_id": "u", "candidates": [{"tip_id": "a", "features": {name: 1}}]}
    with pytest.raises(RequestError) as error:
        parse_request(orjson.dumps(body))
    assert error.value.field == f"candidates.0.features.{name}"
    assert error.value.message == "a feature name starts with a letter or '_', then letters, digits and '_', '.', ':', '-' only"


@pytest.mark.parametrize("now", [b'"2026-11-26T09:00:00"', b"1795694400", b'"1795694400.5"'])
def test_a_now_without_an_offset_is_refused_with_an_example_of_one(now: bytes) -> None:
    # A naive time got pydantic's "Input should have timezone info", which named no fix.
    with pytest.raises(RequestError) as error:
        parse_request(b'{"user_id": "u", "candidates": [{"tip_id": "a"}], "context": {"now": ' + now + b"}}")
    assert error.value.field == "context.now"
    assert "must be an ISO 8601 time with a UTC offset, e.g. 2026-11-26T09:00:00+01:00" in error.value.message


@pytest.mark.parametrize("now", [b'"2026-11-26T09:00:00+24:00"', b'"2026-12-31T23:59:60+00:00"',
                                 b'"2026-11-26T09:00:00+01:00:30"'])
def test_a_now_past_what_a_time_holds_is_refused_with_an_example_not_as_extra_characters(now: bytes) -> None:
    # An offset of 24 h, a leap second, an offset in seconds: pydantic's "Input should be a valid datetime or
    # date, unexpected extra characters at the end of the input" pointed at the end of a well-formed time.
    with pytest.raises(RequestError) as error:
        parse_request(b'{"user_id": "u", "candidates": [{"tip_id": "a"}], "context": {"now": ' + now + b"}}")
    assert error.value.field == "context.now"
    assert error.value.message.startswith("must be an ISO 8601 time with a UTC offset, e.g. 2026-11-26T09:00:00+01:00")
    assert "extra characters" not in error.value.message


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e160", b"1e400", b"-1000000000.5",
                                   b"1" + b"0" * 400], ids=lambda v: v.decode()[:12])
@pytest.mark.parametrize("fragment, field", [
    (b'"candidates": [{"tip_id": "a", "features": {"len": %s}}]', "candidates.0.features.len"),
    (b'"candidates": [{"tip_id": "a"}], "profile_features": {"preferred_hour": %s}', "profile_features.preferred_hour"),
], ids=["candidate", "profile"])
def test_numbers_that_are_not_finite_or_too_large_are_refused_with_the_bound(
        value: bytes, fragment: bytes, field: str) -> None:
    # Raw bytes: pydantic's JSON parser reads NaN and Infinity literals as floats.
    with pytest.raises(RequestError) as error:
        parse_request(b'{"user_id": "u", ' + fragment % value + b"}")
    assert error.value.field == field
    assert error.value.message == "must be a finite number between -1e9 and 1e9"


def test_numbers_at_the_bound_are_accepted() -> None:
    request = parse_request(b'{"user_id": "u", "candidates": [{"tip_id": "a", "features": {"len": 1e9, "n": -1000000000,'
                            b' "ok": true, "t": "x"}}], "profile_features": {"engagement_score": 1e9}}')
    assert request.candidates[0]["features"] == {"len": 1e9, "n": -1_000_000_000, "ok": True, "t": "x"}
    assert request.profile_features == {"engagement_score": 1e9}


@pytest.mark.parametrize(("features", "field", "problem"), [
    ({"preferred_hour": 24}, "preferred_hour", "must be 0 to 23 (whole)"),
    ({"preferred_hour": 9.5}, "preferred_hour", "must be 0 to 23 (whole)"),
    ({"seconds_since_active": -5}, "seconds_since_active", "must be >= 0"),
    ({"tip_positive_rate_30d": 1.5}, "tip_positive_rate_30d", "must be 0 to 1,"),
    ({"open_tasks": 2.5}, "open_tasks", "must be >= 0 (whole)"),
    ({"tasks_created_7d": 3, "active_day_streak": 40}, "active_day_streak", "must be 0 to 32 (whole)"),
])
def test_caller_profile_features_out_of_their_range_are_refused(features: dict, field: str, problem: str) -> None:
    """Only checked to be numbers, a caller's milliseconds for seconds (or an hour of 1e9) reached
    the models, which scale each input by its running mean and spread: for every user."""
    body = {"user_id": "u", "candidates": [{"tip_id": "a"}], "profile_features": features}
    with pytest.raises(RequestError) as error:
        parse_request(orjson.dumps(body))
    assert error.value.field == f"profile_features.{field}" and problem in error.value.message


def test_caller_profile_features_at_the_ends_of_their_range_are_accepted() -> None:
    edges = {"preferred_hour": 23, "seconds_since_active": 0, "tip_dismiss_rate_30d": 1.0, "open_tasks": 3.0,
             "completion_rate_7d": 1.5}  # more completed than created in the week: above 1 is possible
    request = parse_request(orjson.dumps({"user_id": "u", "candidates": [{"tip_id": "a"}], "profile_features": edges}))
    assert request.profile_features == edges


def _event(i: int, kind: str, ts: str, user: str = "u-1", **data: Any) -> Any:
    return parse_event(orjson.dumps({"id": f"e-{i}", "type": kind, "user_id": user, "ts": ts, "data": data}))


@pytest.fixture
def lineup(tmp_path: Path) -> Lineup:
    url = f"sqlite:///{tmp_path / 't.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    lineup = Lineup(RegistryStore(engine), engine, eval_max_rewards=10)
    lineup.load("logreg", learning_rate=0.1)
    yield lineup
    engine.dispose()


def _request(user: str = "u-1", now: str | None = "2026-11-26T15:00:00+01:00", **extra: Any) -> Any:
    body: dict[str, Any] = {"user_id": user, "candidates": [{"tip_id": "a"}, {"tip_id": "b"}], **extra}
    if now is not None:
        body["context"] = {"now": now}
    return parse_request(orjson.dumps(body))


def test_profile_snapshots_are_reused_only_while_exact(lineup: Lineup) -> None:
    store = OnlineStore()
    store.apply(_event(1, "task.completed", "2026-11-26T14:00:00+01:00", task_id="t-1"))
    scorer = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=10)
    uncached = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
    calls = []
    original = app.scoring.snapshot

    def counting(state: Any, now_ms: int) -> Any:
        calls.append(now_ms)
        return original(state, now_ms)

    app.scoring.snapshot = counting
    try:
        first = scorer.score(_request())
        assert scorer.score(_request()).response["features"] == first.response["features"]
        assert len(calls) == 1, "the same now: reused"
        later = scorer.score(_request(now="2026-11-26T15:00:01.500+01:00")).response["features"]
        assert len(calls) == 1, "a later now before any window edge: reused"
        assert later["seconds_since_active"] == 3601.5, "carried forward to the new now"
        scorer.score(_request(now="2026-11-26T14:59:00+01:00"))
        assert len(calls) == 2, "an earlier now is evaluated afresh"
        next_day = "2026-11-27T00:00:00+01:00"  # the user's local midnight: the streak may change
        assert scorer.score(_request(now=next_day)).response["features"] == \
            uncached.score(_request(now=next_day)).response["features"]
        assert len(calls) == 4, "past the snapshot's reach: evaluated again (the uncached scorer counted one)"
        store.apply(_event(2, "task.created", "2026-11-26T14:30:00+01:00", task_id="t-2"))
        changed = scorer.score(_request())
        assert len(calls) == 5 and changed.response["features"]["tasks_created_7d"] == 1, "a new event invalidates"
        assert orjson.loads(changed.payload)["features_at"] == "2026-11-26T15:00:00.000+01:00"
    finally:
        app.scoring.snapshot = original


def test_caller_features_fill_only_fallbacks_and_context_uses_the_users_offset(lineup: Lineup) -> None:
    store = OnlineStore()
    hour_ago = datetime.now(timezone(timedelta(hours=-5))) - timedelta(hours=1)
    store.apply(_event(1, "task.completed", hour_ago.isoformat(), task_id="t-1"))
    store.apply(_event(2, "tip.shown", (hour_ago - timedelta(days=2)).isoformat(), tip_id="a"))
    scorer = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
    caller = {"preferred_hour": (hour_ago.hour + 3) % 24, "mean_hours_to_complete_28d": 2.0, "tip_volume_24h": 9}
    scored = scorer.score(_request(now=None, profile_features=caller))
    features = scored.response["features"]
    # None shown in the last day, and the server holds the one shown before: 0 is known.
    assert features["preferred_hour"] == hour_ago.hour and features["tip_volume_24h"] == 0, "the server's values win"
    assert features["mean_hours_to_complete_28d"] == 2.0
    assert scored.response["caller_features"] == ["mean_hours_to_complete_28d"]
    assert features["utc_offset_min"] == -300, "no context.now: the user's own offset"
    assert features["is_new_user"] is True


@pytest.mark.parametrize("written", ["2026-11-26T14:00:00Z", "2026-11-26T14:00:00.000z", "2026-11-26T14:00:00-00:00"])
def test_a_now_in_z_is_read_in_the_users_offset(lineup: Lineup, written: str) -> None:
    """`Z` says UTC with the local offset unknown (RFC 9557), and is what JavaScript's toISOString()
    writes: read in it, a user of -05:00 scored at 09:00 local had the hour of 14:00."""
    store = OnlineStore()
    store.apply(_event(1, "app.opened", "2026-11-26T08:30:00-05:00"))
    scorer = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
    features = scorer.score(_request(now=written)).response["features"]
    assert (features["hour_of_day"], features["utc_offset_min"]) == (9, -300)
    assert features["seconds_since_active"] == 1800, "the instant is the one written"
    told = scorer.score(_request(now="2026-11-26T14:00:00+00:00")).response["features"]
    assert (told["hour_of_day"], told["utc_offset_min"]) == (14, 0), "+00:00 tells the offset: UTC"
    stranger = scorer.score(_request(user="u-2", now=written)).response["features"]
    assert (stranger["hour_of_day"], stranger["utc_offset_min"]) == (14, None), "no event: UTC, the zone unknown"


def test_caller_features_fill_what_the_app_never_sent_the_server(lineup: Lineup) -> None:
    """An app that publishes only feedback: after a user's first reaction, the server's task counts
    read 0, as if known, and the caller's were dropped."""
    store = OnlineStore()
    store.apply(_event(1, "tip.reacted", datetime.now(UTC).isoformat(), tip_id="a", reaction="liked"))
    scorer = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
    caller = {"tasks_created_7d": 10, "tip_positive_rate_30d": 0.9}
    scored = scorer.score(_request(now=None, profile_features=caller))
    assert scored.response["features"]["tasks_created_7d"] == 10
    assert scored.response["features"]["tip_positive_rate_30d"] == 2 / 3, "a reaction is held: the server's rate"
    assert scored.response["caller_features"] == ["tasks_created_7d"]


def test_decision_times_are_written_as_datetime_would() -> None:
    rng = random.Random(3)
    offsets = [0, 3600, -9000, 19800, 50400, -43200]
    for _ in range(20_000):  # some share a second and an offset (the cached path), most do not
        ms, offset_s = rng.randrange(-10**12, 4 * 10**12) // rng.choice([1, 10**6]), rng.choice(offsets)
        moment = datetime.fromtimestamp(ms // 1000, timezone(timedelta(seconds=offset_s)))
        expected = moment.replace(microsecond=ms % 1000 * 1000).isoformat(timespec="milliseconds")
        assert app.scoring._iso(ms, offset_s) == expected, (ms, offset_s)


@pytest.mark.parametrize("policy", ["epsilon_greedy", "softmax", "thompson", "greedy"])
def test_every_policy_answers_with_propensities_and_explore_false_is_greedy(lineup: Lineup, policy: str) -> None:
    scorer = Scorer(OnlineStore(), lineup, make_policy(policy), random.Random(1), feature_cache_users=0)
    answer = scorer.score(_request()).response
    assert sum(r["propensity"] for r in answer["ranked"]) == pytest.approx(1.0)
    greedy = scorer.score(_request(explore=False))
    assert greedy.response["ranked"][0]["propensity"] == 1.0 and greedy.decision["policy"] == "greedy"


@pytest.mark.parametrize("policy", ["epsilon_greedy", "softmax", "thompson", "greedy"])
def test_a_champion_that_diverged_is_answered_around_by_the_prior_and_counted(
        lineup: Lineup, policy: str, caplog: pytest.LogCaptureFixture) -> None:
    from app.learning_metrics import CHAMPION_ERRORS

    # Both tips rewarded before and a user who has reacted: the champion's score counts for them.
    lineup.prior.update("a", 0.0)
    lineup.prior.update("b", 1.0)
    store = OnlineStore()
    store.apply(_event(1, "tip.reacted", "2026-11-26T14:00:00+01:00", tip_id="b", reaction="acted"))
    lineup.champion.classifier._weights["tip_id_a"] = float("nan")  # as a diverged step leaves it
    scorer = Scorer(store, lineup, make_policy(policy), random.Random(1), feature_cache_users=0)
    before = CHAMPION_ERRORS.value
    first, second = scorer.score(_request()), scorer.score(_request(explore=False))
    assert CHAMPION_ERRORS.value == before + 2
    assert [r["tip_id"] for r in second.response["ranked"]] == ["b", "a"]  # the prior's order
    for scored in (first, second):
        assert all(0.0 <= r["score"] <= 1.0 for r in scored.response["ranked"])
        assert sum(r["propensity"] for r in scored.response["ranked"]) == pytest.approx(1.0)
        logged = {r["tip_id"]: r["model_score"] for r in orjson.loads(scored.payload)["ranked"]}
        assert logged["a"] is None and logged["b"] is not None  # the log says what the champion did
    errors = [r for r in caplog.records if r.name == "tipstream.scoring"]
    assert len(errors) == 1 and "tipstream models rollback" in errors[0].getMessage()



@pytest.mark.parametrize("policy", ["epsilon_greedy", "softmax", "thompson", "greedy"])
def test_a_diverged_champion_is_noticed_while_every_tip_is_new(lineup: Lineup, policy: str) -> None:
    """Unseen tips are ranked by the prior whatever the model says, so epsilon-greedy and
    softmax used to serve on without counting the NaN champion (only Thompson sampling noticed)."""
    from app.learning_metrics import CHAMPION_ERRORS

    lineup.champion.classifier._weights["tip_id_a"] = float("nan")
    scorer = Scorer(OnlineStore(), lineup, make_policy(policy), random.Random(1), feature_cache_users=0)
    before = CHAMPION_ERRORS.value
    scored = scorer.score(_request())
    assert CHAMPION_ERRORS.value == before + 1
    assert sum(r["propensity"] for r in scored.response["ranked"]) == pytest.approx(1.0)

@pytest.mark.parametrize("diverged", [False, True], ids=["champion", "prior_only"])
@pytest.mark.parametrize("policy", [("epsilon_greedy", {"epsilon": 0.3}), ("softmax", {"temperature": 0.1}),
                                    ("thompson", {})], ids=lambda p: p[0])
def test_the_logged_propensities_are_how_often_score_serves_each_tip_first(
        lineup: Lineup, policy: tuple[str, dict[str, float]], diverged: bool) -> None:
    """Off-policy evaluation divides by the propensities /score logs, so they must be the chances
    of what it serves, after the prior's blend, its Thompson posteriors, and ties (two tips never
    rewarded both score the base rate), and when a diverged champion leaves the ranking to the prior.
    The policies are checked alone in test_models_policy.py; this checks what /score hands them."""
    for tip, rewards in {"a": "1101", "b": "0100", "c": "1110", "d": "0010"}.items():
        for _ in range(5):
            for r in rewards:
                lineup.prior.update(tip, float(r))
    for tip in "abcd" * 3:  # the champion's own scores differ from the prior's
        lineup.champion.learn_one({"user_id": "u-1", "tip_id": tip}, 1.0 if tip in "bd" else 0.0)
    store = OnlineStore()
    for i in range(3):  # reactions of the user's: the champion's score counts in the blend
        store.apply(_event(i, "tip.reacted", "2026-11-26T14:00:00+01:00", tip_id="b", reaction="acted"))
    if diverged:
        lineup.champion.classifier._weights["tip_id_a"] = float("nan")
    tips = ["a", "b", "c", "d", "new-1", "new-2"]
    request = parse_request(orjson.dumps({"user_id": "u-1", "candidates": [{"tip_id": t} for t in tips],
                                          "context": {"now": "2026-11-26T15:00:00+01:00"}}))
    scorer = Scorer(store, lineup, make_policy(policy[0], **policy[1]), random.Random(7), feature_cache_users=0)
    n, firsts, logged = 2500, dict.fromkeys(tips, 0), None
    for _ in range(n):
        ranked = scorer.score(request).response["ranked"]
        firsts[ranked[0]["tip_id"]] += 1
        propensities = {r["tip_id"]: r["propensity"] for r in ranked}
        assert logged is None or propensities == logged  # the same inputs, the same chances
        logged = propensities
    assert logged is not None and sum(logged.values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(p > 0.02 for p in logged.values()) >= 3, logged  # enough exploration to test anything
    for tip in tips:  # 4.5 standard errors: no false alarm in ~150,000 such checks
        p = logged[tip]
        assert abs(firsts[tip] / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-3, (tip, firsts[tip] / n, p)


def test_a_champion_that_fails_to_score_is_answered_around_by_the_prior_and_counted(
        lineup: Lineup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from app.learning_metrics import CHAMPION_ERRORS
    from app.score_request import Candidate, ScoreRequest

    lineup.prior.update("a", 0.0)
    lineup.prior.update("b", 1.0)
    scorer = Scorer(OnlineStore(), lineup, make_policy("thompson"), random.Random(1), feature_cache_users=0)
    before = CHAMPION_ERRORS.value
    # What a request validated before numbers were bounded did: int(inf) for an hour bucket.
    unchecked = ScoreRequest.model_construct(user_id="u-1", candidates=[Candidate(tip_id="a"), Candidate(tip_id="b")],
                                             context=None, profile_features={"preferred_hour": math.inf},
                                             explore=False)
    overflowed = scorer.score(unchecked)

    def failing(*args: Any, **kwargs: Any) -> list[float]:
        raise ValueError("cannot convert float NaN to integer")

    monkeypatch.setattr(lineup.champion, "predict_many", failing)
    failed = scorer.score(_request())
    assert CHAMPION_ERRORS.value == before + 2
    for scored in (overflowed, failed):
        assert {r["tip_id"] for r in scored.response["ranked"]} == {"a", "b"}
        assert sum(r["propensity"] for r in scored.response["ranked"]) == pytest.approx(1.0)
        assert [r["model_score"] for r in orjson.loads(scored.payload)["ranked"]] == [None, None]
    assert [r["tip_id"] for r in overflowed.response["ranked"]] == ["b", "a"]  # the prior's order
    errors = [r.getMessage() for r in caplog.records if r.name == "tipstream.scoring"]
    assert len(errors) == 1 and "OverflowError" in errors[0] and "tipstream models rollback" in errors[0]


class FakeNats:
    """The part of the NATS client the publisher uses; JetStream's answers are scripted."""

    def __init__(self) -> None:
        self.stored: list[str] = []  # decision ids, once each (the duplicate window)
        self.answers: list[str] = []  # per publish, in order: "ok" (default), "error", "lost"
        self.is_connected = True
        self.max_payload = 1 << 20  # nats-server's default, told in its INFO
        self.handler: Any = None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe_raw(self, subject: str, handler: Any) -> None:
        self.handler = handler

    async def _send_command(self, blob: bytes) -> None:
        loop = asyncio.get_running_loop()
        while blob:
            line, blob = blob.split(b"\r\n", 1)
            _, _, reply, header_size, total = line.split(b" ")
            message, blob = blob[: int(total)], blob[int(total) + 2 :]
            decision_id = message[: int(header_size)].split(b"Nats-Msg-Id: ")[1].split(b"\r\n")[0].decode()
            answer = self.answers.pop(0) if self.answers else "ok"
            if answer == "ok":
                if decision_id not in self.stored:
                    self.stored.append(decision_id)
                loop.call_soon(self.handler, reply, b"", b'{"stream":"DECISIONS","seq":1}', None)
            elif answer == "error":
                loop.call_soon(self.handler, reply, b"", b'{"error":{"code":500}}', None)
            elif answer == "insufficient":  # nats-server 2.15.1's answer, its max_file_store reached
                loop.call_soon(self.handler, reply, b"", b'{"error":{"code":503,"err_code":10023,'
                               b'"description":"insufficient resources"},"stream":"DECISIONS","seq":0}', None)
            elif answer == "no responders":  # a status: DECISIONS without a leader (a cluster electing one)
                loop.call_soon(self.handler, reply, b"", b"", b"NATS/1.0 503\r\nNats-Subject: decisions.score\r\n\r\n")
            elif answer == "in process":  # 2.15.1, a decision sent again while its first try is being stored
                loop.call_soon(self.handler, reply, b"", b'{"error":{"code":409,"err_code":10158,"description":'
                               b'"duplicate message id is in process"},"stream":"DECISIONS","seq":0}', None)

    async def _flush_pending(self) -> None:
        pass


async def published_through(nc: FakeNats, count: int, **params: Any) -> DecisionPublisher:
    """`count` decisions offered to a publisher over `nc`, flushed: the publisher, its task stopped."""
    publisher = DecisionPublisher(lambda: nc, queue_max=100, **params)
    await publisher.start()
    task = asyncio.create_task(publisher.run())
    for i in range(count):
        assert publisher.offer("decisions.score", f"d-{i}", b"{}")
    assert await publisher.flush(10)
    task.cancel()
    return publisher


async def test_the_publisher_retries_failures_and_never_drops_a_decision() -> None:
    nc = FakeNats()
    nc.answers = ["ok", "error", "lost", "ok", "error"]
    published: list[str] = []
    publisher = await published_through(nc, 10, batch=4, window=3, ack_timeout_s=0.2,
                                        on_published=lambda decision_id, _: published.append(decision_id))
    assert sorted(nc.stored) == sorted(published) == sorted(f"d-{i}" for i in range(10))
    assert publisher.published == 10 and publisher.waiting == 0 and publisher.retried == 3


async def test_decisions_retried_counts_each_send_again_and_its_help_says_so() -> None:
    """A NATS store's disk full for 60 s made tipstream_decisions_total{outcome="retried"} 70 for 5 decisions, and its
    help said only "retried": read as 70 decisions, not 70 sends again of 5."""
    from app.learning_metrics import DECISIONS

    retried, published = DECISIONS.labels("retried"), DECISIONS.labels("published")
    before = retried.value, published.value
    nc = FakeNats()
    nc.answers = ["lost", "lost", "lost"]  # one decision, unacknowledged three times
    await published_through(nc, 1, batch=1, window=1, ack_timeout_s=0.05)
    assert (retried.value - before[0], published.value - before[1]) == (3, 1)
    assert "sends again, not decisions" in DECISIONS.documentation, DECISIONS.documentation
    assert "413" in DECISIONS.documentation, "a decision too large for max_payload is counted refused too"


async def test_a_server_that_answers_no_publish_is_told_once_then_the_decisions_go_through(
        caplog: pytest.LogCaptureFixture) -> None:
    """nats-server with its store's disk full took every publish and answered none: the decisions went round
    (tipstream_decisions_total{outcome="retried"}) with not a line in the log."""
    import logging

    caplog.set_level(logging.WARNING, logger="tipstream.decisions")
    nc = FakeNats()
    nc.answers = ["lost"] * 6
    await published_through(nc, 2, batch=2, window=2, ack_timeout_s=0.05)
    told = [r.getMessage() for r in caplog.records if "acknowledged none" in r.getMessage()]
    assert len(told) == 1, told  # three rounds unanswered, one line a minute
    assert "no space left on device" in told[0] and "NATS connected; 2 decisions wait, sent again" in told[0], told[0]
    assert sorted(nc.stored) == ["d-0", "d-1"]


async def test_a_server_that_answers_no_publish_is_told_as_hung_or_full(caplog: pytest.LogCaptureFixture) -> None:
    """The embedded nats-server stopped (SIGSTOP) for 20 s answered no publish either: the line asked only whether
    its store was full, and sent the operator to look for 'no space left on device' in a log that had none."""
    import logging

    caplog.set_level(logging.WARNING, logger="tipstream.decisions")
    nc = FakeNats()
    nc.answers = ["lost"] * 2
    await published_through(nc, 2, batch=2, window=2, ack_timeout_s=0.05)
    told = [r.getMessage() for r in caplog.records if "acknowledged none" in r.getMessage()]
    assert told and "hang" in told[0] and "TIPSTREAM_NATS_PING_INTERVAL_S" in told[0], told


async def test_decisions_acknowledged_again_after_a_long_silence_are_told_with_all_of_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A NATS_URL server with its store's disk full answered no decision for 67 s, with a line a minute: once
    restarted with room, the log said 'JetStream acknowledges decisions again, 6 s after the line saying it
    acknowledged none', the time since the last of those lines, not since the first."""
    import logging

    from streams.log_throttle import LogThrottle

    caplog.set_level(logging.INFO, logger="tipstream.decisions")
    nc = FakeNats()
    nc.answers = ["lost"] * 12  # twelve rounds unanswered, 0.2 s each at least
    publisher = DecisionPublisher(lambda: nc, queue_max=100, batch=1, window=1, ack_timeout_s=0.2)
    publisher._unanswered_lines = LogThrottle(window_s=0)  # a line each round, as one a minute over minutes
    await publisher.start()
    task = asyncio.create_task(publisher.run())
    assert publisher.offer("decisions.score", "d-0", b"{}")
    assert await publisher.flush(20)
    task.cancel()
    told = [r for r in caplog.records if "acknowledged none" in r.getMessage()]
    [again] = [r for r in caplog.records if r.getMessage().startswith("JetStream acknowledges decisions again, ")]
    assert len(told) >= 2, [r.getMessage() for r in told]
    seconds = int(again.getMessage().split(", ")[1].split(" s ")[0])
    assert again.created - told[-1].created < 1 and again.created - told[0].created >= 2  # the last, and the first
    assert abs(seconds - (again.created - told[0].created)) < 1, again.getMessage()
    assert "after the first line saying it acknowledged none" in again.getMessage(), again.getMessage()
    # Counted with its noun: '1 wait' read as a noun, and '1 decisions' elsewhere.
    assert "NATS connected; 1 decision waits, sent again" in told[0].getMessage(), told[0].getMessage()
    assert again.getMessage().endswith("; 0 decisions wait"), again.getMessage()


async def test_a_decision_that_could_not_be_written_is_counted_in_the_singular(
        caplog: pytest.LogCaptureFixture) -> None:
    """It read 'could not write 1 decisions to NATS'."""
    import logging

    class Cut(FakeNats):
        cuts = 1

        async def _send_command(self, blob: bytes) -> None:
            if self.cuts:
                self.cuts -= 1
                raise ConnectionResetError("the connection went away")
            await super()._send_command(blob)

    caplog.set_level(logging.WARNING, logger="tipstream.decisions")
    nc = Cut()
    await published_through(nc, 1, batch=1, window=1, ack_timeout_s=0.05)
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("could not write")]
    assert told == ["could not write 1 decision to NATS (the connection went away); it will be retried"], told
    assert nc.stored == ["d-0"]


async def refusals_told(caplog: pytest.LogCaptureFixture, nc: FakeNats, answers: list[str]) -> list[str]:
    """One decision published through `nc` answering `answers` first: the warnings of its refusals."""
    import logging

    caplog.set_level(logging.INFO, logger="tipstream.decisions")
    nc.answers = answers
    publisher = DecisionPublisher(lambda: nc, queue_max=100, batch=1, window=1, ack_timeout_s=1)
    await publisher.start()
    task = asyncio.create_task(publisher.run())
    assert publisher.offer("decisions.score", "d-0", b"{}")
    assert await publisher.flush(10)
    task.cancel()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("JetStream refused decision")]


async def test_a_refusal_for_storage_full_says_which_limits_to_free_or_raise(caplog: pytest.LogCaptureFixture) -> None:
    """'insufficient resources' was logged as JetStream's bytes, with nothing on what is full or what to do."""
    told = await refusals_told(caplog, FakeNats(), ["insufficient", "error"])
    assert len(told) == 2 and "insufficient resources" in told[0], told
    assert "max_file" in told[0] and "TIPSTREAM_STREAM_MAX_BYTES" in told[0] and "max_file" not in told[1], told


async def test_a_refusal_by_no_responders_or_for_a_try_in_process_says_why_and_what_to_do(
        caplog: pytest.LogCaptureFixture) -> None:
    """A NATS cluster that lost the node leading DECISIONS (killed, or stopped 20 s, in a soak) had each decision
    refused with a 503 status, and one sent again while its first try was being stored with 10158: the log gave
    the answer's bytes only, a dozen lines, with neither why nor what to do."""
    nc = FakeNats()
    told = await refusals_told(caplog, nc, ["no responders", "in process"])
    assert len(told) == 2, told
    assert "no leader until the other nodes elect one" in told[0] and "nats server report jetstream" in told[0], told
    assert "still storing an earlier try" in told[1], told
    assert nc.stored == ["d-0"]
    # Once stored, said: the refusals' lines were the last word, the operator left to guess whether they went on.
    assert any(r.getMessage().startswith("JetStream acknowledges decisions again, ") and "refused one" in r.getMessage()
               for r in caplog.records)


async def test_nothing_is_written_while_nats_is_away() -> None:
    nc = FakeNats()
    nc.is_connected = False
    publisher = DecisionPublisher(lambda: nc, queue_max=100, batch=4, window=10, ack_timeout_s=0.2)
    await publisher.start()
    task = asyncio.create_task(publisher.run())
    publisher.offer("decisions.score", "d-1", b"{}")
    assert not await publisher.flush(0.3) and nc.stored == []
    nc.is_connected = True
    assert await publisher.flush(5) and nc.stored == ["d-1"]
    task.cancel()


async def test_a_full_queue_pushes_back_then_refuses() -> None:
    nc = FakeNats()
    publisher = DecisionPublisher(lambda: nc, queue_max=2, batch=1, window=10)
    await publisher.start()
    assert publisher.offer("decisions.score", "d-1", b"{}") and publisher.offer("decisions.score", "d-2", b"{}")
    assert not publisher.offer("decisions.score", "d-3", b"{}")
    with pytest.raises(DecisionLogFull, match="TIPSTREAM_DECISION_QUEUE_MAX"):
        await publisher.put("decisions.score", "d-3", b"{}", timeout_s=0.05)
    task = asyncio.create_task(publisher.run())  # room comes once the queue drains: put succeeds
    await publisher.put("decisions.score", "d-3", b"{}", timeout_s=2)
    assert await publisher.flush(2)
    task.cancel()
    assert publisher.published == 3


@pytest.mark.parametrize(("waiting", "told"), [(1, "1 decision (0.0 MB) is waiting"),
                                              (1_234, "1,234 decisions (0.0 MB) are waiting")])
async def test_a_full_queue_counts_its_decisions_in_words(waiting: int, told: str) -> None:
    """The 503 of a full queue read '1 decisions ... are waiting', and a long queue's count had no thousands' mark."""
    publisher = DecisionPublisher(lambda: FakeNats(), queue_max=waiting, batch=1, window=10)
    for i in range(waiting):
        assert publisher.offer("decisions.score", f"d-{i}", b"{}")
    with pytest.raises(DecisionLogFull) as full:
        await publisher.put("decisions.score", "d-last", b"{}", timeout_s=0)
    assert str(full.value).startswith(f"{told} for JetStream"), str(full.value)


async def holding_one_too_large(queue_max: int) -> tuple[DecisionPublisher, FakeNats, asyncio.Task[Any]]:
    """A publisher over a server taking 2,000 bytes a message, holding aside 'd-large' (3,000 bytes, put back by a
    start); its task, running."""
    nc = FakeNats()
    nc.max_payload = 2_000
    publisher = DecisionPublisher(lambda: nc, queue_max=queue_max, batch=4, window=10)
    await publisher.start()
    publisher.put_back([("decisions.score", "d-large", b"x" * 3_000)])
    task = asyncio.create_task(publisher.run())
    assert await publisher.flush(5) and [d for _, d, _ in publisher.held] == ["d-large"]
    return publisher, nc, task


async def test_a_full_queue_with_one_held_and_one_waiting_says_each_in_the_singular() -> None:
    """Held aside for the server's max_payload, one decision; waiting for NATS, one other: 'The other 1 wait'."""
    publisher, nc, task = await holding_one_too_large(queue_max=2)
    nc.is_connected = False
    assert publisher.offer("decisions.score", "d-1", b"{}")
    with pytest.raises(DecisionLogFull) as full:
        await publisher.put("decisions.score", "d-2", b"{}", timeout_s=0)
    told = str(full.value)
    assert "held aside until a limit is raised: 1 larger than the NATS server takes" in told, told
    assert told.endswith(" 1 other decision waits for JetStream: is NATS reachable? Retry after that."), told
    task.cancel()


async def test_a_held_decision_s_sizes_are_told_with_thousands_marks(caplog: pytest.LogCaptureFixture) -> None:
    """The held decision's error line read 'decision d-large is 3034 bytes ... (its max_payload, 2000 bytes)', as did
    the 503 and 413 that name the server's limit, where the service's other figures read '1,234'."""
    import logging

    caplog.set_level(logging.ERROR, logger="tipstream.decisions")
    publisher, nc, task = await holding_one_too_large(queue_max=1)
    task.cancel()
    refusing = DecisionPublisher(lambda: nc, queue_max=1, batch=4, window=10)  # its own bound on these lines
    refusing._hold(("decisions.score", "d-refused", b"x" * 1_500), why="message size exceeds maximum allowed")
    told = [r.getMessage() for r in caplog.records]
    assert re.match(r"decision d-large is 3,\d{3} bytes, .* \(its max_payload, 2,000 bytes\)", told[0]), told
    assert re.match(r"JetStream refused decision d-refused \(1,\d{3} bytes\) for good", told[1]), told
    with pytest.raises(DecisionLogFull, match=r"\(its max_payload, 2,000 bytes: raise it"):
        await publisher.put("decisions.score", "d-1", b"{}", timeout_s=0)
    with pytest.raises(DecisionTooLarge, match=r"this answer's decision is 3,\d{3} bytes, .* \(its max_payload, 2,000"):
        await publisher.put("decisions.score", "d-2", b"x" * 3_000, timeout_s=0)


async def test_a_withdrawn_decision_waiting_for_room_is_never_queued() -> None:
    """A forget withdraws its user's decisions still waiting for room: each put raises at once, the others wait on."""
    publisher = DecisionPublisher(lambda: FakeNats(), queue_max=1, batch=1, window=10)
    assert publisher.offer("decisions.score", "d-0", b'{"user_id":"u-0"}')
    puts = {user: asyncio.create_task(publisher.put("decisions.score", f"d-{user}", b'{"user_id":"%s"}' % user.encode(),
                                                    timeout_s=30)) for user in ("u-1", "u-2")}
    while len(publisher._waiting_for_room) < 2:  # both waiting for room
        await asyncio.sleep(0)
    assert publisher.withdraw(lambda payload: b'"u-1"' in payload) == 1
    with pytest.raises(DecisionWithdrawn):
        await asyncio.wait_for(puts["u-1"], 5)
    assert not puts["u-2"].done() and [item[1] for item in publisher.queue] == ["d-0"]
    assert publisher.withdraw(lambda payload: b'"u-1"' in payload) == 0
    puts["u-2"].cancel()
    with pytest.raises(asyncio.CancelledError):
        await puts["u-2"]
    assert not publisher._waiting_for_room


async def test_decisions_held_aside_let_go_for_a_forget_free_their_room_and_their_spool() -> None:
    """A forget lets its user's decisions held aside go (never stored): their bytes and count leave the queue's
    bounds, and the spool of those put back at the start goes once the others are published, as it would have."""
    nc = FakeNats()
    nc.max_payload = 2_000
    publisher = DecisionPublisher(lambda: nc, queue_max=100, batch=4, window=10)
    await publisher.start()
    spool_done = []
    publisher.put_back([("decisions.score", "d-large", b"x" * 3_000), ("decisions.score", "d-1", b"{}")],
                       lambda: spool_done.append(True))
    task = asyncio.create_task(publisher.run())
    assert await publisher.flush(5) and nc.stored == ["d-1"]
    assert [d for _, d, _ in publisher.held] == ["d-large"] and not spool_done, "the spool keeps the one held"
    assert publisher.let_go_held({"d-1", "d-other"}) == [] and publisher.waiting == 1
    assert publisher.let_go_held({"d-large"}) == ["d-large"]
    assert publisher.held == [] and publisher.waiting == 0 and publisher.bytes == 0 and spool_done == [True]
    task.cancel()


async def test_the_queue_is_bounded_in_bytes_too() -> None:
    """A decision is the caller's to size (a 256 KB /score body made one of 228 KB): bounded in count
    only, the queue held 4.5 GB of them while NATS was away."""
    nc = FakeNats()
    nc.answers = ["error", "lost"]  # retried ones are counted once, and released once stored
    publisher = DecisionPublisher(lambda: nc, queue_max=100, batch=1, window=10, ack_timeout_s=0.2,
                                  queue_max_bytes=10)
    await publisher.start()
    assert publisher.offer("decisions.score", "d-1", b"123456") and publisher.offer("decisions.score", "d-2", b"7890")
    assert publisher.bytes == 10 and not publisher.offer("decisions.score", "d-3", b"{}")
    with pytest.raises(DecisionLogFull, match="TIPSTREAM_DECISION_QUEUE_MB"):
        await publisher.put("decisions.score", "d-3", b"{}", timeout_s=0.05)
    task = asyncio.create_task(publisher.run())
    await publisher.put("decisions.score", "d-3", b"{}", timeout_s=5)  # room once some are stored
    assert await publisher.flush(5)
    task.cancel()
    assert sorted(nc.stored) == ["d-1", "d-2", "d-3"] and publisher.retried == 2
    assert publisher.bytes == 0 and publisher.waiting == 0


@pytest.mark.parametrize("path", ["/score", "/admin/models", "/admin/rollback"])
async def test_a_client_gone_before_its_body_is_answered_nothing_and_logs_nothing(tmp_path: Path, path: str) -> None:
    """An admin change read its body with Starlette's `request.body()`, which raises on a client gone:
    a traceback logged as an error (and a 500 sent to no one) for a client's closed connection."""
    from app.api import create_app

    token = "a-token-of-16-chars-or-more"
    # the real router, endpoints and service (not started)
    app = create_app(Settings(data_dir=tmp_path, admin_token=token))
    service = app.state.service
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"40"),
                                              (b"content-type", b"application/json"),
                                              (b"authorization", f"Bearer {token}".encode())]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent == [] and service.publisher.waiting == 0 and len(service.learner.joins.cache) == 0


async def test_an_admin_body_past_its_bound_is_a_413_read_no_further(tmp_path: Path) -> None:
    """Read whole by `request.body()`, a 5 MB registration body was parsed (a change's body is a few KB)."""
    from app.admin import ADMIN_MAX_BODY_BYTES
    from app.api import create_app

    token = "a-token-of-16-chars-or-more"
    app = create_app(Settings(data_dir=tmp_path, admin_token=token))
    scope = {"type": "http", "method": "POST", "path": "/admin/models", "raw_path": b"/admin/models",
             "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode())]}
    chunk = b" " * (ADMIN_MAX_BODY_BYTES // 4)
    read, sent = [0], []

    async def receive() -> dict[str, Any]:
        read[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": True}  # never ends

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 413 and read[0] == 5, "one chunk past the bound, and no further"
    assert orjson.loads(sent[1]["body"]) == {"error": f"body: larger than {ADMIN_MAX_BODY_BYTES} bytes",
                                             "field": "body"}


async def test_score_refuses_while_too_many_decision_rows_wait_for_the_database(tmp_path: Path) -> None:
    """With checkpoints failing, every decision served would add a row held in memory: past
    TIPSTREAM_MAX_UNWRITTEN_DECISIONS, /score answers 503 and serves nothing."""
    from app.api import create_app

    app = create_app(Settings(data_dir=tmp_path, max_unwritten_decisions=2))
    service = app.state.service
    for i in range(2):
        service.decision_log.mark({"decision_id": f"d-{i}"})
    assert service.decision_log.snapshot() is not None  # a checkpoint took them, and never confirmed it
    body = b'{"user_id": "u-1", "candidates": [{"tip_id": "a"}]}'
    scope = {"type": "http", "method": "POST", "path": "/score", "raw_path": b"/score", "root_path": "",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode()),
                                              (b"content-type", b"application/json")]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 503 and (b"retry-after", b"5") in sent[0]["headers"]
    answer = orjson.loads(sent[1]["body"])
    assert "TIPSTREAM_MAX_UNWRITTEN_DECISIONS" in answer["error"] and answer["error"].startswith("2 decisions")
    assert service.publisher.waiting == 0 and len(service.learner.joins.cache) == 0


def test_a_user_s_unknown_time_zone_is_logged_as_unknown_not_as_utc(lineup: Lineup) -> None:
    # No event of the user's and no context.now: nothing says where the user is. Logged as 0, the
    # decision was counted in the model card's fairness check as a user in EMEA.
    scorer = Scorer(OnlineStore(), lineup, make_policy("greedy"), random.Random(0), feature_cache_users=0)
    scored = scorer.score(_request(now=None))
    features = orjson.loads(scored.payload)["features"]
    assert features["utc_offset_min"] is None and scored.response["features"]["utc_offset_min"] is None
    assert validation.timezone_segment(features) == "unknown"
    lineup.champion.learn_one(app.decisions.learning_input(features, {"tip_id": "a"}), 1.0)
    assert lineup.champion.n_learned == 1
    # Told by context.now, or by the user's newest event, the offset is known (0 is UTC then).
    assert scorer.score(_request(now="2026-11-26T15:00:00+00:00")).response["features"]["utc_offset_min"] == 0


async def test_a_user_not_loaded_yet_while_the_database_is_away_is_a_503_not_a_500(tmp_path: Path) -> None:
    """After a restart, users load from the checkpoint in the background, and on demand; with the
    database away, the demand load failed inside the handler: a bare 500."""
    import httpx
    import sqlalchemy.exc

    from app.api import create_app

    app = create_app(Settings(data_dir=tmp_path))
    service = app.state.service

    def database_away(user_ids: list[str]) -> dict[str, bytes]:
        raise sqlalchemy.exc.OperationalError("SELECT user_state", {}, ConnectionRefusedError("connection refused"))

    service.store.cold, service.store.fetch_cold = {"u-1"}, database_away
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        scored = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "a"}]})
        features = await http.get("/users/u-1/features")
    for answer in (scored, features):
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5", answer.text
        assert answer.json()["field"] == "user_id" and "database" in answer.json()["error"]
    assert service.publisher.waiting == 0 and len(service.learner.joins.cache) == 0
    assert service.store.cold == {"u-1"}, "loaded when the database is back"


def test_a_shadow_disagrees_with_the_champion_s_choice_not_with_an_explored_tip(tmp_path: Path) -> None:
    """A shadow identical to the champion never disagrees. Compared with the tip served, it was
    counted as disagreeing on most decisions that explored."""
    from app.learning_metrics import SHADOW_DISAGREEMENTS

    url = f"sqlite:///{tmp_path / 't.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    lineup = Lineup(RegistryStore(engine), engine, eval_max_rewards=10)
    lineup.load("logreg", "logreg", learning_rate=0.1)  # v2, the shadow, is v1 again
    scorer = Scorer(OnlineStore(), lineup, make_policy("epsilon_greedy", epsilon=1.0), random.Random(3),
                    feature_cache_users=0)
    tips = [{"tip_id": t, "category": c} for t, c in (("a", "x"), ("b", "y"), ("c", "z"), ("d", "x"))]
    before = SHADOW_DISAGREEMENTS.value
    served = {scorer.score(parse_request(orjson.dumps({"user_id": "u-1", "candidates": tips}))).decision["ranked"][0]["tip_id"]
              for _ in range(40)}
    engine.dispose()
    assert len(served) > 1 and SHADOW_DISAGREEMENTS.value == before, served


def test_a_user_the_store_lets_go_of_leaves_the_feature_cache_too(lineup: Lineup) -> None:
    """A cached snapshot holds the user's state: an idle user let go of by the store stayed in memory
    (~9 KB with a month of events, against the snapshot's ~1.3) for as long as the cache kept them,
    which was for good while it served fewer users than it holds."""
    source = OnlineStore()
    source.apply(_event(1, "task.completed", "2026-09-01T08:00:00+01:00", user="idle", task_id="t-1"))
    blob = source.users["idle"].to_bytes()
    store = OnlineStore()
    store.fetch_cold = lambda ids: {i: blob for i in ids if i == "idle"}
    store.apply(_event(1, "task.completed", "2026-09-01T08:00:00+01:00", user="idle", task_id="t-1"))
    store.apply(_event(2, "task.completed", "2026-11-26T08:00:00+01:00", user="active", task_id="t-2"))
    scorer = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=10)
    served = {user: scorer.score(_request(user=user)).response["features"] for user in ("idle", "active")}
    store.begin_checkpoint()  # and its save committed
    assert store.rest(["idle", "active"]) == 1 and store.dormant == {"idle"}
    assert list(scorer._cache) == ["active"]
    assert scorer.score(_request(user="idle")).response["features"] == served["idle"]  # loaded back
    assert list(scorer._cache) == ["active", "idle"]


def test_first_start_settings_that_the_registered_models_do_not_have_are_found(tmp_path: Path) -> None:
    """TIPSTREAM_MODEL_KIND and its kin make v1 (and v2) on the first start only: set later, they
    changed nothing, and the start said nothing (`Service._load_learning` now warns of each)."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        first = Lineup(RegistryStore(engine), engine, eval_max_rewards=10)
        first.load("logreg", learning_rate=0.1)
        assert first.first_start_unused == []
        again = Lineup(RegistryStore(engine), engine, eval_max_rewards=10)
        again.load("logreg", learning_rate=0.1)
        assert again.first_start_unused == [], "the same settings: nothing to say"
        changed = Lineup(RegistryStore(engine), engine, eval_max_rewards=10)
        changed.load("fm", "fm", learning_rate=0.2, max_values=10)
        assert changed.first_start_unused == [("kind", "fm", "logreg"), ("learning_rate", 0.2, 0.1),
                                              ("max_values", 10, 100_000), ("shadow_kind", "fm", None)]
        assert (changed.champion_version, changed.shadow_version) == ("v1", None)
    finally:
        engine.dispose()


def test_a_cached_snapshot_is_not_reused_after_a_fold_at_the_event_cap(lineup: Lineup,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """At the cap (lowered to 3 here), a late event drops the kind's oldest record: the logs' total
    length, the newest time and the zone all stay, and the snapshot of before was served as exact."""
    from streams import fold
    from streams.features import evaluate
    from streams.fold import to_ms

    monkeypatch.setattr(fold, "MAX_RECORDS_PER_KIND", 3)
    store = OnlineStore()
    for i, day in enumerate((10, 18, 22)):
        store.apply(_event(i, "app.opened", f"2026-11-{day}T08:00:00+01:00"))
    store.apply(_event(3, "task.created", "2026-11-26T08:00:00+01:00", task_id="t"))
    scorer = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=10)
    state, now_ms = store.users["u-1"], to_ms(datetime.fromisoformat("2026-11-26T15:00:00+01:00"))
    assert scorer._profile("u-1", state, now_ms)[0]["app_opens_7d"] == 1
    assert store.apply(_event(4, "app.opened", "2026-11-25T08:00:00+01:00"))  # late: the one of the 10th goes
    values, fallbacks, _ = scorer._profile("u-1", state, now_ms)
    fresh = evaluate(state, now_ms)
    assert values == {name: v.value for name, v in fresh.items()} and values["app_opens_7d"] == 2
    assert fallbacks == {name for name, v in fresh.items() if v.fallback}


def test_a_cached_snapshot_is_not_reused_after_a_completion_s_copy_in_a_larger_local_hour(lineup: Lineup) -> None:
    """The same completion sent again with its time written in another zone replaces the copy in the smaller
    local hour: the logs' total length, the newest time and the zone all stay, and preferred_hour moves."""
    from streams.features import evaluate
    from streams.fold import to_ms

    store = OnlineStore()
    store.apply(_event(0, "task.completed", "2026-11-20T07:00:00+00:00", task_id="t"))
    store.apply(_event(1, "task.completed", "2026-11-26T09:30:00+01:00", task_id="u"))  # a tie: the earlier
    scorer = Scorer(store, lineup, make_policy("greedy"), random.Random(0), feature_cache_users=10)
    state, now_ms = store.users["u-1"], to_ms(datetime.fromisoformat("2026-11-26T15:00:00+01:00"))
    assert scorer._profile("u-1", state, now_ms)[0]["preferred_hour"] == 7
    assert store.apply(_event(0, "task.completed", "2026-11-20T09:00:00+02:00", task_id="t"))  # hour 9 now
    values, _, _ = scorer._profile("u-1", state, now_ms)
    assert values == {name: v.value for name, v in evaluate(state, now_ms).items()} and values["preferred_hour"] == 9


async def test_the_spool_reserve_not_held_at_a_start_is_taken_once_the_disk_has_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given up at a stop on a full disk (or not made at a start on one), the reserve stayed away until the next
    start, space freed meanwhile: a second stop on a full disk lost every decision waiting."""
    import shutil

    from app import decision_spool
    from tests.conftest import eventually

    usage, looked = shutil.disk_usage(tmp_path), []
    free = [8 << 20]  # room for it, not with 16 MB besides

    def disk_usage(_: object) -> object:
        looked.append(1)
        return usage._replace(free=free[0])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    task = asyncio.create_task(decision_spool.hold_reserve_once_room(tmp_path, every_s=0.01, size=4096))
    await eventually(lambda: len(looked) >= 3)  # rounds with no room to spare
    assert not (tmp_path / decision_spool.RESERVE_NAME).exists() and not task.done()
    free[0] = 64 << 20
    await asyncio.wait_for(task, 5)
    assert (tmp_path / decision_spool.RESERVE_NAME).stat().st_size == 4096


async def test_each_version_that_learns_is_exposed_at_0_by_the_counters_the_readme_alerts_on(lineup: Lineup) -> None:
    """`increase()` of a series that first appears at 40 is 0. A version's diverged and refused-input
    counters appeared with their first count, so docs/operations.md's alerts on them missed the burst that
    made them (inputs refused once, say); they are exposed at 0 from when the version joins."""
    from app.metrics import METRICS

    version = "v-exposed-at-0"  # a name no other test counts for, whatever ran before in this process
    await lineup.register(version, "logreg", {}, actor="t")
    exposed = {(sample.name, sample.labels.get("version")): sample.value
               for family in METRICS.registry.collect() for sample in family.samples}
    for name in ("tipstream_rewards_diverged_total", "tipstream_rewards_skipped_total", "tipstream_inputs_refused_total"):
        assert exposed.get((name, version)) == 0, f"{name}{{version=\"{version}\"}} appears only once counted"
        assert exposed.get((name, "v1")) is not None, f"{name}: the first start's v1 too"


def test_every_status_score_answers_is_exposed_at_0_from_the_start() -> None:
    """In a process of its own, so that no other test has counted one first."""
    import subprocess
    import sys

    program = ("import app.score_endpoint; from app.metrics import METRICS; print(sorted(s.labels['status'] "
               "for f in METRICS.registry.collect() for s in f.samples if s.name == 'tipstream_score_requests_total'))")
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == str(["200", "413", "415", "422", "503"])

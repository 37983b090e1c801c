"""A model forgets the own features of users who stopped reacting, by log time (`user_ttl_days`)."""

from __future__ import annotations

import math
import random

import pytest

from models.registry import LEGACY_PARAMS
from models.reward import MAX_USER_TTL_DAYS, TipModel
from models.user_expiry import DAY_MS

KINDS = ("logreg", "fm")
T0 = 1_790_000_000_000  # ms, a day in 2026


def _x(user: str, category: str = "focus") -> dict:
    return {"user_id": user, "category": category, "tip_id": f"{category}-1", "hour_of_day": 9}


def _tables(model: TipModel) -> list[dict]:
    return [dict(table.to_dict() if hasattr(table, "to_dict") else table) for table in model._tables()]


def _names(model: TipModel) -> set[str]:
    return set().union(*(table.keys() for table in _tables(model)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_user_who_stopped_reacting_is_forgotten_and_comes_back_as_a_new_one(kind: str) -> None:
    model = TipModel(kind=kind, user_ttl_days=1)
    for i in range(20):
        model.learn_one(_x("gone"), 1.0, T0 + i)
        model.learn_one(_x("gone", "breaks"), 0.0, T0 + i)
        model.learn_one(_x("stays", "breaks"), 1.0, T0 + i)  # the opposite taste
        model.learn_one(_x("stays"), 0.0, T0 + i)
    own = {"user_id_gone", "user_id*category=gone*focus", "user_id*category=gone*breaks"}
    assert own <= _names(model)
    assert model.predict_one(_x("gone")) > model.predict_one(_x("newcomer")) + 0.05  # learned their taste

    model.learn_one(_x("stays", "breaks"), 1.0, T0 + DAY_MS + 19)  # one day after "gone"'s last: not yet
    assert own <= _names(model) and model.users_held == 2
    # Looked for every 1/32 of the TTL: gone by then.
    model.learn_one(_x("stays", "breaks"), 1.0, T0 + DAY_MS + DAY_MS // 32 + 20)

    assert not own & _names(model), "weights, AdaGrad sums and latents all go"
    assert "user_id_stays" in _names(model) and model.users_held == 1
    assert model.predict_one(_x("gone")) == pytest.approx(model.predict_one(_x("newcomer")))
    assert model.predict_one(_x("stays", "breaks")) > model.predict_one(_x("newcomer", "breaks")) + 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_a_user_back_after_the_ttl_starts_anew_before_any_sweep_found_them(kind: str) -> None:
    """Sweeps come every 1/32 of the TTL, and the first reaction after a quiet spell is the one
    that sweeps: a user whose own return is that reaction, or who returns between two sweeps,
    must not be taught on top of the weights they should have lost, and kept for good."""
    back, fresh = TipModel(kind=kind, user_ttl_days=1), TipModel(kind=kind, user_ttl_days=1)
    for model in (back, fresh):
        for i in range(20):
            model.learn_one(_x("back"), 1.0, T0 + i)
    back.learn_one(_x("back"), 0.0, T0 + 2 * DAY_MS)
    fresh.learn_one(_x("newcomer"), 0.0, T0 + 2 * DAY_MS)

    assert back.predict_one(_x("back")) == pytest.approx(fresh.predict_one(_x("newcomer")))
    back.learn_one(_x("back"), 0.0, T0 + 2 * DAY_MS + 1)  # and with a new one's step sizes (AdaGrad's sums)
    fresh.learn_one(_x("newcomer"), 0.0, T0 + 2 * DAY_MS + 1)
    assert back.predict_one(_x("back")) == pytest.approx(fresh.predict_one(_x("newcomer")))
    assert back.users_held == fresh.users_held == 1


def test_the_clock_forgets_no_one_only_the_log_time_given() -> None:
    """Learned without a time (a test, a doctest), a reaction is not recorded for forgetting; with
    `user_ttl_days` 0 (what versions registered before it exist say), every user is kept."""
    untimed, kept = TipModel(user_ttl_days=1), TipModel(user_ttl_days=0)
    for at_ms in (T0, T0 + 400 * DAY_MS):
        untimed.learn_one(_x(f"u-{at_ms}"), 1.0)
        kept.learn_one(_x(f"u-{at_ms}"), 1.0, at_ms)
    assert {"user_id_u-1790000000000", "user_id_u-1824560000000"} <= _names(untimed) & _names(kept)
    assert untimed.users_held == 0 and kept.users_held is None


CONFIGURATIONS = {
    "logreg": {"kind": "logreg"},
    "fm": {"kind": "fm"},
    "fm, latents for all": {"kind": "fm", "latents": "all"},
    # The user second in a pair, crossed with an hour, with a bool; names `UserExpiry` must rebuild.
    "custom crosses": {"kind": "logreg", "interactions": [["category", "user_id"], ["user_id", "hour_of_day"],
                                                          ["is_new", "user_id"], ["category", "hour_of_day"]]},
}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_a_snapshot_mid_stream_forgets_exactly_what_one_uninterrupted_model_forgets(name: str) -> None:
    """A restart resumes from a snapshot (the frozen copy's bytes) and replays the rest of the log:
    the users it forgets, and when, must be the same, or a rebuild would not match the live model.
    And what goes is all of each user's own: no feature naming them is left."""
    rng = random.Random(3)
    stream = []
    at_ms = T0
    for _ in range(600):
        at_ms += rng.randrange(0, 4 * 3_600_000)  # hours apart: ~50 days in all, with a TTL of 5
        x = {**_x(f"<u{rng.randrange(60)}>", rng.choice(("focus", "breaks", "sleep"))),
             "hour_of_day": rng.randrange(24), "is_new": rng.random() < 0.5}
        stream.append((x, float(rng.random() < 0.5), at_ms))
    params = {**CONFIGURATIONS[name], "user_ttl_days": 5, "seed": 1}
    whole, resumed = TipModel(**params), TipModel(**params)
    for x, reward, at in stream[:300]:
        whole.learn_one(x, reward, at)
        resumed.learn_one(x, reward, at)
    resumed = TipModel.from_bytes(resumed.frozen().to_bytes())
    for x, reward, at in stream[300:]:
        whole.learn_one(x, reward, at)
        resumed.learn_one(x, reward, at)
    assert whole.users_held < 60, "some users left for longer than 5 days: the stream must forget them"
    assert resumed._expiry.users == whole._expiry.users
    assert resumed._expiry.buckets == whole._expiry.buckets
    for ours, theirs in zip(_tables(resumed), _tables(whole)):
        assert ours.keys() == theirs.keys()
        assert all(_same(ours[k], theirs[k]) for k in ours)
    assert resumed.predict_one(stream[-1][0]) == whole.predict_one(stream[-1][0])
    names = _names(whole)
    gone = {x["user_id"] for x, _, _ in stream} - set(whole._expiry.users)
    assert gone and not [n for n in names if any(user in n for user in gone)]
    assert all(any(user in n for n in names) for user in whole._expiry.users)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))  # type: ignore[arg-type]
    return bool((a == b).all())  # type: ignore[union-attr]  # an FM latent vector


def test_a_model_from_before_forgetting_existed_keeps_every_user() -> None:
    model = TipModel()
    model.learn_one(_x("old"), 1.0, T0)
    del model.__dict__["_expiry"]  # as pickled by the code before it
    del model.params["user_ttl_days"]
    restored = TipModel.from_bytes(model.to_bytes())
    assert restored.params["user_ttl_days"] == LEGACY_PARAMS["user_ttl_days"] == 0.0
    restored.learn_one(_x("new"), 1.0, T0 + 1000 * DAY_MS)
    assert "user_id_old" in _names(restored) and restored.users_held is None


# 1e308: finite, but its milliseconds are not (an OverflowError, so a registration's bare 500).
@pytest.mark.parametrize("days", [-1, math.nan, math.inf, "90", 1e308, MAX_USER_TTL_DAYS + 1])
def test_a_bad_user_ttl_is_refused_by_name(days: object) -> None:
    with pytest.raises(ValueError, match="user_ttl_days"):
        TipModel(user_ttl_days=days)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["logreg", "fm"])
@pytest.mark.parametrize("ttl_days", [0, 90])
def test_forgetting_a_user_leaves_a_user_whose_id_holds_theirs_and_the_separator(kind: str, ttl_days: int) -> None:
    """A cross is named `user_id*category=<user>*<category>`: "u-1*evil" with "focus" starts as "u-1"'s
    would. Forgetting "u-1" (a request to forget a user) drops theirs only; the others' predictions stay."""
    model = TipModel(kind=kind, user_ttl_days=ttl_days)
    users = ("u-1", "u-1*evil", "x*u-1", "u-10")

    def x(user: str) -> dict[str, object]:
        return {"user_id": user, "category": "focus", "tip_id": "t", "hour_of_day": 9}

    for step in range(10):
        for user in users:
            model.learn_one(x(user), float(step % 2), at_ms=step * 1000)
    before = {user: model.predict_one(x(user)) for user in users[1:]}
    assert model.forget_user("u-1") > 0
    assert {user: model.predict_one(x(user)) for user in users[1:]} == before
    assert model.predict_one(x("u-1")) == model.predict_one(x("someone new"))
    assert model.forget_user("u-1") == 0

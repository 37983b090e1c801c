"""TipModel (models/reward.py) and PopularityPrior (models/prior.py), and the offline metrics of models/validation.py."""

from __future__ import annotations

import math
import os
import pickle
import random
import subprocess
import sys
from copy import copy as shallow_copy
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
from river import facto, optim

from models import prior as prior_module
from models import reward, snapshot, validation
from models.factorization import _FastFMClassifier
from models.losses import SoftLog
from models.prior import PopularityPrior
from models.registry import ModelVersion
from models.reward import (
    DEFAULT_REWARDS,
    TipModel,
    _sigmoid,
)
from models.validation import fairness_check, progressive_validation, tenure_segment, timezone_segment

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("logreg", "fm")
CATEGORIES = ("focus", "breaks", "planning")


def _reaction_reward(rng: random.Random, p_positive: float) -> float:
    """A reaction drawn like a real user's, turned into the default reward."""
    if rng.random() < p_positive:
        return DEFAULT_REWARDS[rng.choice(("acted", "liked"))]
    return DEFAULT_REWARDS[rng.choice(("snoozed", "dismissed", "disliked"))]


def _daypart_stream(n: int, seed: int = 7):
    """Users like `focus` tips in the morning and `breaks` tips in the evening."""
    rng = random.Random(seed)
    for _ in range(n):
        morning = rng.random() < 0.5
        hour = rng.randint(6, 11) if morning else rng.randint(18, 23)
        category = rng.choice(CATEGORIES)
        tip = f"tip-{category}-{rng.randrange(4)}"
        liked = (morning and category == "focus") or (not morning and category == "breaks")
        x = {"hour_of_day": hour, "completion_rate_7d": rng.random(), "preferred_hour": rng.randrange(24),
             "seconds_since_active": rng.expovariate(1 / 3600), "tip_id": tip, "category": category}
        yield x, _reaction_reward(rng, 0.8 if liked else 0.15)


def _user(hour: int) -> dict:
    return {"hour_of_day": hour, "completion_rate_7d": 0.5, "preferred_hour": 12, "seconds_since_active": 600.0}


def _trained(kind: str, n: int = 3000, **params) -> TipModel:
    model = TipModel(kind=kind, **params)
    for x, r in _daypart_stream(n):
        model.learn_one(x, r)
    return model


@pytest.fixture(scope="module", params=KINDS)
def trained(request) -> TipModel:
    return _trained(request.param)


def test_default_rewards_match_the_design() -> None:
    assert DEFAULT_REWARDS == {"acted": 1.0, "liked": 0.8, "snoozed": 0.3, "dismissed": 0.0, "disliked": 0.0}


def test_learns_time_of_day_preferences(trained: TipModel) -> None:
    def score(hour: int, category: str) -> float:
        return sum(trained.predict_one({**_user(hour), "tip_id": f"tip-{category}-{i}", "category": category})
                   for i in range(4)) / 4

    assert score(8, "focus") > score(8, "breaks") + 0.2
    assert score(21, "breaks") > score(21, "focus") + 0.2
    # The ranking that /score would serve: focus first in the morning, breaks first in the evening.
    for hour, best in ((9, "focus"), (20, "breaks")):
        candidates = [{"tip_id": f"tip-{c}-0", "category": c} for c in CATEGORIES]
        scores = trained.predict_many(candidates, shared=_user(hour))
        assert candidates[max(range(3), key=scores.__getitem__)]["category"] == best


@pytest.mark.parametrize("kind", KINDS)
def test_learns_each_users_own_taste_through_user_id(kind: str) -> None:
    # Hidden per-user tastes (as in streams.simulator): no profile feature reveals them, so only
    # the user_id x category cross can; a global model would be no better than random here.
    rng = random.Random(3)
    users = {f"u-{i}": set(rng.sample(CATEGORIES, 1)) for i in range(20)}
    model = TipModel(kind=kind, learning_rate=0.1)
    for _ in range(4000):
        user, liked = rng.choice(list(users.items()))
        category = rng.choice(CATEGORIES)
        x = {"user_id": user, "hour_of_day": rng.randrange(24), "tip_id": f"tip-{category}-{rng.randrange(3)}",
             "category": category}
        model.learn_one(x, _reaction_reward(rng, 0.8 if category in liked else 0.1))
    hits = 0
    for user, liked in users.items():
        candidates = [{"tip_id": f"tip-{c}-0", "category": c} for c in CATEGORIES]
        scores = model.predict_many(candidates, shared={"user_id": user, "hour_of_day": 12})
        hits += candidates[max(range(3), key=scores.__getitem__)]["category"] in liked
    assert hits >= 18  # random ranking: about 7 of 20


def test_fractional_rewards_are_learned_as_soft_labels() -> None:
    # The optimum of a soft label's log loss is p = reward. River's own log loss reads a label 0.3
    # as int(0.3) = 0, and its gradient for one is 0: nothing would be learned.
    model = TipModel(learning_rate=0.05, intercept_lr=0.05)
    x = {"tip_id": "t", "category": "c", "hour_of_day": 9}
    for _ in range(3000):
        model.learn_one(x, 0.3)
    assert model.predict_one(x) == pytest.approx(0.3, abs=0.03)


def _weights_of(model: TipModel) -> dict[str, float]:
    return dict(model.classifier.weights if model.params["kind"] == "fm" else model.classifier._weights)


def test_a_soft_reward_is_one_step_of_the_soft_labels_gradient() -> None:
    # Text inputs only: every feature is 1.0, whatever the scaler learned.
    x = {"user_id": "u", "tip_id": "t", "category": "focus"}
    model = TipModel(optimizer="sgd", learning_rate=0.1)
    for r in (1.0, 0.0, 1.0):  # p is not 0.5
        model.learn_one(x, r)
    features = model._features(x, model.interactions._plan0)
    for r in (0.8, 0.3):
        p, weights, intercept = model.predict_one(x), _weights_of(model), model.classifier.intercept
        model.learn_one(x, r)
        # Two weighted binary steps took the negative's gradient at weights the positive had moved.
        assert _weights_of(model) == pytest.approx({j: weights[j] - 0.1 * (p - r) * v for j, v in features.items()},
                                                   rel=0, abs=1e-12)
        assert model.classifier.intercept == pytest.approx(intercept - 0.01 * (p - r), rel=0, abs=1e-12)


def test_adagrad_adds_one_squared_gradient_a_reward() -> None:
    x = {"tip_id": "t", "category": "focus"}  # no user: nothing of AdaGrad's sums is forgotten
    model = TipModel()
    optimizer = model.classifier.optimizer
    for n, r in enumerate((0.8, 0.3, 1.0, 0.8, 0.0, 0.3), start=1):
        p, sums = model.predict_one(x), dict(optimizer.g2)
        model.learn_one(x, r)
        assert dict(optimizer.g2) == pytest.approx({j: sums.get(j, 0.0) + (p - r) ** 2 for j in optimizer.g2},
                                                   rel=1e-12, abs=0)
        assert optimizer.n_iterations == n  # one pass of the classifier a reward
    # The factorisation machine learns a soft reward in two steps still (`TipModel.soft_labels`).
    fm = TipModel(kind="fm")
    for r in (0.8, 1.0, 0.3):
        fm.learn_one(x, r)
    assert not fm.soft_labels and fm.classifier.weight_optimizer.n_iterations == 5


def test_a_soft_label_loss_is_rivers_log_loss_mixed_and_stored_as_rivers() -> None:
    loss, river = SoftLog(), optim.losses.Log()
    for z in (-40.0, -3.0, 0.0, 0.7, 25.0):
        p = _sigmoid(z)
        assert loss.gradient(0.3, z) == pytest.approx(p - 0.3, rel=0, abs=1e-10)  # River's, past |z| 18: to 1e-11
        assert loss(0.3, z) == pytest.approx(0.3 * river(True, z) + 0.7 * river(False, z), rel=1e-12)
        for y in (True, False, 1.0, 0.0):
            assert loss.gradient(y, z) == river.gradient(y, z) and loss(y, z) == river(y, z)
    ys, zs = np.array([0.0, 0.3, 1.0]), np.array([-2.0, 0.5, 3.0])
    assert loss.gradient(ys, zs) == pytest.approx([loss.gradient(y, z) for y, z in zip(ys, zs)], rel=0, abs=1e-15)
    # Pickled as River's Log, the name every release reads; a copy of a model learns as the model.
    assert type(pickle.loads(pickle.dumps(loss))) is optim.losses.Log
    assert type(deepcopy(loss)) is SoftLog and type(shallow_copy(loss)) is SoftLog
    model = TipModel.from_bytes(TipModel().to_bytes())
    assert type(model.classifier.loss) is SoftLog and model.soft_labels


@pytest.mark.parametrize("reward", [-0.1, 1.5, math.nan])
def test_rewards_outside_0_1_are_refused(reward: float) -> None:
    model = TipModel()
    with pytest.raises(ValueError, match="reward"):
        model.learn_one({"tip_id": "t"}, reward)
    assert model.n_learned == 0


def test_extreme_logits_give_float_probabilities() -> None:
    assert [_sigmoid(z) for z in (-1e4, -40.0, 0.0, 40.0, 1e4)] == [0.0, pytest.approx(4.25e-18), 0.5, 1.0, 1.0]
    assert all(type(_sigmoid(z)) is float for z in (-1e4, 1e4))


def test_features_of_a_wrong_type_are_named() -> None:
    with pytest.raises(TypeError, match="'tasks'"):
        TipModel().learn_one({"tip_id": "t", "tasks": [1, 2]}, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_clone_is_untrained_with_equal_params(kind: str) -> None:
    model = _trained(kind, n=300, learning_rate=0.07, l2=0.001)
    fresh = model.clone()
    assert fresh.params == model.params and fresh is not model
    assert fresh.n_learned == 0 and model.n_learned == 300
    x = {**_user(8), "tip_id": "tip-focus-0", "category": "focus"}
    assert fresh.predict_one(x) == 0.5 != model.predict_one(x)
    assert fresh.feature_names == []
    assert model.clone(learning_rate=0.2).params["learning_rate"] == 0.2


def test_params_survive_json_shapes() -> None:
    # The SQL adapter stores params as JSON: tuples come back as lists.
    model = TipModel(interactions=[["category", "hour_of_day"]])
    assert model.params["interactions"] == (("category", "hour_of_day"),)
    assert TipModel(**model.params).params == model.params


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="logreg, fm"):
        TipModel(kind="tree")
    with pytest.raises(ValueError, match="learning_rate"):
        TipModel(learning_rate=0)
    with pytest.raises(ValueError, match="hour_bucket"):
        TipModel(hour_bucket=0)
    with pytest.raises(ValueError, match="learning_rate must be a number, got 'fast'"):
        TipModel(learning_rate="fast")
    with pytest.raises(ValueError, match="n_factors must be a number, got True"):
        TipModel(kind="fm", n_factors=True)
    # Accepted before: a negative penalty grows every weight; "ab" was read as the pair (a, b).
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        TipModel(l2=-0.1)
    with pytest.raises(ValueError, match="intercept_lr must be >= 0"):
        TipModel(intercept_lr=-1)
    # Accepted before: int(1e300) was registered, and no JSON answer could then show the version (a 500).
    with pytest.raises(ValueError, match="max_values must be from 0"):
        TipModel(max_values=1e300)
    assert TipModel(max_values=2**63 - 1).params["max_values"] == 2**63 - 1
    for bad in (["ab"], [["category"]], [["category", "hour_of_day", "tip_id"]], [["category", 7]], [["", "tip_id"]]):
        with pytest.raises(ValueError, match="interactions"):
            TipModel(interactions=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_round_trip_is_exact_and_keeps_learning_identically(kind: str) -> None:
    model = _trained(kind, n=500)
    copy = TipModel.from_bytes(model.to_bytes())
    probes = [{**_user(h), "tip_id": f"tip-{c}-1", "category": c} for h in (7, 13, 22) for c in CATEGORIES]
    assert [copy.predict_one(x) for x in probes] == [model.predict_one(x) for x in probes]
    assert copy.params == model.params and copy.n_learned == model.n_learned
    for x, r in _daypart_stream(50, seed=99):
        model.learn_one(x, r)
        copy.learn_one(x, r)
    assert [copy.predict_one(x) for x in probes] == [model.predict_one(x) for x in probes]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_many_equals_predict_one_for_every_shape_of_cross(kind: str) -> None:
    # Crosses of two shared members, of two candidate members, of one of each (either way round).
    pairs = (("user_id", "hour_of_day"), ("tip_id", "category"), ("user_id", "category"), ("tip_id", "preferred_hour"))
    model = TipModel(kind=kind, interactions=pairs, learning_rate=0.2)
    rng = random.Random(4)
    for _ in range(500):
        model.learn_one({"user_id": f"u-{rng.randrange(3)}", "hour_of_day": rng.randrange(24), "preferred_hour": 9,
                         "tip_id": f"t-{rng.randrange(5)}", "category": rng.choice(CATEGORIES),
                         "length_s": rng.uniform(5, 60), "short": rng.random() < 0.5}, rng.random())
    shared = {"user_id": "u-1", "hour_of_day": 14, "preferred_hour": 9}
    # Candidates' own inputs of every type: text, float, bool, missing.
    candidates = [{"tip_id": f"t-{i}", "category": c, "length_s": 10.0 * i, "short": i < 2, "source": None}
                  for i in range(5) for c in CATEGORIES]
    one = [model.predict_one({**shared, **c}) for c in candidates]
    assert model.predict_many(candidates, shared=shared) == pytest.approx(one, abs=1e-12)
    assert model.predict_many(candidates, shared={**shared, "user_id": None}) == pytest.approx(
        [model.predict_one({**shared, "user_id": None, **c}) for c in candidates], abs=1e-12)
    # Text-only candidates: their cached part plus the user's crosses, one by one (logreg), also
    # with a member missing and a pair listed twice (one key, as in predict_one's dict).
    texts = [{"tip_id": f"t-{i}", "category": c} for i in range(5) for c in CATEGORIES] + [{"tip_id": "t-9"}]
    for request in range(2):  # the second from the cache
        assert model.predict_many(texts, shared=shared) == pytest.approx(
            [model.predict_one({**shared, **c}) for c in texts], abs=1e-12), request
    twice = TipModel(kind=kind, interactions=(*pairs, ("user_id", "category")), learning_rate=0.2)
    for c in texts:
        twice.learn_one({**shared, **c}, 1.0 if c.get("category") == "focus" else 0.0)
    assert twice.predict_many(texts, shared=shared) == pytest.approx(
        [twice.predict_one({**shared, **c}) for c in texts], abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_candidate_features_stay_exact_while_the_model_learns(kind: str) -> None:
    # The candidate cache holds feature keys, never weights or scaling: scores must follow
    # every learn_one, for other users and hours, and for candidates with numeric inputs.
    model = TipModel(kind=kind, learning_rate=0.2)
    rng = random.Random(7)
    for step in range(60):
        shared = {"user_id": f"u-{rng.randrange(4)}", "hour_of_day": rng.randrange(24),
                  "preferred_hour": rng.choice([None, 8, 20]), "tasks_open": rng.uniform(0, 9)}
        candidates = [{"tip_id": f"t-{i}", "category": CATEGORIES[i % 3]} for i in range(6)]
        candidates.append({"tip_id": "t-long", "category": "focus", "length_s": rng.choice([10.0, 30.0])})
        scores = model.predict_many(candidates, shared=shared)
        assert scores == pytest.approx([model.predict_one({**shared, **c}) for c in candidates], abs=1e-12), step
        for c in rng.sample(candidates, 3):
            model.learn_one({**shared, **c}, rng.random())
    assert model._candidate_cache, "the text-only candidates were cached"
    snapshot = model.to_bytes()
    model._candidate_cache.clear()
    assert model.to_bytes() == snapshot, "the cache is no part of a snapshot"
    assert TipModel.from_bytes(snapshot)._candidate_cache == {}
    with pytest.raises(TypeError, match="feature 'tags' must be a number, a string or None"):
        model.predict_many([{"tip_id": "t-0", "tags": ["a"]}], shared={"user_id": "u-0"})


def test_the_candidate_cache_is_bounded_over_every_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reward, "CANDIDATE_CACHE_ENTRIES", 50)
    model = TipModel()
    for hour in range(24):  # four hour buckets: four cross plans
        model.predict_many([{"tip_id": f"t-{hour}-{i}", "category": "focus"} for i in range(10)],
                           shared={"user_id": "u-1", "hour_of_day": hour})
        assert sum(map(len, model._candidate_cache.values())) < 50 + 10


def test_the_candidate_cache_is_bounded_in_what_its_entries_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded in entries only, a caller's candidates with 32 long text features of their own made
    each entry 16.5 KB, 33 times a tip id's and a category's: 1.65 GB a model at the bound."""
    monkeypatch.setattr(reward, "CANDIDATE_CACHE_ITEMS", 2_000)
    model = TipModel()
    model.learn_one({"user_id": "u-1", "tip_id": "t-0-0", "f0": "0-0-0", "hour_of_day": 9}, 1.0)
    shared = {"user_id": "u-1", "hour_of_day": 9}
    for r in range(20):
        xs = [{"tip_id": f"t-{r}-{c}", **{f"f{j}": f"{r}-{c}-{j}".ljust(128, "x") for j in range(32)}}
              for c in range(10)]
        assert model.predict_many(xs, shared=shared) == pytest.approx(
            [model.predict_one({**shared, **x}) for x in xs], abs=1e-12)
        held = sum(len(key) + len(part) for cache in model._candidate_cache.values() for key, part in cache.items())
        assert held == model._candidate_items[0] < 2_000 + 10 * 70, r  # a request adds at most its own past it
    assert model._candidate_cache, "they are cached still"


@pytest.mark.parametrize("kind", KINDS)
def test_weights_are_snapshotted_exactly_whatever_their_value_and_older_snapshots_still_load(kind: str) -> None:
    model = _trained(kind, n=300)
    clf = model.classifier
    weights = clf._weights if kind == "logreg" else clf.weights
    weights["user_id_odd"], weights["user_id_over"], weights["user_id_under"] = math.nan, math.inf, -5e-324
    copy = TipModel.from_bytes(model.to_bytes())
    tables = [(weights, copy.classifier._weights if kind == "logreg" else copy.classifier.weights)]
    if kind == "fm":
        clf.latents["user_id_odd"] = np.full(clf.n_factors, -math.inf)
        copy = TipModel.from_bytes(model.to_bytes())
        tables = [(clf.weights, copy.classifier.weights), (clf.latents, copy.classifier.latents)]
    for before, after in tables:
        assert list(after) == list(before)
        for a, b in zip(np.array(list(before.values())).ravel(), np.array(list(after.values())).ravel()):
            assert a == b or (math.isnan(a) and math.isnan(b))
    # Written by stock pickle, as before the tables had their own format.
    stock = TipModel.from_bytes(b"tipstream:TipModel:1\n" + pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
    probes = [{**_user(h), "tip_id": f"tip-{c}-1", "category": c} for h in (7, 22) for c in CATEGORIES]
    assert [stock.predict_one(x) for x in probes] == [copy.predict_one(x) for x in probes]


def test_snapshot_of_something_else_is_refused() -> None:
    with pytest.raises(ValueError, match="not a TipModel snapshot"):
        TipModel.from_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a TipModel snapshot"):
        TipModel.from_bytes(PopularityPrior().to_bytes())


def test_predict_many_equals_predict_one(trained: TipModel) -> None:
    user = {**_user(9), "user_id": "u-1"}
    candidates = [{"tip_id": f"tip-{c}-{i}", "category": c, "tip_length": float(i)} for c in CATEGORIES for i in range(4)]
    candidates.append({"tip_id": "tip-never-seen", "category": "new"})
    candidates.append({"tip_id": "tip-focus-0", "category": "focus", "hour_of_day": 21})  # overrides a shared value
    one = [trained.predict_one({**user, **c}) for c in candidates]
    assert trained.predict_many([{**user, **c} for c in candidates]) == pytest.approx(one, abs=1e-12)
    assert trained.predict_many(candidates, shared=user) == pytest.approx(one, abs=1e-12)
    assert trained.predict_many(candidates[:-1], shared=user) == pytest.approx(one[:-1], abs=1e-12)
    assert trained.predict_many([]) == []
    assert trained.predict_many([{**user, **candidates[0]}]) == [one[0]]
    assert all(0.0 <= p <= 1.0 for p in one)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_many_shares_only_values_of_one_type(kind: str) -> None:
    # True == 1, but a cross labels True "true" and 1 the hour bucket 0-5: found shared, the 1 was
    # crossed as True, and that candidate scored as the True one did.
    model = TipModel(kind=kind, interactions=[("flag", "category")])
    for _ in range(30):
        model.learn_one({"flag": True, "category": "focus", "tip_id": "t"}, 1.0)
        model.learn_one({"flag": 1, "category": "focus", "tip_id": "t"}, 0.0)
    candidates = [{"flag": True, "category": "focus", "tip_id": "t"}, {"flag": 1, "category": "focus", "tip_id": "t"},
                  {"flag": 1.0, "category": "focus", "tip_id": "t"}]
    one = [model.predict_one(x) for x in candidates]
    assert one[0] > 0.8 and one[1] < 0.2
    assert model.predict_many(candidates) == pytest.approx(one, abs=1e-12)
    assert model.predict_many(candidates[1:]) == pytest.approx(one[1:], abs=1e-12)


def test_fast_path_matches_the_river_pipeline(trained: TipModel) -> None:
    # On features the model has seen (River's FM would draw random latents for unseen ones).
    for x, _ in _daypart_stream(20, seed=5):
        assert trained.predict_one(x) == pytest.approx(trained.pipeline.predict_proba_one(x)[True], abs=1e-12)


def test_prediction_cost_does_not_grow_with_the_number_of_tips() -> None:
    # River's OneHotEncoder emits a zero for every category ever seen unless drop_zeros is set.
    model = TipModel()
    for i in range(200):
        model.learn_one({"tip_id": f"tip-{i}", "category": f"c{i % 10}", "hour_of_day": 9}, 1.0)
    x = {"tip_id": "tip-3", "category": "c3", "hour_of_day": 9}
    expected = {"hour_of_day", "tip_id_tip-3", "category_c3", "category*hour_of_day=c3*6-11"}
    assert set(model._features(x, model.interactions._plan0)) == expected
    assert set(model.pipeline.transform_one(x)) == expected


def test_fast_fm_learns_exactly_like_rivers_fm() -> None:
    rng = random.Random(1)
    ours = _FastFMClassifier(n_factors=4, weight_optimizer=optim.SGD(0.05), latent_optimizer=optim.SGD(0.05),
                             l2_weight=0.001, l2_latent=0.001, seed=3)
    river = facto.FMClassifier(n_factors=4, weight_optimizer=optim.SGD(0.05), latent_optimizer=optim.SGD(0.05),
                               l2_weight=0.001, l2_latent=0.001, seed=3)
    for _ in range(300):
        x = {"a": rng.gauss(0, 1), f"tip_{rng.randrange(5)}": 1.0, f"cat_{rng.randrange(3)}": 1.0}
        y, w = rng.random() < 0.5, rng.choice((1.0, 0.8, 0.3))
        ours.learn_one(x, y, w=w)
        river.learn_one(x, y, w=w)
    probe = {"a": 0.5, "tip_1": 1.0, "cat_2": 1.0}
    assert ours.predict_proba_one(probe)[True] == pytest.approx(river.predict_proba_one(probe)[True], abs=1e-9)


@pytest.mark.parametrize("latents", ["categorical", "all"])
def test_a_river_clone_of_the_fm_pairs_what_the_fm_pairs(latents: str) -> None:
    # River clones an estimator from its constructor's parameters: set afterwards, which features
    # get a latent vector was lost, and a clone (of the classifier, or of the pipeline) paired the
    # crosses too, as River's FM does.
    model = TipModel(kind="fm", latents=latents)
    x = {"tip_id_a": 1.0, "category_focus": 1.0, "category*hour_of_day=focus*6-11": 1.0}
    for clone in (model.classifier.clone(), list(model.pipeline.clone().steps.values())[-1]):
        assert isinstance(clone, _FastFMClassifier)
        assert clone.categorical_only == model.classifier.categorical_only == (latents == "categorical")
        for _ in range(3):
            clone.learn_one(x, True)
        assert ("category*hour_of_day=focus*6-11" in clone.latents) == (latents == "all")
        assert {"tip_id_a", "category_focus"} <= set(clone.latents)


def test_feature_names_and_inputs_for_the_card() -> None:
    model = TipModel(interactions=[("category", "hour_of_day")])
    model.learn_one({"tip_id": "t", "category": "c", "hour_of_day": 9, "completion_rate_7d": 0.5, "gone": None}, 1.0)
    assert model.feature_names == ["category", "completion_rate_7d", "hour_of_day", "tip_id"]
    inputs = model.describe_inputs()
    assert inputs["tip_id"] == "categorical, one-hot"
    assert inputs["hour_of_day"] == "numeric, standard-scaled"
    assert inputs["category*hour_of_day"] == "interaction, one-hot; hour_of_day in 6-hour buckets"
    assert TipModel().describe_inputs() == {}  # nothing seen, no cross fired
    fm = TipModel(kind="fm", n_factors=4, interactions=[("category", "hour_of_day")])
    fm.learn_one({"tip_id": "t", "category": "c", "hour_of_day": 9}, 1.0)
    assert fm.describe_inputs() == {
        "category": "categorical, one-hot, 4-factor latent vectors", "hour_of_day": "numeric, standard-scaled",
        "tip_id": "categorical, one-hot, 4-factor latent vectors",
        "category*hour_of_day": "interaction, one-hot; hour_of_day in 6-hour buckets"}


@pytest.mark.parametrize("kind", KINDS)
def test_the_card_names_an_interaction_no_example_formed(kind: str) -> None:
    """A pair naming an input no example had ("hour" for "hour_of_day") was registered without a word, and
    the card's inputs left it out as if it had not been asked for (h120 registered [["tip_id", "bogus"]])."""
    params = {"n_factors": 4, "latents": "all"} if kind == "fm" else {}
    model = TipModel(kind=kind, interactions=[("tip_id", "hour_of_day"), ("tip_id", "hour"), ("hr", "cat")], **params)
    assert model.describe_inputs() == {}  # nothing learned: nothing to tell
    model.learn_one({"tip_id": "t", "hour_of_day": 9}, 1.0)
    inputs = model.describe_inputs()
    assert inputs["tip_id*hour_of_day"].startswith("interaction, one-hot; hour_of_day in 6-hour buckets")
    assert inputs["tip_id*hour"] == "interaction, never formed: no input 'hour' in what it learned"
    assert inputs["hr*cat"] == "interaction, never formed: no input 'hr' or 'cat' in what it learned"


@pytest.mark.parametrize("kind", KINDS)
def test_predicting_never_changes_the_model(kind: str) -> None:
    # /score reads the model while the learner writes it; a prediction must not write.
    model = _trained(kind, n=200)
    before = model.to_bytes()
    unseen = [{"tip_id": f"tip-new-{i}", "category": "new", "user_id": "u-new", "novel": 3.0} for i in range(5)]
    model.predict_many(unseen, shared=_user(3))
    model.predict_many([{**_user(4), **x} for x in unseen])
    model.predict_one(unseen[0])
    assert model.to_bytes() == before


# -- PopularityPrior ----------------------------------------------------------------------


def test_prior_means_and_counts() -> None:
    prior = PopularityPrior(strength=2.0)
    assert prior.mean("anything") == 0.5 and prior.count("anything") == 0
    for _ in range(30):
        prior.update("good", 1.0)
        prior.update("bad", 0.0)
    prior.update("bad", 0.3)
    assert prior.count("bad") == 31
    assert prior.mean("good") > 0.9 and prior.mean("bad") < 0.1
    # A tip never seen gets the global mean reward.
    assert prior.mean("new") == pytest.approx(prior.base_rate) == pytest.approx(31.3 / 63)
    a, b = prior.alpha_beta("good")
    assert a + b == pytest.approx(2.0 + 30)


def test_prior_samples_are_deterministic_and_centred() -> None:
    prior = PopularityPrior()
    for r in (1.0, 0.8, 0.0, 1.0, 0.3):
        prior.update("t", r)
    draws = [prior.sample("t", random.Random(s)) for s in range(2000)]
    assert prior.sample("t", random.Random(5)) == draws[5]
    assert sum(draws) / len(draws) == pytest.approx(prior.mean("t"), abs=0.02)


def test_blend_moves_from_prior_to_model_with_observations() -> None:
    prior = PopularityPrior(tip_k=20.0, user_k=5.0)
    assert prior.blend("new-tip", 0.9) == prior.mean("new-tip")  # no observations: prior only
    for _ in range(20):
        prior.update("t", 0.0)
    assert prior.model_weight("t") == pytest.approx(0.5)
    assert prior.blend("t", 0.9) == pytest.approx(0.5 * 0.9 + 0.5 * prior.mean("t"))
    assert prior.blend("t", 0.9, user_observations=0) == prior.mean("t")  # a new user
    assert prior.model_weight("t", user_observations=5) == pytest.approx(0.25)
    for _ in range(2000):
        prior.update("t", 0.0)
    assert prior.blend("t", 0.9, user_observations=1000) == pytest.approx(0.9, abs=0.02)


def test_posterior_for_thompson() -> None:
    prior = PopularityPrior(strength=2.0, max_concentration=50.0)
    a, b = prior.posterior("new")
    assert a + b == pytest.approx(2.0) and a / (a + b) == pytest.approx(0.5)
    for _ in range(500):
        prior.update("old", 1.0)
    a, b = prior.posterior("old", model_score=0.2)
    assert a + b == pytest.approx(50.0)  # capped: a well-known tip is still explored a little
    assert a / (a + b) == pytest.approx(prior.blend("old", 0.2))


def test_thompson_samples_line_up_with_candidates() -> None:
    prior = PopularityPrior(max_concentration=1000.0)
    for _ in range(100):
        prior.update("known", 1.0)
    samples = prior.thompson_samples(["known", "new"], [0.9, 0.9])
    (a_known, a_new), (b_known, b_new) = samples["alpha"], samples["beta"]
    assert a_known + b_known == pytest.approx(102.0) and a_new + b_new == pytest.approx(2.0)
    # Without a model score, a new tip's posterior is the global base rate with weight `strength`.
    m = prior.base_rate
    assert prior.thompson_samples(["new"]) == {"alpha": [pytest.approx(2 * m)], "beta": [pytest.approx(2 * (1 - m))]}
    with pytest.raises(ValueError):
        prior.thompson_samples(["a"], [0.1, 0.2])


def test_prior_snapshot_round_trip() -> None:
    prior = PopularityPrior(tip_k=7.0)
    for i in range(50):
        prior.update(f"t{i % 3}", (i % 5) / 4)
    copy = PopularityPrior.from_bytes(prior.to_bytes())
    assert copy.params == prior.params
    assert [copy.mean(f"t{i}") for i in range(4)] == [prior.mean(f"t{i}") for i in range(4)]
    assert prior.clone().count("t0") == 0
    with pytest.raises(ValueError, match="reward"):
        prior.update("t0", 2.0)


# -- offline metrics ----------------------------------------------------------------------


def test_progressive_validation_predicts_before_learning() -> None:
    model = TipModel()
    records: list = []
    stream = list(_daypart_stream(2000))
    report = progressive_validation(model, stream, records=records)
    assert report["n"] == 2000 == len(records) == model.n_learned
    assert records[0][2] == 0.5  # the first prediction came from an untrained model
    assert report["roc_auc"] > 0.75
    assert report["mean_reward"] == pytest.approx(sum(r for _, r in stream) / len(stream))
    # Worse than always predicting the mean would mean the model learned nothing.
    m = report["mean_reward"]
    baseline = -sum(r * math.log(m) + (1 - r) * math.log(1 - m) for _, r in stream) / len(stream)
    assert report["log_loss"] < baseline - 0.05
    # Binned (ECE): 0.064 here, as AdaGrad at 0.5 trades a little calibration for speed (docs/learning.md).
    assert report["calibration_error"] < 0.1


def test_progressive_validation_of_a_single_class_has_no_auc() -> None:
    report = progressive_validation(TipModel(), [({"tip_id": "a"}, 1.0)] * 10)
    assert report["roc_auc"] is None and report["mean_reward"] == 1.0


def test_fairness_check_finds_the_segment_served_worse() -> None:
    rng = random.Random(2)
    records = []
    for _ in range(2000):
        new = rng.random() < 0.3
        reward = float(rng.random() < 0.5)
        # Informative scores for established users, noise for new ones.
        score = rng.random() if new else min(max(reward * 0.6 + 0.2 + rng.gauss(0, 0.1), 0.0), 1.0)
        records.append(({"seconds_since_active": 9e6 if new else 60.0}, reward, score))
    records += [({"is_new_user": False, "seconds_since_active": 9e6}, 1.0, 0.9)] * 5
    report = fairness_check(records, tenure_segment, min_n=30)
    seg = report["segments"]
    assert seg["established"]["roc_auc"] > 0.9 and 0.4 < seg["new"]["roc_auc"] < 0.6
    assert report["max_gap"]["roc_auc"] == pytest.approx(seg["established"]["roc_auc"] - seg["new"]["roc_auc"])
    assert report["worst"]["roc_auc"] == "new" and report["worst"]["log_loss"] == "new"
    assert sum(s["n"] for s in seg.values()) == 2005


def test_fairness_gaps_ignore_small_segments() -> None:
    records = [({"utc_offset_min": -300}, 1.0, 0.9), ({"utc_offset_min": -300}, 0.0, 0.1)] * 20
    records += [({"utc_offset_min": 540}, 1.0, 0.1), ({"utc_offset_min": 540}, 0.0, 0.9)]
    report = fairness_check(records, timezone_segment, min_n=30)
    assert report["compared"] == ["americas"]
    assert report["max_gap"]["roc_auc"] is None
    assert report["segments"]["apac"]["n"] == 2


def test_a_segment_with_few_of_one_class_is_left_out_of_the_auc_gap() -> None:
    rng = random.Random(3)
    records = []
    for i in range(400):  # americas and emea: both classes, informative scores
        acted = float(i % 2)
        offset = -300 if i < 200 else 60
        records.append(({"utc_offset_min": offset}, acted, min(max(0.3 + 0.4 * acted + rng.gauss(0, 0.15), 0.0), 1.0)))
    # apac: 30 records (past min_n), one positive, scored below every negative: its AUC reads 0.
    records += [({"utc_offset_min": 540}, 0.0, 0.5)] * 29 + [({"utc_offset_min": 540}, 1.0, 0.1)]
    report = fairness_check(records, timezone_segment, min_n=30)
    assert report["worst"]["roc_auc"] != "apac" and report["max_gap"]["roc_auc"] < 0.1
    apac = report["segments"]["apac"]
    assert (apac["n"], apac["positives"], apac["roc_auc"]) == (30, 1, 0.0), "reported as it is"
    assert report["compared"] == ["americas", "apac", "emea"], "its other metrics still count"
    assert report["min_class"] == validation.MIN_CLASS_N == 10
    assert report["auc_left_out"] == {"apac": "1 positive and 29 negatives: ROC AUC needs 10 of each"}
    assert report["worst"]["log_loss"] == "apac", "log loss needs no class count"
    # Ten of each is enough.
    records += [({"utc_offset_min": 540}, 1.0, 0.1)] * 9
    report = fairness_check(records, timezone_segment, min_n=30)
    assert report["auc_left_out"] == {} and report["worst"]["roc_auc"] == "apac"


def test_segment_functions() -> None:
    assert tenure_segment({"is_new_user": 1}) == "new"
    assert tenure_segment({"is_new_user": False, "seconds_since_active": 9e9}) == "established"
    assert tenure_segment({}) == "new"
    assert tenure_segment({"seconds_since_active": 3600.0}) == "established"
    assert [timezone_segment({"utc_offset_min": m}) for m in (-480, -240, 0, 120, 330, 540)] == [
        "americas", "americas", "emea", "emea", "apac", "apac"]
    # The edges: St. John's in summer and Nuuk are America, the Azores Europe, Hawaii America, Niue the Pacific.
    assert [timezone_segment({"utc_offset_min": m}) for m in (-150, -120, -60, -600, -660, 780)] == [
        "americas", "americas", "emea", "americas", "apac", "apac"]


TASTE_CATEGORIES = ["focus", "planning", "breaks", "batching", "review"]


def _taste_reactions(model: TipModel, rng: random.Random, user: str, liked: set[str], rounds: int) -> None:
    for _ in range(rounds):
        for category in TASTE_CATEGORIES:
            x = {"user_id": user, "category": category, "tip_id": f"tip-{category}-{rng.randrange(4)}",
                 "hour_of_day": rng.randrange(24), "tasks_created_7d": rng.randrange(30)}
            model.learn_one(x, 1.0 if category in liked else 0.0)


def _newcomers_learned(model: TipModel, rng: random.Random) -> int:
    """20 new users arrive one by one, each liking 2 of 5 categories and reacting 3 times to
    each: how many have both liked categories ranked first right after."""
    learned = 0
    for k in range(20):
        liked = set(rng.sample(TASTE_CATEGORIES, 2))
        _taste_reactions(model, rng, f"new-{k}", liked, rounds=3)
        learned += _ranked_first(model, f"new-{k}", liked)
    return learned


def _ranked_first(model: TipModel, user: str, liked: set[str]) -> bool:
    """Whether `user`'s liked categories all score above the others."""
    scores = {c: model.predict_one({"user_id": user, "category": c, "tip_id": f"tip-{c}-0",
                                    "hour_of_day": 10, "tasks_created_7d": 12}) for c in TASTE_CATEGORIES}
    return min(scores[c] for c in liked) > max(scores[c] for c in TASTE_CATEGORIES if c not in liked)


def test_the_default_model_learns_new_users_tastes_from_a_few_reactions() -> None:
    """After 40 users with their own tastes, 20 newcomers arrive one by one, each reacting 3
    times to each category (liking 2 of 5). The per-feature steps move a newcomer's own weights
    far enough to rank both liked categories first for at least 15 of them (17 here; one
    SGD step for all, 0.1, managed 5-11 over eight seeds)."""
    rng = random.Random(1)
    model = TipModel()
    for u in range(40):
        _taste_reactions(model, rng, f"u-{u}", set(rng.sample(TASTE_CATEGORIES, 2)), rounds=4)
    assert _newcomers_learned(model, rng) >= 15


def _changed_tastes_learned(model: TipModel, rng: random.Random) -> int:
    """20 users react 10 times to each category (liking 2 of 5), then come to like two others
    instead and react 8 more times to each: how many have both new favourites ranked first."""
    learned = 0
    for u in range(20):
        old = set(rng.sample(TASTE_CATEGORIES, 2))
        _taste_reactions(model, rng, f"u-{u}", old, rounds=10)
        new = set(rng.sample(sorted(set(TASTE_CATEGORIES) - old), 2))
        _taste_reactions(model, rng, f"u-{u}", new, rounds=8)
        learned += _ranked_first(model, f"u-{u}", new)
    return learned


def test_a_changed_taste_is_learned_again_sooner_when_a_users_step_history_fades() -> None:
    """Forgetting part of AdaGrad's sums for a user's own features at each reaction keeps their
    steps from shrinking for good. Three populations: 46 of 60 changed tastes learned, against 38
    when nothing is forgotten (each population did better)."""
    forgetting = sum(_changed_tastes_learned(TipModel(), random.Random(seed)) for seed in range(3))
    sticky = sum(_changed_tastes_learned(TipModel(user_forgetting=0.0), random.Random(seed)) for seed in range(3))
    assert forgetting >= sticky + 5, (forgetting, sticky)


@pytest.mark.parametrize("kind", KINDS)
def test_only_a_users_own_step_history_fades(kind: str) -> None:
    """The shared features (tip, category, hour, their crosses) keep their whole AdaGrad sums:
    forgetting those too made every user's model noisy (bench/quality.py)."""
    model = TipModel(kind=kind, user_forgetting=0.5)
    x = {"user_id": "u", "category": "focus", "tip_id": "tip-focus-0", "hour_of_day": 9}
    model.learn_one(x, 1.0)
    clf = model.classifier
    g2 = (clf.weight_optimizer if kind == "fm" else clf.optimizer).g2
    before = dict(g2)
    model._forget_user_steps("u", x)
    own = {"user_id_u", "user_id*category=u*focus"}
    assert own <= set(before)
    assert {j: g2[j] for j in own} == {j: before[j] * 0.5 for j in own}
    assert {j: g2[j] for j in before if j not in own} == {j: v for j, v in before.items() if j not in own}


def test_a_snapshot_from_before_optimizers_existed_keeps_learning_with_sgd() -> None:
    model = TipModel(optimizer="sgd")
    del model.params["optimizer"]  # as such a snapshot was written
    restored = TipModel.from_bytes(model.to_bytes())
    assert restored.params["optimizer"] == "sgd"
    assert type(restored.clone().classifier.optimizer) is optim.SGD


def test_the_fm_pairs_only_categorical_inputs_and_learns_new_users_tastes() -> None:
    """Latent vectors for the user, the tip and its category; numerics and crosses stay linear.
    The same newcomers as the logistic regression's test: 19 of 20 learned here; River's FM over
    every feature managed 14 with SGD at 0.1 (the old default) and 6 with AdaGrad."""
    rng = random.Random(1)
    model = TipModel(kind="fm")
    for u in range(40):
        _taste_reactions(model, rng, f"u-{u}", set(rng.sample(TASTE_CATEGORIES, 2)), rounds=4)
    latents = model.classifier.latents
    assert "user_id_u-0" in latents and "category_focus" in latents and "tip_id_tip-focus-0" in latents
    assert not [name for name in latents if "=" in name or name in ("hour_of_day", "tasks_created_7d")]
    assert model.classifier.linear_only == {"hour_of_day", "tasks_created_7d"}
    assert _newcomers_learned(model, rng) >= 15


def test_an_fm_snapshot_from_before_categorical_latents_keeps_pairing_every_feature() -> None:
    model = TipModel(kind="fm", latents="all", optimizer="sgd")
    model.learn_one({"user_id": "u", "category": "focus", "hour_of_day": 9}, 1.0)
    for name in ("optimizer", "latents", "user_forgetting"):
        del model.params[name]  # as such a snapshot was written
    restored = TipModel.from_bytes(model.to_bytes())
    assert restored.params["latents"] == "all" and not restored.classifier.categorical_only
    assert restored.params["user_forgetting"] == 0.0
    assert "hour_of_day" in restored.classifier.latents
    x = {"user_id": "u", "category": "focus", "hour_of_day": 9}
    assert restored.predict_one(x) == pytest.approx(model.predict_one(x), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_copy_serialises_as_the_model_did_when_it_was_taken(kind: str) -> None:
    """The learner takes `frozen()` on the event loop and serialises it elsewhere, later."""
    rng = random.Random(3)
    model = TipModel(kind=kind)
    for u in range(30):
        _taste_reactions(model, rng, f"u-{u}", set(rng.sample(TASTE_CATEGORIES, 2)), rounds=2)
    at_freeze = model.to_bytes()
    frozen = model.frozen()
    _taste_reactions(model, rng, "late", {"focus", "review"}, rounds=2)  # new users, new weights, new latents
    assert frozen.to_bytes() == at_freeze
    assert model.to_bytes() != at_freeze
    assert frozen.n_learned == model.n_learned - 10


def test_a_frozen_fm_serialises_the_same_whatever_the_string_hash_seed() -> None:
    """A copied set may iterate in another order than its original; with these hash seeds the
    FM's set of numeric inputs did, and the frozen copy's bytes differed from the model's."""
    check = ("import random\n"
             "from tests.unit.test_models_reward import _taste_reactions, TASTE_CATEGORIES\n"
             "from models.reward import TipModel\n"
             "rng, model = random.Random(3), TipModel(kind='fm')\n"
             "for u in range(30):\n"
             "    _taste_reactions(model, rng, f'u-{u}', set(rng.sample(TASTE_CATEGORIES, 2)), rounds=2)\n"
             "assert model.frozen().to_bytes() == model.to_bytes()\n")
    for seed in ("55", "78"):
        done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-500:]


def test_an_fm_example_without_categorical_inputs_learns_its_weights_and_no_latents() -> None:
    model = TipModel(kind="fm")
    model.learn_one({"user_id": "u", "category": "focus", "hour_of_day": 9}, 1.0)
    before = {name: vector.copy() for name, vector in model.classifier.latents.items()}
    hour_weight = model.classifier.weights["hour_of_day"]
    model.learn_one({"hour_of_day": 14, "open_tasks": 3}, 0.0)
    latents = model.classifier.latents
    assert set(latents) == set(before) == {"user_id_u", "category_focus"}
    assert all(np.array_equal(latents[name], before[name]) for name in before)
    assert model.classifier.weights["hour_of_day"] != hour_weight


def test_an_input_seen_as_text_before_it_is_a_number_is_numeric_too() -> None:
    """An input first learned as a string was recorded as categorical for good: its later numbers
    got FM latent vectors (the pairing of scaled numerics the FM leaves out) and the card said
    "categorical". Seen the other way round it was numeric; the order decided."""
    for first in ("long", 30.0):
        model = TipModel(kind="fm")
        for value in (first, 30.0, "long", 40.0):
            model.learn_one({"user_id": "u", "tip_id": "a", "len": value}, 1.0 if value == 30.0 else 0.0)
        assert model.classifier.linear_only == {"len"}, first
        assert "len" not in model.classifier.latents and "len_long" in model.classifier.latents, first
        assert model.describe_inputs()["len"] == "numeric, standard-scaled", first


def _probes() -> list[dict]:
    return [{"tip_id": "a", "user_id": "u1", "len": 30.0}, {"tip_id": "c", "user_id": "u9", "category": "focus"}]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e160, -1e308, 10**400],
                         ids=["nan", "inf", "-inf", "1e160", "-1e308", "10**400"])
def test_an_example_with_a_non_finite_or_huge_number_is_skipped_and_counted(kind: str, value: float) -> None:
    model = TipModel(kind=kind)
    for _ in range(5):
        model.learn_one({"tip_id": "a", "user_id": "u1", "category": "focus", "len": 30.0}, 1.0)
    twin = TipModel.from_bytes(model.to_bytes())
    before = [model.predict_one(x) for x in _probes()]
    # One caller's huge number, then any ordinary example: before, both made every prediction NaN.
    model.learn_one({"tip_id": "a", "user_id": "u2", "len": value, "big": value}, 1.0)
    assert (model.n_learned, model.n_skipped) == (5, 1)
    assert [model.predict_one(x) for x in _probes()] == before
    assert "big" not in model.feature_names  # nothing of the example was kept
    for m in (model, twin):
        m.learn_one({"tip_id": "b", "user_id": "u3", "len": 31.0}, 0.0)
    assert (model.n_learned, model.n_skipped) == (6, 1)
    after = [model.predict_one(x) for x in _probes()]
    assert all(math.isfinite(p) for p in after)
    assert after == [twin.predict_one(x) for x in _probes()]  # as if the bad example had never come


@pytest.mark.parametrize("kind", KINDS)
def test_a_snapshot_from_before_the_cross_plan_changed_shape_predicts_and_learns(kind: str) -> None:
    """Snapshots written before 8640a09 hold `Interactions._plan0` as (prefix, a, None, b, None):
    unpickled as they were, every prediction and every learn_one raised a TypeError."""
    model = _trained(kind, n=200)
    old = TipModel.from_bytes(model.to_bytes())
    old.interactions._plan0 = [(f"{a}*{b}=", a, None, b, None) for a, b in old.interactions.pairs]
    restored = TipModel.from_bytes(old.to_bytes())
    user = {**_user(9), "user_id": "u-1"}
    candidates = [{"tip_id": f"tip-{c}-1", "category": c} for c in CATEGORIES]
    expected = [model.predict_one({**user, **c}) for c in candidates]
    assert [restored.predict_one({**user, **c}) for c in candidates] == expected
    assert restored.predict_many(candidates, shared=user) == pytest.approx(expected, abs=1e-12)
    for m in (model, restored):
        m.learn_one({**user, **candidates[0]}, 1.0)
    assert [restored.predict_one({**user, **c}) for c in candidates] == [model.predict_one({**user, **c}) for c in candidates]


def test_a_snapshot_from_before_skipping_existed_counts_from_zero() -> None:
    model = TipModel()
    del model.__dict__["n_skipped"]  # as unpickled from an older snapshot
    old = TipModel.from_bytes(model.to_bytes())
    assert old.n_skipped == 0
    old.learn_one({"tip_id": "a", "len": math.inf}, 1.0)
    assert (old.n_learned, old.n_skipped) == (0, 1)


def test_calibration_error_is_binned_not_the_gap_between_means() -> None:
    # Confident and wrong both ways: the means agree (0.5 and 0.5), the scores never do.
    records = [({"seconds_since_active": 60.0}, 0.0, 0.9), ({"seconds_since_active": 60.0}, 1.0, 0.1)] * 20
    report = fairness_check(records, tenure_segment, min_n=1)["segments"]["established"]
    assert report["calibration_error"] == pytest.approx(0.9)
    # By hand, 10 equal-width bins weighed by their share: 0.12 (reward 0, 0) and 0.18 (1) share a bin,
    # 0.7 (1) has its own: 3/4 * |0.14 - 1/3| + 1/4 * |0.7 - 1| = 0.145 + 0.075.
    records = [({}, 0.0, 0.12), ({}, 0.0, 0.12), ({}, 1.0, 0.18), ({}, 1.0, 0.7)]
    report = fairness_check(records, tenure_segment, min_n=1)["segments"]["new"]
    assert report["calibration_error"] == pytest.approx(0.22)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bool_crossed_with_a_category_tells_true_from_false(kind: str) -> None:
    # New users like focus tips, established ones breaks tips. As an hour, True and False were
    # both the bucket 0-5: the cross fired alike for both and the model stayed near 0.5 for all four.
    model = TipModel(kind=kind, interactions=[["is_new_user", "category"]])
    rng = random.Random(5)
    for _ in range(3000):
        new, category = rng.random() < 0.5, rng.choice(("focus", "breaks"))
        model.learn_one({"is_new_user": new, "category": category, "tip_id": "t"},
                        float(rng.random() < (0.9 if new == (category == "focus") else 0.1)))
    for new in (True, False):
        liked, other = ("focus", "breaks") if new else ("breaks", "focus")
        x = {"is_new_user": new, "tip_id": "t"}
        assert model.predict_one({**x, "category": liked}) > 0.8
        assert model.predict_one({**x, "category": other}) < 0.2
        many = model.predict_many([{"tip_id": "t", "category": liked}, {"tip_id": "t", "category": other}],
                                  shared={"is_new_user": new})
        assert many == pytest.approx([model.predict_one({**x, "category": c}) for c in (liked, other)], abs=1e-12)
        assert model.predict_one({**x, "category": liked}) == pytest.approx(
            model.pipeline.predict_proba_one({**x, "category": liked})[True], abs=1e-12)
    assert model.describe_inputs()["is_new_user*category"] == "interaction, one-hot"  # not "in 6-hour buckets"
    restored = TipModel.from_bytes(model.to_bytes())
    assert restored.describe_inputs() == model.describe_inputs()


def _weights(model: TipModel) -> dict:
    return model.classifier.weights if model.params["kind"] == "fm" else model.classifier._weights


@pytest.mark.parametrize("kind", KINDS)
def test_input_names_a_caller_makes_up_are_bounded(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate's features are named by the caller: each new name learned cost every model a
    weight, AdaGrad's sum and the scaler's moments for good (10-15 KB a reward with 32 new names)."""
    monkeypatch.setattr(reward, "MAX_INPUTS", 20)
    model = TipModel(kind=kind)
    shared = {"user_id": "u-1", "tip_id": "a", "category": "focus", "hour_of_day": 9}
    for i in range(50):
        model.learn_one({**shared, f"len_{i}": float(i), f"flag_{i}": True, f"kind_{i}": "x"}, 1.0, 1_000 * i)
    assert len(model.feature_names) == 20
    assert len(model.scaler.means) <= 20 and len(model._moments) <= 20
    assert model.n_refused == 150 - (20 - 4)  # 4 names of `shared`, then 16 made-up ones fitted
    assert model.n_learned == 50  # the rest of each example was learned
    assert len(_weights(model)) < 40
    known = model.predict_one(shared)
    model.learn_one({**shared, "len_49": 1e3}, 1.0, 60_000)  # left out: the example is learned without it
    assert model.predict_one(shared) > known
    assert model.predict_one({**shared, "len_49": 1e3}) == model.predict_one(shared)


@pytest.mark.parametrize("kind", KINDS)
def test_text_values_shared_by_users_are_bounded_and_user_ids_are_not_counted(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tip ids, categories and a candidate's text features are the caller's too: every new value
    learned stayed in every model for good (1.4-2 KB a reward for a new tip, category and text)."""
    model = TipModel(kind=kind, max_values=30)
    for i in range(200):
        model.learn_one({"user_id": f"u-{i}", "tip_id": f"tip-{i}", "category": f"cat-{i % 100}",
                         "label": f"text-{i}", "hour_of_day": i % 24}, float(i % 2), 1_000 * i)
    assert model.n_values == 30
    assert model.n_refused == 3 * 200 - 30 - 10  # cat-0 to cat-9, held from the first ten, come back
    held = {name for name in _weights(model) if not name.startswith("user_id")}
    # The 30 values, each with its crosses with hour_of_day buckets: nothing past them.
    assert len({n for n in held if "*" not in n and "=" not in n and n != "hour_of_day"}) == 30
    assert len(held) <= 30 * 5 + 1
    assert model.users_held == 200  # every user learned, their own one-hot kept (forgotten by the TTL)
    again = TipModel.from_bytes(model.to_bytes())
    assert (again.n_values, again.n_refused) == (30, model.n_refused)
    again.learn_one({"user_id": "u-0", "tip_id": "tip-0", "category": "cat-0"}, 1.0, 300_000)
    assert again.n_values == 30  # values held are learned again without counting twice


def test_max_values_is_the_version_s_own_and_0_is_no_bound() -> None:
    """A catalogue that turns its tips over for good (generated tips, an id each) reaches the
    default in time: its operator registers a version with more, or none."""
    unbounded = TipModel(max_values=0)
    for i in range(50):
        unbounded.learn_one({"tip_id": f"tip-{i}"}, 1.0)
    assert (unbounded.n_values, unbounded.n_refused) == (50, 0)
    assert TipModel().params["max_values"] == reward.DEFAULT_MAX_VALUES
    assert TipModel(max_values=7).clone().params["max_values"] == 7
    assert TipModel(max_values=7.0).params["max_values"] == 7  # as JSON may write it
    for bad in (-1, "many", 0.5):  # 0.5 cut to 0 would be no bound at all
        with pytest.raises(ValueError, match="max_values"):
            TipModel(max_values=bad)
    legacy = ModelVersion("v1", "logreg", {"learning_rate": 0.1}, [])  # registered before the bound
    assert TipModel(**legacy.model_params).params["max_values"] == 0


@pytest.mark.parametrize("name", ["n_factors", "seed", "hour_bucket"])
def test_a_whole_number_parameter_with_a_fraction_is_refused_by_name(name: str) -> None:
    assert TipModel(**{name: 3.0}).params[name] == 3
    with pytest.raises(ValueError, match=f"{name} must be a whole number, got 2.5"):
        TipModel(**{name: 2.5})


def test_a_snapshot_from_before_the_bounds_counts_from_zero() -> None:
    model = TipModel()
    model.learn_one({"tip_id": "a"}, 1.0)
    for name in ("n_values", "n_refused"):
        del model.__dict__[name]  # as unpickled from an older snapshot
    old = TipModel.from_bytes(model.to_bytes())
    assert (old.n_values, old.n_refused) == (0, 0)
    old.learn_one({"tip_id": "b"}, 1.0)
    assert (old.n_values, old.n_refused) == (1, 0)


def test_the_prior_keeps_the_tips_rewarded_most_recently(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tip id rewarded stayed in the prior for good (~200 bytes each): a client making up
    tip ids grew it with every reward."""
    monkeypatch.setattr(prior_module, "PRIOR_MAX_TIPS", 3)
    prior = PopularityPrior()
    for tip in ("a", "b", "c", "a", "d"):
        prior.update(tip, 1.0)
    assert len(prior._tips) == 3
    assert (prior.count("a"), prior.count("b"), prior.count("c"), prior.count("d")) == (2.0, 0.0, 1.0, 1.0)
    assert prior.mean("b") == prior.mean("never-seen")  # gone: a new tip again, at the base rate
    assert prior.base_rate == 6 / 7  # every reward still counts in the base rate
    again = PopularityPrior.from_bytes(prior.to_bytes())
    for p in (prior, again):
        p.update("e", 0.0)
    assert list(again._tips) == list(prior._tips) == ["a", "d", "e"]
    for tip in (f"t-{i}" for i in range(1_000)):
        prior.update(tip, 0.5)
    assert len(prior._tips) == 3


def test_a_prior_from_before_the_bound_keeps_its_tips_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    prior = PopularityPrior()
    for tip in ("a", "b", "c"):
        prior.update(tip, 1.0)
    prior._tips = dict(prior._tips)  # as pickled before the bound
    old = PopularityPrior.from_bytes(prior.to_bytes())
    monkeypatch.setattr(prior_module, "PRIOR_MAX_TIPS", 3)
    old.update("a", 0.0)
    old.update("d", 0.0)
    assert list(old._tips) == ["c", "a", "d"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("cls", [TipModel, PopularityPrior])
def test_a_snapshot_naming_anything_else_is_refused_without_running_it(tmp_path, cls):
    # A row of model_versions or learner_state is loaded at every start: stock pickle ran whatever it named.
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    blob = snapshot.MAGIC[cls.__name__] + pickle.dumps(payload)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        cls.from_bytes(blob)
    assert not marker.exists()


def _named_globals(blob: bytes) -> set[tuple[str, str]]:
    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    magic = next(m for m in snapshot.MAGIC.values() if blob.startswith(m))
    Recorder(__import__("io").BytesIO(blob[len(magic):])).load()
    return named


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("optimizer", reward.OPTIMIZERS)
@pytest.mark.parametrize("latents", ["categorical", "all"])
@pytest.mark.parametrize("ttl", [0.0, 30.0])
def test_every_model_shape_loads_through_the_snapshot_allowlist(kind, optimizer, latents, ttl):
    model = TipModel(kind=kind, optimizer=optimizer, latents=latents, user_ttl_days=ttl)
    snapshots = [model.to_bytes()]
    rng = random.Random(3)
    for i in range(40):
        model.learn_one({"user_id": f"u{i % 7}", "tip_id": f"t{i % 5}", "category": CATEGORIES[i % 3],
                         "hour_of_day": i % 24, "completion_rate_7d": rng.random(), "flag": bool(i % 2)},
                        float(i % 2), at_ms=1_764_000_000_000 + i * 1000)
    snapshots.append(model.to_bytes())
    prior = PopularityPrior()
    for i in range(10):
        prior.update(f"t{i % 3}", float(i % 2))
    snapshots.append(prior.to_bytes())
    for blob in snapshots:
        assert _named_globals(blob) <= snapshot.ALLOWED_GLOBALS
    loaded = TipModel.from_bytes(snapshots[1])
    x = {"user_id": "u1", "tip_id": "t1", "category": "focus", "hour_of_day": 3}
    assert loaded.predict_one(x) == model.predict_one(x)
    assert PopularityPrior.from_bytes(snapshots[2]).to_bytes() == snapshots[2]

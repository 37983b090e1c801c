"""Reward models: P(positive reaction) for a (user features, tip) pair, learned online.

`TipModel` wraps a River pipeline::

    numeric  -> preprocessing.StandardScaler  ┐
    strings  -> preprocessing.OneHotEncoder   ├─> LogisticRegression (kind="logreg")
    interaction features (category x hour...) ┘   or facto.FMClassifier (kind="fm"; latent
                                                  vectors for the string inputs only)

Both learn their weights with AdaGrad by default (`optimizer`): a user's own features are
seen rarely and need steps of their own (docs/learning.md, "How fast a user's taste is learned").
Those steps forget part of their history with each of the user's reactions (`user_forgetting`),
so a taste that changes is learned again as a new one is ("When a taste changes").

The River objects hold all the state (and are what `to_bytes` pickles), but prediction
runs on a hand-written fast path over the same objects: River's generic `compose` machinery
costs several times more than the arithmetic, and `/score` has a budget of a couple of
milliseconds for up to 100 candidates. A unit test checks the fast path against
`TipModel.pipeline.predict_proba_one`.

Rewards are in [0, 1] (`DEFAULT_REWARDS`): a reaction with reward r is learned as a soft
label, one step of the log loss's gradient (p - r) x (`models.losses.SoftLog`); by the
factorisation machine, as a positive of weight r and a negative of weight 1 - r (`soft_labels`).

Its parts have modules of their own: the crosses (models.interactions), the factorisation
machine (models.factorization) and the snapshot format (models.snapshot). The popularity
prior /score blends with it for new tips and users is models.prior.

>>> model = TipModel(learning_rate=0.1)
>>> for _ in range(200):
...     model.learn_one({"hour_of_day": 8, "tip_id": "tip-focus-1", "category": "focus"}, 1.0)
...     model.learn_one({"hour_of_day": 8, "tip_id": "tip-breaks-1", "category": "breaks"}, 0.0)
>>> round(model.predict_one({"hour_of_day": 8, "tip_id": "tip-focus-1", "category": "focus"}), 2)
0.98
>>> [round(p, 2) for p in model.predict_many([
...     {"hour_of_day": 8, "tip_id": "tip-focus-1", "category": "focus"},
...     {"hour_of_day": 8, "tip_id": "tip-breaks-1", "category": "breaks"}])]
[0.98, 0.02]
"""

from __future__ import annotations

import copy
import importlib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from river import compose, linear_model, optim, preprocessing

from models import snapshot
from models.factorization import _FastFMClassifier
from models.interactions import DEFAULT_INTERACTIONS, CrossPlan, Interactions, checked_pairs
from models.losses import SoftLog
from models.registry import LEGACY_PARAMS
from models.user_expiry import DAY_MS, UserExpiry

DEFAULT_REWARDS: dict[str, float] = {
    "acted": 1.0, "liked": 0.8, "snoozed": 0.3, "dismissed": 0.0, "disliked": 0.0,
}
KINDS = ("logreg", "fm")
OPTIMIZERS = ("adagrad", "sgd")
# Per-coordinate steps (AdaGrad) learn a new user's taste from a handful of reactions: the
# `user_id x category` weights are each seen rarely, and a global SGD step small enough for
# the common features moves them too slowly (docs/learning.md, "How fast a user's taste is
# learned"; bench/quality.py).
DEFAULT_OPTIMIZER = "adagrad"
DEFAULT_LEARNING_RATE = {"adagrad": 0.5, "sgd": 0.1}
# With each of a user's reactions, AdaGrad forgets this share of its squared-gradient sums for
# that user's own features. Their steps then stop shrinking, and a taste that changes is learned
# again as fast as a new one. The shared features keep the whole sums: forgetting those made the
# model noisy (docs/learning.md, "When a taste changes").
DEFAULT_USER_FORGETTING = 0.3
# A user's own weights go once they have not reacted for this long (log time; `UserExpiry`):
# three times the fold's 30-day horizon, past which the popularity prior already counts them as
# new (`PopularityPrior.model_weight`), so a user back after a long break keeps their taste.
DEFAULT_USER_TTL_DAYS = 90.0
# The span of the times an event may hold (0001-01-01 to 9999-12-31): a longer TTL forgets nobody, as
# 0 does, and 1e308 days overflowed to an infinity of milliseconds (a registration's bare 500).
MAX_USER_TTL_DAYS = 3_652_059
USER_INPUT = "user_id"
# The largest magnitude a numeric input may have; /score refuses more, and `learn_one` skips it.
# Far above any real feature (`seconds_since_active` tops out at 30 days, 2.6e6 s), and far below
# where the scaler's squared deviations overflow (~1e154): one such example made every weight NaN.
INPUT_BOUND_TEXT = "1e9"  # as error messages write it
INPUT_BOUND = float(INPUT_BOUND_TEXT)


def within_bounds(x: Mapping[str, Any]) -> bool:
    """Whether every number of `x` is within `INPUT_BOUND`: `TipModel.learn_one` skips an example
    that has one beyond it (or NaN), and a card's progressive validation leaves it out too.

    >>> within_bounds({"tip_id": "a", "len": 1e9, "new": True}), within_bounds({"len": -1e10})
    (True, False)
    """
    for v in x.values():
        if (type(v) is float or type(v) is int) and not -INPUT_BOUND <= v <= INPUT_BOUND:
            return False
    return True


# What a model learns that no user owns never leaves it: a weight (and AdaGrad's sum, the
# scaler's moments, an FM latent vector) per input name, and per value of a text input (a tip id,
# a category, a candidate's own text feature) with its crosses. Callers name both: a candidate
# has up to 32 features of any name and text values of any kind, and another publisher's
# decision more, so a client that reacted to candidates with new names or values grew every
# model by 10-15 KB (32 new names) or 1.4-2 KB (a new tip, category and text value) a reward, for
# good. Past these bounds a model leaves a new name, or a new value, out of the examples it
# learns (`n_refused`): the rest of the example is learned, and scoring gives the input nothing,
# as for one never seen. `user_id` values are not counted: they go with their user (`user_ttl_days`).
# The values' bound is a parameter (`max_values`): a catalogue that turns its tips over for good
# (generated tips, each an id of its own) reaches it in time, and its operator may want more.
MAX_INPUTS = 1_000
DEFAULT_MAX_VALUES = 100_000
# What a JSON answer (orjson) and PostgreSQL's bigint hold: max_values 1e300 was registered, then its
# registration's answer and every read of the version (GET /models/{version}) were a bare 500.
MAX_MAX_VALUES = 2**63 - 1
_MISSING = object()
# Over all cross plans; for a tip id and a category ~0.7 KB each traced, ~0.9 KB resident (measured
# under /score load with new tips: a full cache took 70-95 MB of RSS a model, then emptied).
CANDIDATE_CACHE_ENTRIES = 100_000
# ... and their inputs and features, all entries together. A candidate's own text features are the
# caller's (up to 32, of 128 characters), and an entry of such a candidate took 16.5 KB: 100,000
# of them 1.65 GB a model (the champion's and the shadow's each), from /score requests alone. An
# item takes ~85 bytes for a tip id and a category (6 items an entry), ~235 for those: 50-140 MB.
CANDIDATE_CACHE_ITEMS = 600_000

def _sigmoid(z: float) -> float:
    # Always a float and never an OverflowError (River's sigmoid returns the ints 0 and 1 past |z| > 30).
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def check_reward(reward: float) -> float:
    reward = float(reward)
    if not 0.0 <= reward <= 1.0:  # also rejects NaN
        raise ValueError(f"reward must be in [0, 1], got {reward!r}")
    return reward


def _expiry(params: Mapping[str, Any]) -> UserExpiry | None:
    days = params["user_ttl_days"]
    return UserExpiry(max(1, round(days * DAY_MS))) if days > 0 else None


def _user_plan(interactions: Interactions) -> CrossPlan:
    """The crosses that have `user_id` as a member: features the user alone fires."""
    return [step for step in interactions._plan0 if USER_INPUT in (step[1], step[3])]


MAX_FACTORS = 256  # a mistyped 10**8 would have asked for 800 MB of latent vector per user and tip


# How the card names an interaction none of the learned examples could form (`TipModel.describe_inputs`).
NEVER_FORMED = "interaction, never formed"


class TipModel:
    """Online P(positive | user features, tip) as a River pipeline.

    Parameters
    ----------
    kind
        "logreg" (logistic regression) or "fm" (factorisation machine: learns user x tip
        interactions through latent vectors; see `latents`).
    optimizer
        How the weights learn: "adagrad" (a step per feature, shrinking as the feature is
        seen; the default) or "sgd" (one step for all).
    learning_rate
        The optimizer's step (default 0.5 for AdaGrad, 0.1 for SGD); the FM latents take
        an SGD step of this size.
    l2
        L2 penalty on the weights (and the FM latents).
    intercept_lr
        SGD step for the intercept.
    n_factors, seed
        FM only: latent dimensionality and the seed of their random initialisation.
    latents
        FM only: which features get a latent vector: "categorical" (the one-hots of string
        inputs, such as the user, the tip and its category; the default) or "all" (River's FM).
    user_forgetting
        AdaGrad only: the share of a user's own features' squared-gradient sums (the `user_id`
        one-hot and its crosses) forgotten with each of that user's reactions, in [0, 1).
    user_ttl_days
        A user's own features (weights, AdaGrad sums, FM latents) are dropped once the user's
        last reaction is this many days older than the newest one learned, in log time (the
        `at_ms` given to `learn_one`); 0 keeps them for good. See `models.user_expiry`.
    max_values
        The most values of text inputs other than `user_id` (tip ids, categories, a candidate's
        text features) the model learns weights for; new ones past it are left out of what it
        learns (`n_refused`). 0: no bound.
    hour_bucket
        Hours per bucket for the hour members of `interactions`.
    interactions
        Feature pairs crossed into one-hot features (see `DEFAULT_INTERACTIONS`).

    Inputs are flat dicts: `str` values are categorical (one-hot, River's `name_value`
    naming), numbers and bools are numeric (standard-scaled), `None` means missing.
    Learn through `learn_one` only: it keeps the fast path's copy of the scaler's moments,
    and skips (`n_skipped`) an example whose numbers would make the weights NaN.

    >>> model = TipModel(kind="fm", n_factors=4, seed=1)
    >>> model.params["kind"], model.clone().params == model.params
    ('fm', True)
    """

    n_skipped = 0  # snapshots from before skipping existed have none of their own
    # Text values held (`max_values`), and inputs left out past the bounds; snapshots from before
    # the bounds count from their first learn_one since.
    n_values = 0
    n_refused = 0
    # Whether a soft reward (0 < r < 1) is learned in one step, as a soft label (`learn_one`). Snapshots
    # from before learned one as two weighted binary steps, and go on doing so: a model keeps the rule it
    # was trained with (tests/unit/test_stored_snapshots.py), as a version keeps its parameters.
    # The factorisation machine keeps two steps too. At its learning rate, 0.5 (its latent vectors' SGD
    # step as well), one step earned 0.610 in the last sixth of `bench/quality.py --set model_kind=fm
    # --seeds 10` against 0.640: the negative's gradient, taken at the weights the positive had moved,
    # damped its steps. At 0.35 one step earned 0.639, and two 0.641 (docs/learning.md, "The learner").
    soft_labels = False

    def __init__(
        self,
        *,
        kind: str = "logreg",
        optimizer: str | None = None,
        learning_rate: float | None = None,
        l2: float = 0.0,
        intercept_lr: float = 0.01,
        n_factors: int = 8,
        seed: int = 0,
        latents: str = "categorical",
        user_forgetting: float = DEFAULT_USER_FORGETTING,
        user_ttl_days: float = DEFAULT_USER_TTL_DAYS,
        max_values: int = DEFAULT_MAX_VALUES,
        hour_bucket: int = 6,
        interactions: Iterable[Sequence[str]] = DEFAULT_INTERACTIONS,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        optimizer = optimizer or DEFAULT_OPTIMIZER
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
        learning_rate = DEFAULT_LEARNING_RATE[optimizer] if learning_rate is None else learning_rate
        for name, value in (("learning_rate", learning_rate), ("l2", l2), ("intercept_lr", intercept_lr),
                            ("n_factors", n_factors), ("seed", seed), ("user_forgetting", user_forgetting),
                            ("user_ttl_days", user_ttl_days), ("max_values", max_values), ("hour_bucket", hour_bucket)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # '"fast" > 0' says nothing useful
                raise ValueError(f"{name} must be a number, got {value!r}")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer past a float's range: raised here, out of the API a bare 500
                raise ValueError(f"{name} must be a finite number, got one past what a float holds "
                                 "(about 1.8e308)") from None
            if not finite:  # int(inf) was an OverflowError; a NaN rate, a model of NaNs
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name, value in (("n_factors", n_factors), ("seed", seed), ("max_values", max_values),
                            ("hour_bucket", hour_bucket)):
            if value != int(value):  # cut, max_values 0.5 was 0: no bound at all
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        # Checked here, not at the first learn_one: FM's random generator takes only these seeds,
        # and a version that cannot learn must not be registered.
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed must be between 0 and 2**32 - 1, got {seed!r}")
        if not 1 <= int(n_factors) <= MAX_FACTORS:  # each user, tip and category gets this many floats
            raise ValueError(f"n_factors must be from 1 to {MAX_FACTORS}, got {n_factors!r}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        for name, value in (("l2", l2), ("intercept_lr", intercept_lr), ("user_ttl_days", user_ttl_days)):
            if value < 0:  # a negative penalty grows every weight; a negative step climbs the loss
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if user_ttl_days > MAX_USER_TTL_DAYS:
            raise ValueError(f"user_ttl_days must be at most {MAX_USER_TTL_DAYS:,} (the span of the times an event may "
                             f"hold; 0 keeps every user for good), got {user_ttl_days!r}")
        if not 0 <= max_values <= MAX_MAX_VALUES:
            raise ValueError(f"max_values must be from 0 (no bound) to 2**63 - 1, got {max_values!r}")
        if latents not in ("categorical", "all"):
            raise ValueError(f"latents must be 'categorical' or 'all'; got {latents!r}")
        if not 0.0 <= user_forgetting < 1.0:
            raise ValueError(f"user_forgetting must be in [0, 1), got {user_forgetting!r}")
        if not 1 <= int(hour_bucket) <= 24:
            raise ValueError(f"hour_bucket must be between 1 and 24 hours, got {hour_bucket!r}")
        pairs = checked_pairs(interactions)
        if not pairs:  # River's clone() reads an empty tuple parameter's first item: an IndexError
            raise ValueError("interactions must list at least one pair of inputs, e.g. [[\"category\", \"hour_of_day\"]]")
        # River style: the constructor arguments are the model's identity; clone() rebuilds from them.
        self.params: dict[str, Any] = {
            "kind": kind, "optimizer": optimizer, "learning_rate": float(learning_rate), "l2": float(l2),
            "intercept_lr": float(intercept_lr), "n_factors": int(n_factors), "seed": int(seed),
            "latents": latents, "user_forgetting": float(user_forgetting), "user_ttl_days": float(user_ttl_days),
            "max_values": int(max_values), "hour_bucket": int(hour_bucket), "interactions": pairs,
        }
        weight_optimizer = optim.AdaGrad(learning_rate) if optimizer == "adagrad" else optim.SGD(learning_rate)
        if kind == "logreg":
            classifier: Any = linear_model.LogisticRegression(
                optimizer=weight_optimizer, loss=SoftLog(), l2=l2, intercept_lr=intercept_lr
            )
        else:
            classifier = _FastFMClassifier(
                n_factors=n_factors, weight_optimizer=weight_optimizer,
                latent_optimizer=optim.SGD(learning_rate), loss=SoftLog(), l2_weight=l2, l2_latent=l2,
                intercept_lr=intercept_lr, seed=seed, categorical_only=latents == "categorical",
            )
        # drop_zeros: without it River emits a 0 for every category ever seen, so each
        # prediction would cost O(number of tips) instead of O(1).
        self.pipeline = compose.Pipeline(
            compose.TransformerUnion(
                ("numeric", compose.Pipeline(compose.SelectType(numbers.Number), preprocessing.StandardScaler())),
                ("categorical", compose.Pipeline(compose.SelectType(str), preprocessing.OneHotEncoder(drop_zeros=True))),
                ("interactions", Interactions(pairs, int(hour_bucket))),
            ),
            classifier,
        )
        # Composition may copy steps, so the fast path takes its references from the pipeline.
        union = self.pipeline.steps["TransformerUnion"]
        self.scaler: preprocessing.StandardScaler = union["numeric"]["StandardScaler"]
        self.interactions: Interactions = union["interactions"]
        self.classifier = list(self.pipeline.steps.values())[-1]
        self._fm = kind == "fm"
        self.soft_labels = not self._fm
        # name -> (mean, std) of the scaler, refreshed by learn_one: one lookup per feature when predicting.
        self._moments: dict[str, tuple[float, float]] = {}
        self.n_learned = 0
        self.n_skipped = 0
        self.n_values = 0
        self.n_refused = 0
        self._inputs: dict[str, str] = {}  # input name -> "numeric" | "categorical", as seen in learn_one
        self._flags: set[str] = set()  # the numeric inputs first seen as a bool (crossed as "true"/"false")
        if self._fm and latents == "categorical":
            self.classifier.linear_only = set()  # the numeric inputs, added as learn_one meets them
        # fixed cross plan -> candidate's items -> its features (see `_candidate_features`)
        self._candidate_cache: dict[tuple[Any, ...], dict[tuple[Any, ...], dict[str, float]]] = {}
        self._candidate_items = [0]  # inputs and features its entries hold (`CANDIDATE_CACHE_ITEMS`)
        self._user_plan = _user_plan(self.interactions)
        self._expiry = _expiry(self.params)

    # -- identity ---------------------------------------------------------------------------

    def clone(self, **changes: Any) -> TipModel:
        """A fresh, untrained model with the same parameters (River's `clone`)."""
        return TipModel(**{**self.params, **changes})

    def __repr__(self) -> str:
        return f"TipModel({', '.join(f'{k}={v!r}' for k, v in self.params.items())}, n_learned={self.n_learned})"

    @property
    def diverged(self) -> bool:
        """Whether learning overflowed the weights: a step too large for them (a learning rate
        of 1e308, say) makes a prediction NaN, and its NaN gradient reaches the intercept, which
        every example updates; from then on the model scores NaN for everyone.

        >>> model = TipModel(learning_rate=1e308)
        >>> for reward in (0.0, 1.0):
        ...     model.learn_one({"tip_id": "a", "hour_of_day": 3}, reward)
        >>> model.diverged, TipModel().diverged
        (True, False)
        """
        return not math.isfinite(self.classifier.intercept)

    @property
    def feature_names(self) -> list[str]:
        """Input names seen while learning, sorted."""
        return sorted(self._inputs)

    def describe_inputs(self) -> dict[str, str]:
        """How each input is used, for the model card."""
        out = {
            name: "numeric, standard-scaled" if use == "numeric" else "categorical, one-hot"
            for name, use in sorted(self._inputs.items())
        }
        never: dict[str, str] = {}
        for a, b in self.interactions.pairs:
            if a in self._inputs and b in self._inputs:  # only the crosses that have fired
                hours = [m for m in (a, b) if self._inputs[m] == "numeric" and m not in self._flags]
                bucketed = f"; {', '.join(hours)} in {self.interactions.hour_bucket}-hour buckets" if hours else ""
                out[f"{a}*{b}"] = f"interaction, one-hot{bucketed}"
            elif self._inputs:
                # Said, once it has learned: a pair naming an input no example had (a typo, "hour" for
                # "hour_of_day") was registered without a word, and left out of the card as if not asked for.
                missing = " or ".join(repr(m) for m in (a, b) if m not in self._inputs)
                never[f"{a}*{b}"] = f"{NEVER_FORMED}: no input {missing} in what it learned"
        if self._fm:  # what the pairwise term sees (`latents`)
            every = self.params["latents"] == "all"
            for name in out:
                if every or self._inputs.get(name) == "categorical":
                    out[name] += f", {self.params['n_factors']}-factor latent vectors"
        return out | never

    # -- features ---------------------------------------------------------------------------

    def _features(self, x: Mapping[str, Any], plan: CrossPlan) -> dict[str, float]:
        """The classifier's input: scaled numerics, one-hot strings, crosses (as the pipeline);
        `plan` is `Interactions._plan0`, or the per-candidate part of `Interactions.plan`."""
        moments = self._moments
        out: dict[str, float] = {}
        for k, v in x.items():
            if type(v) is str:
                out[f"{k}_{v}"] = 1.0
            elif v is None:
                continue
            elif type(v) is float or type(v) is int or isinstance(v, numbers.Real):
                # StandardScaler.transform_one: (x - mean) / std, 0 for a constant or unseen feature.
                ms = moments.get(k)
                out[k] = (v - ms[0]) / ms[1] if ms is not None and ms[1] else 0.0
            elif isinstance(v, str):
                out[f"{k}_{v}"] = 1.0
            else:
                raise TypeError(f"feature {k!r} must be a number, a string or None; got {type(v).__name__}")
        self.interactions.cross(x, plan, out)
        return out

    def _logit(self, t: dict[str, float]) -> float:
        clf = self.classifier
        if not self._fm:
            return clf._weights.dot(t) + clf.intercept
        weights, latents = clf.weights, clf.latents
        linear = clf.intercept + sum(weights.get(j, 0.0) * xj for j, xj in t.items())
        # .get: an unseen feature has no latent yet; River's own predict would draw a random one.
        has_latent = clf.has_latent
        rows = [(v, t[j]) for j in t if has_latent(j) and (v := latents.get(j)) is not None]
        if not rows:
            return linear
        vx = np.array([v for v, _ in rows]) * np.array([xj for _, xj in rows])[:, None]
        total = vx.sum(axis=0)
        return linear + 0.5 * float(total @ total - (vx * vx).sum())

    def _candidate_features(self, fixed: CrossPlan, text: CrossPlan) -> Callable[[Mapping[str, Any]], dict[str, float]]:
        """`_features(x, fixed + text)` for one request's candidates (`Interactions.plan`).

        A candidate whose inputs are all text (a tip id, a category) has the same one-hots and
        `fixed` crosses for every user in the same hour buckets: they are cached, here per
        `fixed` plan, and only the `text` crosses (the user's id) are built per request.
        Building them took ~2 us a candidate, most of a 10-candidate `predict_many`. Numeric
        inputs are not cached: their scaling moves as the model learns. The features depend on
        nothing else, so entries never go stale; the cache is only bounded. Callers must not
        change the dicts returned.
        """
        caches, held = self._candidate_cache, self._candidate_items
        # One bound over every plan (hour buckets x preferred-hour buckets: a few dozen of them);
        # a request adds at most its candidates past it.
        if held[0] >= CANDIDATE_CACHE_ITEMS or sum(map(len, caches.values())) >= CANDIDATE_CACHE_ENTRIES:
            caches.clear()
            held[0] = 0
        plan_key = tuple(fixed)
        cache = caches.get(plan_key)
        if cache is None:
            cache = caches[plan_key] = {}
        compute, cross, both = self._features, self.interactions.cross, fixed + text

        def features(x: Mapping[str, Any]) -> dict[str, float]:
            key = tuple(x.items())
            try:
                part = cache.get(key)
            except TypeError:  # an unhashable value: _features names the problem
                return compute(x, both)
            if part is None:
                if not all(type(v) is str or v is None for v in x.values()):
                    return compute(x, both)
                part = cache[key] = compute(x, fixed)
                held[0] += len(key) + len(part)
            if not text:
                return part
            t = part.copy()
            cross(x, text, t)
            return t

        return features

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_candidate_cache", None)  # derived, and no part of a snapshot
        state.pop("_candidate_items", None)
        state.pop("_user_plan", None)
        state["_flags"] = sorted(self._flags)  # a set iterates by string hash: bytes must not depend on it
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        loss = self.classifier.loss
        if type(loss) is optim.losses.Log:  # as snapshots store the `SoftLog`, and as older ones hold River's
            self.classifier.loss = SoftLog(loss.weight_pos, loss.weight_neg)
        self._flags = set(state.get("_flags", ()))  # none in snapshots from before bools were told apart
        self.params = self.params | {k: v for k, v in LEGACY_PARAMS.items() if k not in self.params}
        self._candidate_cache = {}
        self._candidate_items = [0]
        self._user_plan = _user_plan(self.interactions)
        if "_expiry" not in state:  # a snapshot from before users were forgotten (its params say 0 days)
            self._expiry = _expiry(self.params)

    # -- predict / learn --------------------------------------------------------------------

    def predict_one(self, x: Mapping[str, Any]) -> float:
        """P(positive) in [0, 1]."""
        return _sigmoid(self._logit(self._features(x, self.interactions._plan0)))

    def predict_many(self, xs: Sequence[Mapping[str, Any]], shared: Mapping[str, Any] | None = None) -> list[float]:
        """`predict_one` for each candidate, computing the part common to all of them once.

        `shared` (optional) holds the user and context features; each `xs[i]` is overlaid on
        it (the candidate's value wins). Without `shared`, the items equal in every `xs[i]`
        (and of one type: True == 1, but a cross labels True "true" and 1 an hour) are found and
        computed once. Results equal `predict_one` up to float rounding.
        """
        if not xs:
            return []
        if shared is None:
            if len(xs) == 1:
                return [self.predict_one(xs[0])]
            first, rest = xs[0], xs[1:]
            shared = {}
            for k, v in first.items():
                for x in rest:
                    other = x.get(k, _MISSING)
                    if other != v or type(other) is not type(v):
                        break
                else:
                    shared[k] = v
            if shared:
                xs = [{k: v for k, v in x.items() if k not in shared} for x in xs]
        elif not shared.keys().isdisjoint(set().union(*xs)):
            return [self.predict_one({**shared, **x}) for x in xs]
        once, fixed, text = self.interactions.plan(shared)
        base_t = self._features(shared, once)
        sigmoid = _sigmoid
        clf = self.classifier
        features = self._candidate_features(fixed, text)
        if not self._fm:
            weights = clf._weights
            base_logit = weights.dot(base_t) + clf.intercept
            return [sigmoid(base_logit + weights.dot(features(x))) for x in xs]
        # FM: the shared linear term and the shared sums of the pairwise term, then all the
        # candidates' latent rows in one matrix.
        w, latents = clf.weights, clf.latents
        n = len(xs)
        lin0 = clf.intercept + sum(w.get(j, 0.0) * xj for j, xj in base_t.items())
        has_latent = clf.has_latent
        base_rows = [(v, base_t[j]) for j in base_t if has_latent(j) and (v := latents.get(j)) is not None]
        total0, sq0 = np.zeros(clf.n_factors), 0.0
        if base_rows:
            vx0 = np.array([v for v, _ in base_rows]) * np.array([xj for _, xj in base_rows])[:, None]
            total0, sq0 = vx0.sum(axis=0), float((vx0 * vx0).sum())
        lins, rows, vals, owners = [], [], [], []
        w_get, lat_get = w.get, latents.get
        for c, x in enumerate(xs):
            lin = lin0
            for j, xj in features(x).items():
                lin += w_get(j, 0.0) * xj
                v = lat_get(j) if has_latent(j) else None
                if v is not None:
                    rows.append(v)
                    vals.append(xj)
                    owners.append(c)
            lins.append(lin)
        totals = np.zeros((n, clf.n_factors))
        squares = np.zeros(n)
        if rows:
            vx = np.array(rows) * np.array(vals)[:, None]
            np.add.at(totals, owners, vx)
            np.add.at(squares, owners, (vx * vx).sum(axis=1))
        totals += total0
        logits = np.array(lins) + 0.5 * ((totals * totals).sum(axis=1) - (squares + sq0))
        return [sigmoid(z) for z in logits.tolist()]

    def learn_one(self, x: Mapping[str, Any], reward: float, at_ms: int | None = None) -> None:
        """Learn `reward` as a soft label: one step of the log loss's gradient, (p - reward) x
        (two weighted binary steps for the factorisation machine; `soft_labels`).

        `at_ms`: when the reward reached the log (ms since the epoch). It moves the model's time,
        which forgets users who stopped reacting (`user_ttl_days`); without it, the user's own
        features are not recorded for forgetting.

        The classifiers' loss is `SoftLog`: River's log loss takes a bool, and its gradient for a
        label 0 < y < 1 is 0. Two weighted binary steps (a positive of weight r, then a negative of
        weight 1 - r), as the factorisation machine and models trained before still learn one
        (`soft_labels`), cost two passes, added two squared gradients to AdaGrad's sums where one
        step adds (p - r)^2 x^2, and took the second gradient at weights the first had moved.

        An example with a number that is not finite or beyond `INPUT_BOUND` changes nothing and
        counts in `n_skipped`: learning it would make the weights NaN, and with them every later
        prediction, for every user. Decisions logged before /score refused such numbers may
        still carry them. (Bounded inputs keep the weights finite: AdaGrad's step is at most the
        learning rate, and the scaler's squares stay far from overflowing.)
        """
        reward = check_reward(reward)
        numeric = {}
        inputs, moments = self._inputs, self._moments
        weights = self.classifier.weights if self._fm else self.classifier._weights
        unseen: list[tuple[str, str]] = []  # recorded only once the example is known to be learned
        new_values: list[str] = []  # text inputs with a value no weight holds yet (`max_values`)
        for k, v in x.items():
            tv = type(v)
            if tv is str or (tv is not float and tv is not int and isinstance(v, str)):
                if k not in inputs:
                    unseen.append((k, "categorical"))
                if k != USER_INPUT and f"{k}_{v}" not in weights:
                    new_values.append(k)
            elif v is not None:
                # exact type checks first: the ABC check costs ~1 us per feature
                if tv is not float and tv is not int and not isinstance(v, numbers.Real):
                    raise TypeError(f"feature {k!r} must be a number, a string or None; got {type(v).__name__}")
                if not -INPUT_BOUND <= v <= INPUT_BOUND:  # NaN fails it too
                    self.n_skipped += 1
                    return
                numeric[k] = v
                # Not `inputs`: an input seen as text first is numeric too from its first number
                # (`moments` holds every input ever learned as one), or the FM would pair it.
                if k not in moments:
                    unseen.append((k, "numeric"))
        if new_values or unseen:
            x, numeric, unseen = self._bounded(x, numeric, unseen, new_values)
        # As in a River pipeline, the unsupervised scaler learns x before transforming it. It
        # learns once, however many weighted steps the classifier takes.
        self.scaler.learn_one(numeric)
        means, vars_ = self.scaler.means, self.scaler.vars
        for k in numeric:
            moments[k] = (means[k], vars_[k] ** 0.5)
        for k, use in unseen:
            inputs[k] = use
            if use == "numeric" and type(x[k]) is bool:
                self._flags.add(k)
            if use == "numeric" and self._fm and self.classifier.categorical_only:
                self.classifier.linear_only.add(k)
        user = x.get(USER_INPUT)
        if isinstance(user, str):
            if self._expiry is not None and at_ms is not None:
                # Before learning: a user back after the TTL must be taught as a new one, from
                # nothing of their own.
                gone = self._expiry.touch(user, self._user_tags(x), at_ms)
                if gone:
                    self._drop_features([name for u, tags in gone for name in self._user_feature_names(u, tags)])
            self._forget_user_steps(user, x)
        t = self._features(x, self.interactions._plan0)
        if self.soft_labels or reward == 0.0 or reward == 1.0:
            self.classifier.learn_one(t, reward)
        else:  # the FM, or a model trained before soft labels (`soft_labels`)
            self.classifier.learn_one(t, True, w=reward)
            self.classifier.learn_one(t, False, w=1.0 - reward)
        self.n_learned += 1

    def _bounded(self, x: Mapping[str, Any], numeric: dict[str, Any], unseen: list[tuple[str, str]],
                 new_values: list[str]) -> tuple[Mapping[str, Any], dict[str, Any], list[tuple[str, str]]]:
        """`x` without the new input names past `MAX_INPUTS` and the new text values past
        `max_values` (counted in `n_refused`); the values kept are counted in `n_values`.

        >>> model = TipModel(max_values=100)
        >>> model.n_values = 99
        >>> model.learn_one({"tip_id": "a", "category": "focus"}, 1.0)
        >>> model.n_values, model.n_refused, sorted(model.classifier._weights)
        (100, 1, ['tip_id_a'])
        """
        inputs, max_values = self._inputs, self.params["max_values"]
        refused: set[str] = set()
        names = len(inputs)
        for k, _ in unseen:
            if k in inputs:  # a text input's first number: not a new name
                continue
            if names < MAX_INPUTS:
                names += 1
            else:
                refused.add(k)
        kept = 0
        for k in new_values:
            if k in refused:
                continue
            if self.n_values + kept < max_values or not max_values:
                kept += 1
            else:
                refused.add(k)
        self.n_values += kept
        if not refused:
            return x, numeric, unseen
        self.n_refused += len(refused)
        return ({k: v for k, v in x.items() if k not in refused}, {k: v for k, v in numeric.items() if k not in refused},
                [(k, use) for k, use in unseen if k not in refused])

    def _own_features(self, user: str, x: Mapping[str, Any]) -> dict[str, float]:
        """The features of `x` only `user` fires: its `user_id` one-hot and crosses."""
        own = {f"{USER_INPUT}_{user}": 1.0}  # the one-hot, named as `_features` names it
        self.interactions.cross(x, self._user_plan, own)
        return own

    def _user_tags(self, x: Mapping[str, Any]) -> list[tuple[int, str | None]]:
        """What names the user's crosses in `x`, for `UserExpiry`: (its step in `_user_plan`, the
        other member's label) each, None for a pair of `user_id` with itself. Labels repeat across
        users (categories, hours), so the index holds each once, where whole names held the user's
        id again in each (~600 bytes a user)."""
        tags = []
        for step, (_, a, _, b, _) in enumerate(self._user_plan):
            other = b if a == USER_INPUT else a
            if other == USER_INPUT:
                tags.append((step, None))
                continue
            value = x.get(other)
            if value is not None:
                tags.append((step, self.interactions.label(value)))
        return tags

    def _user_feature_names(self, user: str, tags: Iterable[Any]) -> list[str]:
        """The names of `user`'s own features that `tags` (`_user_tags`) stand for, as `cross` names them.

        >>> model = TipModel()
        >>> x = {"user_id": "u-1", "category": "focus", "tip_id": "t"}
        >>> model._user_feature_names("u-1", model._user_tags(x)) == list(model._own_features("u-1", x))
        True
        """
        names = [f"{USER_INPUT}_{user}"]
        plan = self._user_plan
        for step, label in tags:
            head, a, separator, b, tail = plan[step]
            names.append(head + (user if a == USER_INPUT else label) + separator
                         + (user if b == USER_INPUT else label) + tail)
        return names

    def _forget_user_steps(self, user: str, x: Mapping[str, Any]) -> None:
        """AdaGrad's sums for `user`'s own features in `x` (`_own_features`: its `user_id`
        one-hot and crosses) keep `1 - user_forgetting` of themselves, before this reaction's
        gradient adds to them: G <- (1 - f) G + g^2.

        >>> x = {"user_id": "u", "category": "focus"}
        >>> for m in (TipModel(), TipModel(user_forgetting=0.0)):
        ...     for i in range(30):
        ...         m.learn_one(x, 1.0 if i % 3 else 0.0)  # the user likes two focus tips in three
        ...     for _ in range(5):
        ...         m.learn_one(x, 0.0)  # and then none
        ...     print(round(m.predict_one(x), 2))
        0.18
        0.38
        """
        keep = 1.0 - self.params["user_forgetting"]
        clf = self.classifier
        g2 = getattr(clf.weight_optimizer if self._fm else clf.optimizer, "g2", None)
        if keep == 1.0 or g2 is None:  # SGD keeps no sums
            return
        for j in self._own_features(user, x):
            if j in g2:
                g2[j] *= keep

    def _tables(self) -> list[Any]:
        """The per-feature tables: weights (and FM latents), and AdaGrad's sums."""
        clf = self.classifier
        tables: list[Any] = [clf._weights] if not self._fm else [clf.weights, clf.latents]
        for optimizer in (getattr(clf, "optimizer", None), getattr(clf, "weight_optimizer", None)):
            if getattr(optimizer, "g2", None) is not None:
                tables.append(optimizer.g2)
        return tables

    def _drop_features(self, names: list[str]) -> None:
        """Forget the features of users who left (`UserExpiry`): a returning one starts anew."""
        for table in self._tables():
            for name in names:
                table.pop(name, None)

    def forget_user(self, user: str) -> int:
        """Drop what only `user` taught the model: their own features' weights, AdaGrad sums and FM
        latents (`_own_features`), as when they leave (`user_ttl_days`); how many features went. What
        every user shares (the intercept, the tips' and categories' weights, the scaler) keeps what
        they taught it, as a rebuild without them would not, exactly: it is no one's alone.

        >>> model = TipModel()
        >>> for user in ("u-1", "u-10"):
        ...     for _ in range(20):
        ...         model.learn_one({"user_id": user, "category": "focus", "tip_id": "t"}, 1.0, at_ms=0)
        >>> x = lambda user: {"user_id": user, "category": "focus", "tip_id": "t"}
        >>> kept = model.predict_one(x("u-10"))
        >>> model.forget_user("u-1"), model.forget_user("u-1")
        (2, 0)
        >>> model.predict_one(x("u-1")) == model.predict_one(x("someone new")), model.predict_one(x("u-10")) == kept
        (True, True)
        """
        tags = self._expiry.forget(user) if self._expiry is not None else None
        # Their tags are known only to a model that forgets users and learned them with a time; any
        # other looks its tables over for the names their features have.
        names = self._user_feature_names(user, tags) if tags is not None else self._names_of(user)
        dropped = set()
        for table in self._tables():
            for name in names:
                if table.pop(name, None) is not None:
                    dropped.add(name)
        return len(dropped)

    def _names_of(self, user: str) -> list[str]:
        """The names of `user`'s own features among those the model holds, found by their form (`cross`
        names them): a pass over every feature.

        >>> model = TipModel(user_ttl_days=0)
        >>> model.learn_one({"user_id": "u-1", "category": "focus"}, 1.0)
        >>> model.learn_one({"user_id": "u-10", "category": "focus"}, 1.0)
        >>> sorted(model._names_of("u-1"))
        ['user_id*category=u-1*focus', 'user_id_u-1']
        """
        whole, prefixes, suffixes = {f"{USER_INPUT}_{user}"}, [], []
        for head, a, separator, b, tail in self._user_plan:
            if a == USER_INPUT and b == USER_INPUT:
                whole.add(head + user + separator + user + tail)
            elif a == USER_INPUT:
                prefixes.append((head + user + separator, tail, b, separator))
            else:
                suffixes.append((head, separator + user + tail, a, separator))
        tables = self._tables()

        def value_of(member: str, value: str, separator: str) -> bool:
            # Whether the cross's other part is a value `member` took: its form alone read "u-1*evil"'s
            # cross with "focus" as "u-1"'s with "evil*focus", and forgetting "u-1" dropped it.
            if self._inputs.get(member) == "categorical":
                return any(f"{member}_{value}" in table for table in tables)
            return separator not in value  # an hour's bucket, a flag

        found = set()
        for table in tables:
            for name in table:
                if name in whole or any(
                        name.startswith(p) and name.endswith(t) and len(name) >= len(p) + len(t)
                        and value_of(member, name[len(p):len(name) - len(t)], sep)
                        for p, t, member, sep in prefixes) or any(
                        name.startswith(h) and name.endswith(t) and len(name) >= len(h) + len(t)
                        and value_of(member, name[len(h):len(name) - len(t)], sep)
                        for h, t, member, sep in suffixes):
                    found.add(name)
        return list(found)

    @property
    def candidate_cache_items(self) -> int:
        """Inputs and features the candidate feature cache holds (`CANDIDATE_CACHE_ITEMS` at most)."""
        return self._candidate_items[0]

    @property
    def users_held(self) -> int | None:
        """Users whose own features this model holds and will forget; None when it keeps every
        user (`user_ttl_days` 0) and counts none."""
        return len(self._expiry) if self._expiry is not None else None

    # -- snapshots --------------------------------------------------------------------------

    def frozen(self) -> TipModel:
        """A copy that later learning leaves alone, taken fast enough for the event loop.

        Serialising a model holds the loop for as long as it runs (106-123 ms for 240k weights
        and their AdaGrad sums). This copies the per-feature tables whole, at C speed (17-18 ms
        for the same model), and deep-copies only the small rest, so the bytes can be made
        elsewhere (`to_bytes` of the copy) while this model goes on learning. FM latent vectors
        are shared, not copied: learning replaces them, it never writes into one.

        >>> model = TipModel()
        >>> model.learn_one({"tip_id": "a"}, 1.0)
        >>> copy = model.frozen()
        >>> model.learn_one({"tip_id": "a"}, 1.0)
        >>> copy.n_learned, model.n_learned, copy.predict_one({"tip_id": "a"}) < model.predict_one({"tip_id": "a"})
        (1, 2, True)
        """
        memo: dict[int, Any] = {}
        for table in self._tables():
            clone = copy.copy(table)
            factory = getattr(table, "default_factory", None)
            if factory is not None:  # shared with the classifier's initialiser: the copy shares its copy
                clone.default_factory = memo.setdefault(id(factory), copy.deepcopy(factory, memo))
            memo[id(table)] = clone
        return copy.deepcopy(self, memo)

    def to_bytes(self) -> bytes:
        return snapshot.dumps(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> TipModel:
        """
        >>> m = TipModel(); m.learn_one({"hour_of_day": 9, "tip_id": "t1"}, 0.8)
        >>> TipModel.from_bytes(m.to_bytes()).predict_one({"tip_id": "t1"}) == m.predict_one({"tip_id": "t1"})
        True
        """
        return snapshot.loads(cls, data)


def __getattr__(name: str) -> Any:
    # Snapshots name these here, where release 0.1.0 defined them (`snapshot.STORED_IN_REWARD`).
    home = snapshot.STORED_IN_REWARD.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

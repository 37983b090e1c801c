"""POST /score's work: assemble features, score with the champion (and the shadow), rank.

No I/O here: `app/score_endpoint.py` reads the request, queues the decision for the log and
answers. Steps:
1. The body comes validated (`score_request.parse_request`): any problem was a 422 naming the
   field, and nothing was logged.
2. Profile features of the user from the online store at `now` (the request's `context.now`,
   else the clock): a snapshot reused while no event for the user arrives and no window
   edge has passed, so the values are exact either way (`features.Snapshot`). A `now` so far
   before the user's newest event that a window reaches past what the fold keeps gives that
   feature as a fallback, as for a user without the data.
3. The caller's `profile_features` fill only what the server lacks (a fallback value);
   the server's own values win. Which ones were used is answered and logged.
4. Context features (local hour and weekday in context.now's offset, else the user's newest event's: also for a
   context.now in `Z`, which tells no offset; the task count).
5. The champion scores every candidate; the popularity prior blends in for new users and
   new tips (cold start); the exploration policy orders them and gives propensities.
6. The shadow scores the same inputs; its scores are logged beside the champion's and never
   change the answer (a shadow failure is counted and ignored).
7. The decision (the answer, the features, both models' scores) is built for the log.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from app.decision_ids import new_decision_id
from app.decisions import DECISION_TYPE, candidate_input, encode
from app.learning_metrics import CHAMPION_ERRORS, FEATURE_CACHE, SHADOW_DISAGREEMENTS, SHADOW_ERRORS
from app.lineup import Lineup
from app.score_request import OFFSET_UNKNOWN, ScoreRequest
from models.policy import Greedy, Policy
from models.prior import PopularityPrior
from streams.features import FEATURE_NAMES, FEATURES, Snapshot, context_features, snapshot
from streams.fold import DAY_MS, SIGNAL_KINDS, UserState, to_ms
from streams.log_throttle import LogThrottle
from streams.store import OnlineStore

log = logging.getLogger("tipstream.scoring")

NEW_USER_MS = 7 * DAY_MS
_NO_EVENT_MS = UserState().newest_ms  # the newest time of a state that has folded no event


@dataclass(slots=True)
class Scored:
    decision_id: str
    response: dict[str, Any]
    decision: dict[str, Any]
    payload: bytes


_CACHE_HIT, _CACHE_MISS = FEATURE_CACHE.labels("hit"), FEATURE_CACHE.labels("miss")
_FALLBACKS = {f.name: f.fallback for f in FEATURES}
_ALL_FALLBACK = frozenset(FEATURE_NAMES)
_ZONES: dict[int, timezone] = {}


def _zone(offset_s: int) -> timezone:
    zone = _ZONES.get(offset_s)
    if zone is None:
        zone = _ZONES[offset_s] = timezone(timedelta(seconds=offset_s))
    return zone


_ISO_SECONDS: dict[tuple[int, int], tuple[str, str]] = {}


def _iso(ms: int, offset_s: int) -> str:
    """`ms` in the offset, as `datetime.isoformat(timespec="milliseconds")` writes it.

    The date and time up to the second are formatted once per second and offset: a datetime
    and its isoformat took ~9 us, 5% of /score in-process (py-spy).

    >>> _iso(1_795_694_400_123, 3600), _iso(-1, 0), _iso(1_795_694_400_000, -9000)
    ('2026-11-26T13:00:00.123+01:00', '1969-12-31T23:59:59.999+00:00', '2026-11-26T09:30:00.000-02:30')
    """
    second, milli = divmod(ms, 1000)
    parts = _ISO_SECONDS.get((second, offset_s))
    if parts is None:
        if len(_ISO_SECONDS) >= 1024:  # a second that has passed is rarely asked for again
            _ISO_SECONDS.clear()
        text = datetime.fromtimestamp(second, _zone(offset_s)).isoformat(timespec="seconds")
        parts = _ISO_SECONDS[second, offset_s] = (text[:19], text[19:])
    return f"{parts[0]}.{milli:03d}{parts[1]}"


def blend_many(prior: PopularityPrior, tips: list[str], model_scores: list[float], reactions: int) -> list[float]:
    """`prior.blend(tip, score, reactions)` for every candidate, in one pass.

    Same arithmetic (a unit test holds them equal); reads the prior's per-tip counts directly,
    which saves ~5 us per candidate on the hot path.

    >>> prior = PopularityPrior()
    >>> prior.update("a", 1.0)
    >>> [round(s, 6) for s in blend_many(prior, ["a", "new"], [0.9, 0.9], 3)] == [
    ...     round(prior.blend("a", 0.9, 3), 6), round(prior.blend("new", 0.9, 3), 6)]
    True
    """
    params = prior.params
    strength, tip_k = params["strength"], params["tip_k"]
    base = prior.base_rate
    user_factor = reactions / (reactions + params["user_k"])
    counts = prior._tips
    out = []
    for tip, score in zip(tips, model_scores):
        seen = counts.get(tip)
        if seen is None:
            out.append(base)  # never rewarded: the model's weight is 0, the prior's mean the base rate
            continue
        reward_sum, n = seen
        w = n / (n + tip_k) * user_factor
        out.append(w * score + (1.0 - w) * (strength * base + reward_sum) / (strength + n))
    return out


def _first_signal_ms(state: UserState) -> int | None:
    return min((t for kind in SIGNAL_KINDS if (t := state.first_ms(kind)) is not None), default=None)


@dataclass(slots=True)
class _Cached:
    state: UserState
    marker: tuple[int, int, int, int]
    snapshot: Snapshot
    first_signal_ms: int | None


class Scorer:
    def __init__(self, store: OnlineStore, lineup: Lineup, policy: Policy, rng: random.Random, *,
                 feature_cache_users: int) -> None:
        self.store, self.lineup, self.policy, self.rng = store, lineup, policy, rng
        self.greedy = Greedy()
        self.feature_cache_users = feature_cache_users
        self._cache: OrderedDict[str, _Cached] = OrderedDict()  # LRU; see Learner.cache for why not a dict
        # An entry holds the user's state: one kept for a user the store lets go of (idle) kept the
        # whole state in memory (~8 KB, against the snapshot's ~1.3) until the LRU reached it, which it
        # never did while fewer users than the cache holds were served.
        store.on_rest.append(lambda user_id: self._cache.pop(user_id, None))
        self._throttle = LogThrottle()  # `_tell`'s: once a minute per subject

    def _profile(self, user_id: str, state: UserState | None,
                 now_ms: int) -> tuple[dict[str, Any], frozenset[str], bool]:
        """(values, names that are fallbacks, is new user), exactly as at `now_ms`.

        A user's snapshot is reused while no event for them arrives (any fold changes the
        newest time, the zone, the total length of the logs or, at the cap, what it dropped) and
        `now_ms` is within its reach.
        """
        if state is None:
            return _FALLBACKS, _ALL_FALLBACK, True
        marker = (state.newest_ms, state.offset_s, sum(map(len, state.logs)), state.dropped)
        cache = self._cache
        hit = cache.get(user_id)
        if hit is not None and hit.state is state and hit.marker == marker and hit.snapshot.covers(now_ms):
            _CACHE_HIT.inc()
        else:
            _CACHE_MISS.inc()
            hit = _Cached(state, marker, snapshot(state, now_ms), _first_signal_ms(state))
            if self.feature_cache_users:
                cache[user_id] = hit
                cache.move_to_end(user_id)  # the least recently refreshed entry is the one evicted
                if len(cache) > self.feature_cache_users:
                    cache.popitem(last=False)
        snap, first = hit.snapshot, hit.first_signal_ms
        # New: no signal older than 7 days in the fold's horizon (a first week, or a return after 30+ days).
        new = first is None or first > now_ms - NEW_USER_MS
        return snap.values_at(now_ms), snap.fallbacks, new

    def _champion_failed(self, what: str) -> None:
        CHAMPION_ERRORS.inc()
        self._tell("champion", logging.ERROR, "champion %s %s: /score ranks by the popularity prior until it is "
                   "replaced. Run `tipstream models rollback` (or promote a shadow); tipstream_champion_errors_total "
                   "counts the requests.", self.lineup.champion_version, what)

    def _shadow_failed(self, error: Exception) -> None:
        SHADOW_ERRORS.inc()
        self._tell("shadow", logging.WARNING, "shadow %s could not score (%s: %s); decisions log no shadow until it "
                   "is replaced: tipstream_shadow_errors_total counts them.", self.lineup.shadow_version,
                   type(error).__name__, error)

    def _tell(self, about: str, level: int, message: str, *args: Any) -> None:
        """Log once a minute per subject: a broken model fails every request."""
        if self._throttle.allow(about) is not None:
            log.log(level, message, *args)

    def score(self, request: ScoreRequest) -> Scored:
        user_id = request.user_id
        state = self.store.state_of(user_id)  # a user still cold after a restart is loaded first
        context = request.context
        now = context.now if context is not None else None
        if now is not None and now.tzinfo is not OFFSET_UNKNOWN:
            now_ms = to_ms(now)
            offset = now.utcoffset()
            offset_s = int(offset.total_seconds()) if offset is not None else 0
            offset_min: int | None = offset_s // 60
        else:
            now_ms = to_ms(now) if now is not None else time.time_ns() // 1_000_000
            offset_s = state.offset_s if state is not None else 0
            # No event of the user's: the zone is unknown. The context features are read at UTC, but the
            # offset is logged as null, not 0, which read as UTC (EMEA in a model card's fairness check).
            offset_min = offset_s // 60 if state is not None and state.newest_ms != _NO_EVENT_MS else None
        profile, fallbacks, new_user = self._profile(user_id, state, now_ms)
        caller = request.profile_features
        used: list[str] = []
        if caller:
            used = [name for name in caller if name in fallbacks]
            if used:
                profile = {**profile, **{name: caller[name] for name in used}}
        local_ms = now_ms + offset_s * 1000
        shared = {"user_id": user_id, **profile,
                  **context_features(local_ms // 3_600_000 % 24, (local_ms // DAY_MS + 3) % 7,  # 1970-01-01: Thursday
                                     context.tasks if context is not None else None),
                  "utc_offset_min": offset_min, "is_new_user": new_user}

        candidates = request.candidates
        xs = [candidate_input(c["tip_id"], c.get("category"), c.get("features")) for c in candidates]
        tips = [c["tip_id"] for c in candidates]
        lineup = self.lineup
        prior = lineup.prior
        reactions = state.count("tip.reacted") if state is not None else 0
        policy = self.policy if request.explore else self.greedy
        failed: str | None = None
        try:
            model_scores = lineup.champion.predict_many(xs, shared=shared)
        except (ArithmeticError, ValueError) as error:  # e.g. int(inf) for an hour bucket: as diverged, not a 500
            failed = f"failed: {type(error).__name__}: {error}"
            model_scores = [math.nan] * len(tips)
        else:
            # Checked here, not left to the policy: the prior's blend gives unseen tips their base
            # rate whatever the model says, so a NaN champion went unnoticed while every tip was new.
            if not math.isfinite(sum(model_scores)):  # probabilities: the sum of finite ones is finite
                bad = next(s for s in model_scores if not math.isfinite(s))
                failed = f"scored {bad!r}, not a finite number"
            else:
                scores = blend_many(prior, tips, model_scores, reactions)
                samples = prior.thompson_samples(tips, model_scores, reactions) if policy.name == "thompson" else None
                order, propensities = policy.rank(scores, self.rng, samples)
        if failed is not None:  # rank by the prior alone, loudly
            self._champion_failed(failed)
            scores = [prior.mean(tip) for tip in tips]  # the decision logs the champion's own (null)
            samples = prior.thompson_samples(tips, None, reactions) if policy.name == "thompson" else None
            order, propensities = policy.rank(scores, self.rng, samples)

        # What the champion would serve without exploring (the first best in the caller's order,
        # as `Greedy` ranks): off-policy evaluation's target, which the served order cannot tell.
        best = max(range(len(tips)), key=scores.__getitem__)
        shadow_scores: list[float] | None = None
        shadow: dict[str, Any] | None = None
        if lineup.shadow is not None:
            try:  # computed after the answer is fixed; it is only logged
                raw = lineup.shadow.predict_many(xs, shared=shared)
                if not math.isfinite(sum(raw)):  # else logged as null, and counted as an opinion
                    raise ValueError(f"shadow {lineup.shadow_version} scored {next(s for s in raw if not math.isfinite(s))!r}")
                shadow_scores = blend_many(prior, tips, raw, reactions)
                first = max(range(len(tips)), key=shadow_scores.__getitem__)
                shadow = {"version": lineup.shadow_version, "first": tips[first]}
                # Against the champion's own choice, not the served tip: an explored first tip is
                # the policy's, and counted so, an identical shadow "disagreed" on every one.
                if first != best:
                    SHADOW_DISAGREEMENTS.inc()
            except Exception as error:  # noqa: BLE001 - a broken shadow must never affect an answer
                self._shadow_failed(error)
                shadow_scores, shadow = None, None

        decision_id = new_decision_id()
        greedy = tips[best]
        ranked = [{"tip_id": tips[i], "score": scores[i], "propensity": propensities[i]} for i in order]
        logged = []
        for i in order:
            c = candidates[i]
            entry: dict[str, Any] = {"tip_id": c["tip_id"], "score": scores[i], "propensity": propensities[i],
                                     "model_score": model_scores[i]}
            category, features = c.get("category"), c.get("features")
            if category is not None:
                entry["category"] = category
            if features:
                entry["features"] = features
            if shadow_scores is not None:
                entry["shadow_score"] = shadow_scores[i]
            logged.append(entry)
        ts = _iso(now_ms, offset_s)
        decision = {
            "id": decision_id, "type": DECISION_TYPE, "v": 1, "ts": ts, "user_id": user_id,
            "model_version": lineup.champion_version, "shadow_version": lineup.shadow_version,
            "prompt_version": None, "policy": policy.name, "explore": request.explore, "greedy": greedy,
            "features_at": ts,  # profile values are exact at the decision's time (see _profile)
            "features": shared, "caller_features": used, "ranked": logged, "shadow": shadow,
        }
        response = {"decision_id": decision_id, "model_version": lineup.champion_version, "ranked": ranked,
                    "features": shared, "caller_features": used}
        return Scored(decision_id, response, decision, encode(decision))

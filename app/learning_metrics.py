"""Prometheus metrics of scoring, the decision log and the learner, on the process's registry.

Those updated on every request or reward are `loop_metrics` ones (plain numbers, event loop
thread only); `DECISION_ROWS`, which the checkpoint writer's thread counts, and the rarely
updated ones are prometheus_client's.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from app.loop_metrics import LoopCounter, LoopHistogram
from app.metrics import METRICS

_r = METRICS.registry

SCORE_REQUESTS = LoopCounter(
    "tipstream_score_requests_total", "POST /score answers, by HTTP status (200, 413, 415, 422 and 503 each at 0 from the start).", ["status"], registry=_r
)
SCORE_SECONDS = LoopHistogram(
    "tipstream_score_seconds", "/score's synchronous work: validate, assemble features, score, rank, build the "
    "decision (no I/O happens in it).", registry=_r,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
)
FEATURE_CACHE = LoopCounter(
    "tipstream_feature_cache_total", "Profile feature evaluations for /score: hit (reused) or miss.", ["result"],
    registry=_r,
)
CHAMPION_ERRORS = LoopCounter(
    "tipstream_champion_errors_total", "/score requests the champion scored with a NaN or an infinity (a model "
    "that diverged), or failed to score: ranked by the popularity prior instead.", registry=_r,
)
SHADOW_ERRORS = LoopCounter(
    "tipstream_shadow_errors_total", "Shadow scorings that failed (the answer was unaffected).", registry=_r
)
SHADOW_DISAGREEMENTS = LoopCounter(
    "tipstream_shadow_disagreements_total", "Decisions where the shadow would have ranked another tip first than "
    "the champion without exploring (the tip served may be an exploration pick, which is not counted).",
    registry=_r,
)

DECISIONS = LoopCounter(
    "tipstream_decisions_total", "Decisions by outcome: published (acknowledged by JetStream); retried (sends "
    "again, not decisions: a decision counts each time it goes back to be sent again, refused by JetStream, "
    "unacknowledged within 5 s, in flight at a reconnect, or held aside for a message size and tried again, so one "
    "decision waiting through a NATS outage or a full store counts many times); refused (not logged: /score "
    "answered 503, the queue staying full, or 413, the decision larger than the NATS server's max_payload).",
    ["outcome"], registry=_r,
)
DECISION_QUEUE = Gauge(
    "tipstream_decision_queue", "Decisions waiting for or in flight to JetStream.", registry=_r
)
DECISION_ROWS = Counter(
    "tipstream_tip_scores_rows_total", "tip_scores rows written (a decision, or its rewards).", registry=_r
)
DECISION_ROWS_PRUNED = Counter(
    "tipstream_tip_scores_pruned_total", "tip_scores rows deleted for being older than "
    "TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS.", registry=_r
)

FEEDBACK = LoopCounter(
    "tipstream_feedback_total",
    "tip.reacted events seen by the learner, by outcome: credited, duplicate (this decision and tip were credited "
    "already, or the same user's reaction to it waits already), late (stored after the decision's silence was learned, TIPSTREAM_SILENCE_AFTER_S), no_decision, "
    "waiting (decision not seen yet), unknown_decision (gave up waiting), expired (decision left the join cache), "
    "unknown_tip (not a candidate of the decision), wrong_user (the feedback's user is not the decision's).",
    ["outcome"], registry=_r,
)
SILENCES = LoopCounter(
    "tipstream_silences_total",
    "Decisions whose wait for a reaction (TIPSTREAM_SILENCE_AFTER_S) ended, with TIPSTREAM_SILENCE_REWARD set, by "
    "outcome: credited (nobody reacted: the first tip learned the silence reward), answered (a reaction was "
    "credited), evicted (the join cache let the decision go first: its memory budget is too small for the wait).",
    ["outcome"], registry=_r,
)
LEARN_DELAY = LoopHistogram(
    "tipstream_reward_learn_delay_seconds", "Seconds from JetStream storing a reaction to every model having learned "
    "it (the promise: under 1 s), for feedback read once FEEDBACK has caught up; a reaction that waited for its "
    "decision counts its wait. By this host's clock against the NATS server's.", registry=_r,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LEARNED = LoopCounter("tipstream_rewards_learned_total", "learn_one calls, by model version.", ["version"], registry=_r)
DIVERGED = LoopCounter(
    "tipstream_rewards_diverged_total", "Rewards a model did not learn because it had diverged (a step overflowed its "
    "weights; it scores NaN), by model version (at 0 from when a version learns). Retire it and register one with a "
    "smaller learning_rate.",
    ["version"], registry=_r,
)
SKIPPED = LoopCounter(
    "tipstream_rewards_skipped_total", "Rewards a model did not learn, by model version (at 0 from when a version "
    "learns): the example held a number that is not finite or is beyond +-1e9 (learning it would have made the "
    "weights NaN).",
    ["version"], registry=_r,
)
REFUSED = LoopCounter(
    "tipstream_inputs_refused_total", "Inputs a model left out of the rewards it learned, by model version (at 0 "
    "from when a version learns): a new input name past models.reward.MAX_INPUTS names, or a new text value (tip "
    "id, category, a candidate's text feature) past the version's max_values; the rest of each example was "
    "learned. Register a version with a larger max_values to learn them.",
    ["version"], registry=_r,
)
MODEL_USERS = Gauge(
    "tipstream_model_users", "Users whose own weights a model version holds, by version, as of its last snapshot: "
    "each is forgotten once they have not reacted for the version's user_ttl_days (versions that keep every "
    "user, user_ttl_days 0, are not listed).", ["version"], registry=_r,
)
JOIN_CACHE = Gauge("tipstream_join_cache_decisions", "Decisions held for joining feedback.", registry=_r)
CANDIDATE_CACHE = Gauge(
    "tipstream_candidate_cache_items", "Inputs and features held by the champion's and the shadow's candidate "
    "feature caches, read when scraped; each empties at 600,000 (~70-95 MB resident a model) and fills again as "
    "candidates come (new tips, new hours).", registry=_r,
)
JOIN_CACHE_BYTES = Gauge(
    "tipstream_join_cache_bytes", "Bytes the join cache counts against TIPSTREAM_LEARNER_JOIN_CACHE_MB (the decisions' "
    "encoded size and a fixed overhead each; resident memory runs ~20% above it), with, during a catch-up, the "
    "decisions read ahead of FEEDBACK, which wait apart and may pass the budget by up to 10 s of them.", registry=_r,
)
PENDING = Gauge("tipstream_feedback_pending", "Feedback waiting for its decision.", registry=_r)
MODEL_SNAPSHOT_SECONDS = Histogram(
    "tipstream_model_snapshot_seconds", "Copying the live models for a checkpoint, on the event loop (they are "
    "serialised where the checkpoint is written).",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=_r,
)

"""A reward learned by every model that learns, and what is told of those that cannot.

A model that diverged learns nothing more; one at its bound of input names or text values leaves
the new ones out; an example with a feature beyond what /score takes is skipped. Each is counted
by version, and told in the log once per version (the skipped ones, once per reward), with the
fix: a version is retired or registered anew by an operator, not here.
"""

from __future__ import annotations

import logging
from typing import Any

from app.learning_metrics import DIVERGED, LEARNED, MODEL_USERS, REFUSED, SKIPPED
from models.reward import INPUT_BOUND_TEXT, MAX_INPUTS, TipModel

# The learner's lines: operators and their alerts find them under its name.
log = logging.getLogger("tipstream.learner")


class ModelLearning:
    def __init__(self) -> None:
        self._learned: dict[str, Any] = {}
        self._users_counted: set[str] = set()  # versions `tipstream_model_users` has a series for
        self._diverged_versions: set[str] = set()  # told once each
        self._refused_versions: set[str] = set()  # told once each

    def learn(self, learning: list[tuple[str, TipModel]], x: dict[str, Any], reward: float, rewarded_ms: int,
              decision_id: str, tip_id: str) -> None:
        """Every model of `learning` (the lineup's) learns `reward` for the input `x`, served as
        `tip_id` of `decision_id`."""
        skipped = []
        for version, model in learning:
            if model.diverged:  # it learns nothing more, and counting its steps would say it does
                self._diverged(version)
                continue
            before, refused = model.n_skipped, model.n_refused
            try:
                model.learn_one(x, reward, rewarded_ms)
            except Exception as error:  # noqa: BLE001 - one bad example must not stop ingest
                log.warning("model %s could not learn decision %r: %s", version, decision_id, error)
                continue
            if model.n_refused != refused:
                self._refused(version, model.n_refused - refused, model.params["max_values"])
            if model.n_skipped != before:
                skipped.append(version)
                SKIPPED.labels(version).inc()
                continue
            counter = self._learned.get(version)
            if counter is None:
                counter = self._learned[version] = LEARNED.labels(version)
            counter.inc()
        if skipped:
            log.warning("models %s did not learn tip %r of decision %r (tipstream_rewards_skipped_total): a feature "
                        "number is not finite or is beyond +-%s, which /score refuses; look at who published the "
                        "decision", ", ".join(skipped), tip_id, decision_id, INPUT_BOUND_TEXT)

    def count_users(self, learning: list[tuple[str, TipModel]]) -> None:
        """`tipstream_model_users`: the users each model that forgets them holds."""
        forgetting = {v: held for v, m in learning if (held := m.users_held) is not None}
        for version in self._users_counted - forgetting.keys():  # retired since: no longer a model that learns
            MODEL_USERS.remove(version)
        for version, held in forgetting.items():
            MODEL_USERS.labels(version).set(held)
        self._users_counted = set(forgetting)

    def _diverged(self, version: str) -> None:
        DIVERGED.labels(version).inc()
        if version not in self._diverged_versions:
            self._diverged_versions.add(version)
            log.error("model %s has diverged (a learning step overflowed its weights; it scores NaN) and learns "
                      "nothing more. Retire it with `tipstream models retire %s` (roll back first if it is the "
                      "champion) and register one with a smaller learning_rate.", version, version)

    def _refused(self, version: str, n: int, max_values: int) -> None:
        REFUSED.labels(version).inc(n)
        if version not in self._refused_versions:
            self._refused_versions.add(version)
            log.warning("model %s has reached its bound of %d input names (models.reward.MAX_INPUTS) or of %d text "
                        "values (tip ids, categories, candidates' text features: its max_values) and leaves new ones "
                        "out of what it learns (tipstream_inputs_refused_total). A caller naming features or tips anew "
                        "with every request fills them; register a version with a larger max_values (or 0, no bound), "
                        "which learns the current ones.", version, MAX_INPUTS, max_values)

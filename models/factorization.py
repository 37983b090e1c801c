"""The factorisation machine `TipModel(kind="fm")` learns with: River's, with a faster pairwise term.

Its class keeps River's private-looking name `_FastFMClassifier`: a `TipModel`'s pipeline names its
steps by class, and every stored snapshot holds the name as that step's key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from river import facto, utils

from models.snapshot import stored_in_reward


@stored_in_reward
class _FastFMClassifier(facto.FMClassifier):
    """River's FM classifier, with the pairwise term in O(p k) matrix form, over the
    categorical one-hots only.

    sum_{i<j} <v_i, v_j> x_i x_j = 0.5 * (||sum_i v_i x_i||^2 - sum_i ||v_i x_i||^2) (Rendle 2010).
    River's pairwise loop costs ~1 ms per learn_one with 25 active features, this ~0.1 ms.

    Features named in `linear_only` (TipModel's numeric inputs) and crosses (their names hold
    "=") keep a weight but get no latent vector: the pairwise term is the user x tip x category
    interactions the FM is for. Over every feature, the scaled numerics' products drowned
    them: on the simulator the FM learned no user's taste within 30 reactions, and with AdaGrad's
    step it diverged (docs/learning.md). Without `categorical_only` it is River's model with the
    same gradients, which a unit test holds.
    """

    categorical_only = False  # River's model; snapshots from before it existed hold none of their own
    linear_only: set[str] | frozenset[str] = frozenset()

    def __init__(self, n_factors: int = 10, weight_optimizer: Any = None, latent_optimizer: Any = None,
                 loss: Any = None, sample_normalization: bool = False, l1_weight: float = 0.0, l2_weight: float = 0.0,
                 l1_latent: float = 0.0, l2_latent: float = 0.0, intercept: float = 0.0, intercept_lr: Any = 0.01,
                 weight_initializer: Any = None, latent_initializer: Any = None, clip_gradient: float = 1e12,
                 seed: int | None = None, categorical_only: bool = False) -> None:
        # A parameter, not an attribute set afterwards: River's `clone` rebuilds an estimator from
        # its constructor's parameters, and a clone of TipModel's FM (or of its pipeline) paired
        # every feature. `linear_only` is learned (TipModel adds its numeric inputs): a clone starts without.
        super().__init__(n_factors=n_factors, weight_optimizer=weight_optimizer, latent_optimizer=latent_optimizer,
                         loss=loss, sample_normalization=sample_normalization, l1_weight=l1_weight,
                         l2_weight=l2_weight, l1_latent=l1_latent, l2_latent=l2_latent, intercept=intercept,
                         intercept_lr=intercept_lr, weight_initializer=weight_initializer,
                         latent_initializer=latent_initializer, clip_gradient=clip_gradient, seed=seed)
        self.categorical_only = categorical_only

    def has_latent(self, name: str) -> bool:
        return not self.categorical_only or (name not in self.linear_only and "=" not in name)

    def __getstate__(self) -> dict[str, Any]:
        # Sorted: a copied set may iterate in another order, and a snapshot's bytes must not
        # depend on that (a frozen copy serialises as the model did).
        state = self.__dict__.copy()
        if "linear_only" in state:
            state["linear_only"] = sorted(state["linear_only"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "linear_only" in state:
            self.linear_only = set(state["linear_only"])

    def _calculate_interactions(self, x: dict) -> float:
        has_latent = self.has_latent
        keys = [j for j in x if has_latent(j)]
        if not keys:
            return 0.0
        latents = self.latents
        vx = np.array([latents[j] for j in keys]) * np.fromiter((x[j] for j in keys), float, len(keys))[:, None]
        total = vx.sum(axis=0)
        return 0.5 * float(total @ total - (vx * vx).sum())

    def _learn_one(self, x: dict, y: bool, w: float = 1.0) -> None:
        has_latent = self.has_latent
        keys = [j for j in x if has_latent(j)]
        if not x:
            return super()._learn_one(x, y, w)
        latents = self.latents
        # An example with no categorical input (only numerics and crosses) has no pairwise term:
        # River's own step would give its numerics latent vectors.
        xv = np.fromiter((x[j] for j in keys), float, len(keys))
        V = np.array([latents[j] for j in keys]).reshape(len(keys), self.n_factors)  # creates unseen ones, as River does
        vx = V * xv[:, None]
        total = vx.sum(axis=0)
        weights = self.weights
        raw = self.intercept + sum(weights[j] * xj for j, xj in x.items()) + 0.5 * float(total @ total - (vx * vx).sum())
        g_loss = utils.math.clamp(self.loss.gradient(y_true=y, y_pred=raw), -self.clip_gradient, self.clip_gradient)
        g_loss *= w
        self.intercept -= self.intercept_lr.get(self.weight_optimizer.n_iterations) * g_loss
        self.weights = self.weight_optimizer.step(w=weights, g=self._calculate_weights_gradients(x, g_loss))
        # River's latent gradient, for every active feature at once (`total` is from before the step).
        grad = g_loss * (xv[:, None] * total - V * (xv * xv)[:, None]) + self.l1_latent * np.sign(V) + self.l2_latent * V
        V -= self.latent_optimizer.learning_rate * grad
        # New arrays rather than in-place writes: a concurrent reader sees the old or the new
        # vector, never half of each; copies, because row views would pin the whole matrix.
        for i, j in enumerate(keys):
            latents[j] = V[i].copy()

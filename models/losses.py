"""The loss `TipModel`'s classifiers learn with: River's log loss, for a soft label too.

A reward r in [0, 1] is a soft label. Its log loss is -(r log p + (1 - r) log(1 - p)), the sum of a
positive's weighted r and a negative's weighted 1 - r, and its gradient with respect to the logit
is their sum, p - r. River's `optim.losses.Log` takes a bool: it reads a label 0 < y < 1 as
int(y) = 0, and its gradient for one is 0, so nothing would be learned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from river import optim


class SoftLog(optim.losses.Log):
    """River's log loss, taking a label y in [0, 1]: (p - y) for the gradient, one learn_one a reward.

    Learned as two weighted binary steps instead, a soft reward cost two passes of the classifier;
    each added its own squared gradient to AdaGrad's sums (r^2 (p - 1)^2 + (1 - r)^2 p'^2 for one
    (p - r)^2), and the second step's p' was that of weights the first had moved. A bool, 0 or 1
    is River's own `Log`, exactly.

    Pickled, it is River's `Log` (`__reduce__`): the name every release's snapshots read
    (`models.snapshot.ALLOWED_GLOBALS`). `TipModel` makes it a `SoftLog` again when it loads one.

    >>> loss = SoftLog()
    >>> round(loss.gradient(0.8, 0.0), 6), loss.gradient(True, 1.5) == optim.losses.Log().gradient(True, 1.5)
    (-0.3, True)
    """

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        return self._mixed(super().__call__, y_true, y_pred)

    def gradient(self, y_true: Any, y_pred: Any) -> Any:
        # r (p - 1) + (1 - r) p = p - r, each term as River computes it (stable past |logit| 18).
        return self._mixed(super().gradient, y_true, y_pred)

    @staticmethod
    def _mixed(of: Callable[[Any, Any], Any], y: Any, y_pred: Any) -> Any:
        """`of` (River's loss or its gradient) for the label y: y of a positive's and 1 - y of a negative's."""
        if isinstance(y, np.ndarray):
            return y * of(np.ones_like(y), y_pred) + (1.0 - y) * of(np.zeros_like(y), y_pred)
        if y == 0 or y == 1:  # a bool too: River's own
            return of(y, y_pred)
        return y * of(True, y_pred) + (1.0 - y) * of(False, y_pred)

    def __reduce__(self) -> tuple[Any, ...]:
        return optim.losses.Log, (self.weight_pos, self.weight_neg)

    def __copy__(self) -> SoftLog:  # not through `__reduce__`: a copy (`TipModel.frozen`) learns as this one
        return SoftLog(self.weight_pos, self.weight_neg)

    def __deepcopy__(self, memo: dict[int, Any]) -> SoftLog:
        return self.__copy__()

"""Interaction features: one-hot crosses of pairs of inputs (a tip's category x the hour, a user x a category).

A linear model weighs each input alone; a cross gives it a weight for a pair of values together, such
as `user_id x category` for each user's own taste. `TipModel` crosses the pairs of its `interactions`
parameter (`checked_pairs`), and scoring plans the crosses of a request's candidates once (`plan`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from river import base

from models.snapshot import stored_in_reward

# Pairs of input features crossed into one-hot interaction features. A numeric member is an
# hour (0-23) and is bucketed (`hour_bucket` hours per bucket). A pair is skipped when either
# member is missing from `x`, so `user_id` costs nothing unless the caller sends it; when it
# does, `user_id x category` lets a linear model learn each user's own taste per category.
DEFAULT_INTERACTIONS: tuple[tuple[str, str], ...] = (
    ("category", "hour_of_day"),
    ("tip_id", "preferred_hour"),
    ("user_id", "category"),
)
# Each pair is a cross made for every candidate of every /score: 5,000 were registered, and promoted
# they would have cost each request thousands of crosses a candidate.
MAX_INTERACTIONS = 64


_FLAGS = {True: "true", False: "false"}  # a bool member's label in a cross

# A cross plan: (head, a or None, separator, b or None, tail); the key is head + label(x[a]) +
# separator + label(x[b]) + tail, a member's label already inside head or tail when it is
# shared by every candidate (see `Interactions.plan`).
CrossPlan = list[tuple[str, str | None, str, str | None, str]]


@stored_in_reward
class Interactions(base.Transformer):
    """One-hot crosses of feature pairs; numeric members are hours, bucketed, and a bool member
    is "true" or "false" (as an hour, True and False were both hour 0-5: the cross ignored it).

    >>> Interactions((("category", "hour_of_day"),), hour_bucket=6).transform_one(
    ...     {"category": "focus", "hour_of_day": 14})
    {'category*hour_of_day=focus*12-17': 1.0}
    >>> Interactions((("is_new_user", "category"),)).transform_one({"category": "focus", "is_new_user": False})
    {'is_new_user*category=false*focus': 1.0}
    """

    def __init__(self, pairs: Sequence[Sequence[str]] = DEFAULT_INTERACTIONS, hour_bucket: int = 6) -> None:
        self.pairs = tuple((str(a), str(b)) for a, b in pairs)
        self.hour_bucket = hour_bucket
        self._derive()

    def _derive(self) -> None:
        width = self.hour_bucket
        self._labels = tuple(f"{h // width * width}-{min(h // width * width + width, 24) - 1}" for h in range(24))
        self._plan0: CrossPlan = [(f"{a}*{b}=", a, "*", b, "") for a, b in self.pairs]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Derived again, not read back: snapshots from before 8640a09 hold a `_plan0` of another
        # shape, (prefix, a, None, b, None), on which `cross` raised a TypeError for every example.
        self.__dict__.update(state)
        self._derive()

    def label(self, value: Any) -> str:
        if isinstance(value, str):
            return value
        return _FLAGS[value] if type(value) is bool else self._labels[int(value) % 24]

    def transform_one(self, x: dict) -> dict:
        out: dict[str, float] = {}
        self.cross(x, self._plan0, out)
        return out

    def plan(self, shared: Mapping[str, Any]) -> tuple[CrossPlan, CrossPlan, CrossPlan]:
        """Split the crosses for candidates that share `shared` (their keys must not overlap it):
        the crosses computed once from `shared`, and two per-candidate parts with shared members
        already labelled: `fixed`, whose shared labels are hour buckets or true/false (or none), and `text`,
        which embed a shared string such as the user's id. A candidate's `fixed` crosses repeat
        across users, so they can be cached (`TipModel.predict_many`); `text` ones rarely do.
        A cross with a shared member that is None never fires and is dropped.

        >>> once, fixed, text = Interactions().plan({"user_id": "u-1", "hour_of_day": 14, "preferred_hour": 9})
        >>> fixed
        [('category*hour_of_day=', 'category', '*12-17', None, ''), ('tip_id*preferred_hour=', 'tip_id', '*6-11', None, '')]
        >>> text
        [('user_id*category=u-1*', None, '', 'category', '')]
        """
        once: CrossPlan = []
        fixed: CrossPlan = []
        text: CrossPlan = []
        for prefix, a, _, b, _ in self._plan0:
            in_a, in_b = a in shared, b in shared
            if in_a and in_b:
                once.append((prefix, a, "*", b, ""))
            elif (in_a and shared[a] is None) or (in_b and shared[b] is None):
                continue
            elif in_a:
                (text if isinstance(shared[a], str) else fixed).append(
                    (f"{prefix}{self.label(shared[a])}*", None, "", b, ""))
            elif in_b:
                (text if isinstance(shared[b], str) else fixed).append(
                    (prefix, a, f"*{self.label(shared[b])}", None, ""))
            else:
                fixed.append((prefix, a, "*", b, ""))
        return once, fixed, text

    def cross(self, x: Mapping[str, Any], plan: CrossPlan, out: dict[str, float]) -> None:
        """The crosses of `x` under `plan` (`_plan0`, or one from `plan()`): one string join per key."""
        labels = self._labels
        for head, a, separator, b, tail in plan:
            if a is not None:
                va = x.get(a)
                if va is None:
                    continue
                head += (va if type(va) is str or isinstance(va, str)
                         else _FLAGS[va] if type(va) is bool else labels[int(va) % 24])
            if b is not None:
                vb = x.get(b)
                if vb is None:
                    continue
                tail = (vb if type(vb) is str or isinstance(vb, str)
                        else _FLAGS[vb] if type(vb) is bool else labels[int(vb) % 24]) + tail
            out[head + separator + tail] = 1.0


__test__ = {"Interactions": Interactions}  # stored as models.reward's, which doctest would take it for


def checked_pairs(interactions: Any) -> tuple[tuple[str, str], ...]:
    """The pairs of input names to cross, checked: `"ab"` unpacked as the pair ("a", "b")."""
    example = 'e.g. [["category", "hour_of_day"]]'
    if isinstance(interactions, str | bytes) or not isinstance(interactions, Iterable):
        raise ValueError(f"interactions must be a list of pairs of input names, {example}; got {interactions!r}")
    interactions = list(interactions)
    if len(interactions) > MAX_INTERACTIONS:
        raise ValueError(f"interactions may list at most {MAX_INTERACTIONS} pairs, got {len(interactions)}")
    pairs = []
    for pair in interactions:
        if (isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(name, str) and name for name in pair)):
            raise ValueError(f"interactions must list pairs of two input names, {example}; got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)

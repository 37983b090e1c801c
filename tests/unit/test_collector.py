"""Long-lived state is frozen out of the collector's full passes as the store grows (app/collector.py)."""

from __future__ import annotations

import gc
import weakref

import pytest

from app.collector import FreezePolicy


class Cycle:
    def __init__(self) -> None:
        self.me = self  # only the collector can free it


def test_a_freeze_happens_per_growth_step_and_collects_garbage_first() -> None:
    policy = FreezePolicy(every_users=10)
    gc.disable()  # no automatic pass may free the garbage before the policy does
    try:
        states = [Cycle() for _ in range(10)]
        garbage = weakref.ref(Cycle())
        assert not policy.check(9) and garbage() is not None
        assert policy.check(10)
        assert garbage() is None, "collected before the freeze, not frozen for good"
        assert not visited(states), "full passes no longer visit them"
        assert not policy.check(19) and policy.check(20), "the next step counts from the last freeze"
        assert not FreezePolicy(every_users=0).check(10**9), "0 means never"
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_freeze_does_not_count_the_frozen_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gc.get_freeze_count()` walks every frozen object: its line's count took 31 ms of each freeze at 300,000
    users, more than the freeze itself, and grew with them."""
    def walk() -> int:
        raise AssertionError("a walk over every frozen object")

    monkeypatch.setattr(gc, "get_freeze_count", walk)
    try:
        assert FreezePolicy(every_users=1).check(1)
    finally:
        gc.unfreeze()


def test_a_start_that_loads_users_freezes_what_it_made_first() -> None:
    """The first freeze of the warm-up visited everything the start had made, beside the requests served:
    108-130 ms at 300,000 users, against 20-25 ms for the later ones (`bench/restart.py`)."""
    gc.disable()
    try:
        made = [Cycle() for _ in range(10)]
        FreezePolicy(every_users=0).before_warm_up(10**6)
        assert len(visited(made)) == len(made), "0 means never"
        FreezePolicy(every_users=50_000).before_warm_up(49_999)
        assert len(visited(made)) == len(made), "fewer than a step: the warm-up would not freeze"
        FreezePolicy(every_users=50_000).before_warm_up(50_000)
        assert not visited(made)
    finally:
        gc.unfreeze()
        gc.enable()


def visited(objects: list[object]) -> set[int]:
    """The ids of those of `objects` the collector's full passes visit. Over the suite's heap, a set of every tracked
    object's id took 0.1-0.2 s, and the asks per object made the test above take 3 s: intersected in C, milliseconds."""
    return {id(obj) for obj in objects}.intersection(map(id, gc.get_objects()))

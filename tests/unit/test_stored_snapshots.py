"""Snapshots a release wrote still load, and predict what they predicted when written.

A snapshot (a `model_versions` or `learner_state` row) names the classes and functions it is made of
by module path: those release 0.1.0 wrote, whatever has moved since (`snapshot.STORED_IN_REWARD`), so
that a release before a move reads what a later one saved (going back, docs/operations.md, "Upgrading"). Each
directory `stored_snapshots/v<release>/` holds a trained logistic regression, a trained factorisation
machine (crosses of its own, users forgotten after 30 days) and a popularity prior, as that release
wrote them, and `expected.json` what they answered then. Write a new release's set, with the code
of that release, by:

    .venv/bin/python -m tests.unit.test_stored_snapshots tests/unit/stored_snapshots/v<release>
"""

from __future__ import annotations

import importlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from models import snapshot
from models.prior import PopularityPrior
from models.reward import TipModel

RELEASES = sorted((Path(__file__).parent / "stored_snapshots").glob("v*"))
START_MS = 1_764_000_000_000
DAY_MS = 86_400_000
CATEGORIES = ("focus", "breaks", "planning")
FM_INTERACTIONS = (("category", "hour_of_day"), ("user_id", "category"), ("user_id", "tip_id"), ("is_new", "category"))
PROBES: list[dict[str, Any]] = [
    {"user_id": "u1", "tip_id": "t1", "category": "focus", "hour_of_day": 8, "completion_rate_7d": 0.4,
     "preferred_hour": 9, "is_new": False},
    {"user_id": "u4", "tip_id": "t3", "category": "breaks", "hour_of_day": 20, "completion_rate_7d": 0.9,
     "preferred_hour": 21, "is_new": True},
    {"user_id": "someone new", "tip_id": "t0", "category": "planning", "hour_of_day": 13},
    {"tip_id": "never seen", "category": "focus"},
]
# Rewards learned after loading: a day past the stream, then 40 days past it (the FM forgets every
# user but the one reacting).
LATER = [({"user_id": "u1", "tip_id": "t2", "category": "breaks", "hour_of_day": 18, "is_new": False}, 1.0, 1),
         ({"user_id": "u8", "tip_id": "t1", "category": "focus", "hour_of_day": 7, "is_new": True}, 0.3, 40)]


def _stream(n: int = 48) -> list[tuple[dict[str, Any], float, int]]:
    """Users who like one category each, with every kind of input (text, hour, number, flag)."""
    out = []
    for i in range(n):
        user, tip = f"u{i % 7}", f"t{i % 5}"
        category = CATEGORIES[(i // 2) % 3]
        x = {"user_id": user, "tip_id": tip, "category": category, "hour_of_day": (i * 5) % 24,
             "completion_rate_7d": (i % 10) / 10, "preferred_hour": (i * 7) % 24, "is_new": i < 14}
        liked = CATEGORIES[(i % 7) % 3] == category
        out.append((x, 1.0 if liked else (0.3 if i % 4 == 0 else 0.0), START_MS + i * 60_000))
    return out


def _trained_models() -> dict[str, TipModel | PopularityPrior]:
    logreg = TipModel()
    fm = TipModel(kind="fm", n_factors=4, seed=7, user_ttl_days=30, interactions=FM_INTERACTIONS)
    prior = PopularityPrior(strength=3.0)
    for x, r, at_ms in _stream():
        logreg.learn_one(x, r, at_ms=at_ms)
        fm.learn_one(x, r, at_ms=at_ms)
        prior.update(x["tip_id"], r)
    return {"tip_model_logreg": logreg, "tip_model_fm": fm, "popularity_prior": prior}


def _answers(model: TipModel | PopularityPrior) -> dict[str, Any]:
    """What a model says, before and after learning a little more (its optimiser's sums, its users'
    last reactions and the prior's counts are part of the snapshot too)."""
    if isinstance(model, PopularityPrior):
        tips = ["t0", "t1", "t4", "never seen"]
        before = [model.mean(t) for t in tips] + [model.blend("t1", 0.9, 3), model.base_rate]
        for x, r, _ in LATER:
            model.update(x["tip_id"], r)
        return {"before": before, "after": [model.mean(t) for t in tips] + [model.posterior("t2", 0.5)[0]]}
    before = {"one": [model.predict_one(x) for x in PROBES],
              "many": model.predict_many([{"tip_id": f"t{i}", "category": c} for i, c in enumerate(CATEGORIES)],
                                         shared={"user_id": "u2", "hour_of_day": 10, "is_new": False}),
              "n_learned": model.n_learned, "users_held": model.users_held}
    for x, r, days in LATER:
        model.learn_one(x, r, at_ms=START_MS + days * DAY_MS)
    return {"before": before, "after": {"one": [model.predict_one(x) for x in PROBES], "users_held": model.users_held}}


def _load(name: str, blob: bytes) -> TipModel | PopularityPrior:
    return PopularityPrior.from_bytes(blob) if name == "popularity_prior" else TipModel.from_bytes(blob)


def _named_globals(blob: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs `blob` names, as written: before the unpickler maps a moved one."""
    named = set()

    class Recorder(snapshot.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            named.add((module, name))
            return super().find_class(module, name)

    magic = next(m for m in snapshot.MAGIC.values() if blob.startswith(m))
    Recorder(io.BytesIO(blob[len(magic):])).load()
    return named


def _same(got: Any, expected: Any) -> bool:
    # Close, not equal, in the last bits: numpy's dot products may sum in another order on another CPU.
    if isinstance(expected, float):
        return isinstance(got, float) and math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-15)
    if isinstance(expected, list):
        return isinstance(got, list | tuple) and len(got) == len(expected) and all(map(_same, got, expected))
    if isinstance(expected, dict):
        return isinstance(got, dict) and got.keys() == expected.keys() and all(_same(got[k], expected[k]) for k in got)
    return got == expected


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, model in _trained_models().items():
        blob = model.to_bytes()
        (directory / f"{name}.bin").write_bytes(blob)
        expected[name] = {"globals": sorted(f"{m}:{n}" for m, n in _named_globals(blob)), "answers": _answers(model)}
    (directory / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def test_there_are_stored_snapshots() -> None:
    assert [d.name for d in RELEASES][:1] == ["v0.1.0"]
    for directory in RELEASES:
        assert {p.name for p in directory.iterdir()} == {
            "expected.json", "tip_model_logreg.bin", "tip_model_fm.bin", "popularity_prior.bin"}


@pytest.mark.parametrize("directory", RELEASES, ids=lambda d: d.name)
@pytest.mark.parametrize("name", ["tip_model_logreg", "tip_model_fm", "popularity_prior"])
def test_a_stored_snapshot_loads_and_answers_as_when_it_was_written(directory: Path, name: str) -> None:
    blob = (directory / f"{name}.bin").read_bytes()
    expected = json.loads((directory / "expected.json").read_text())[name]
    assert sorted(f"{m}:{n}" for m, n in _named_globals(blob)) == expected["globals"]
    model = _load(name, blob)
    rewritten = model.to_bytes()
    # Named as that release named it: the release reads what this code writes, as going back needs.
    assert sorted(f"{m}:{n}" for m, n in _named_globals(rewritten)) == expected["globals"]
    again = _load(name, rewritten)
    for loaded in (model, again):
        assert _same(_answers(loaded), expected["answers"])


def test_what_moved_is_stored_and_read_by_its_old_name() -> None:
    for name, home in snapshot.STORED_IN_REWARD.items():
        moved = getattr(importlib.import_module(home), name)
        assert moved.__module__ == "models.reward" and ("models.reward", name) in snapshot.ALLOWED_GLOBALS
        assert snapshot.Unpickler(io.BytesIO()).find_class("models.reward", name) is moved
        assert (home, name) not in snapshot.ALLOWED_GLOBALS


if __name__ == "__main__":
    write(Path(sys.argv[1]))

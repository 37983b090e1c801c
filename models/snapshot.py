"""The snapshot format: how a model (`TipModel`, `PopularityPrior`) is stored as bytes, and read back.

A snapshot is a header naming the class (`MAGIC`) and a pickle whose per-feature tables are flat
buffers (`_Pickler`). Reading one calls only the classes and functions tipstream's models are made
of (`ALLOWED_GLOBALS`), by the names release 0.1.0 gave them: what has moved since is still stored
under its old name (`STORED_IN_REWARD`). Rows written by every release must go on loading, and those
this one writes must load in the releases before it (tests/unit/test_stored_snapshots.py holds a set
of each release's).

>>> from models.prior import PopularityPrior
>>> prior = PopularityPrior()
>>> prior.update("tip-a", 1.0)
>>> loads(PopularityPrior, dumps(prior)).mean("tip-a") == prior.mean("tip-a")
True
>>> Unpickler(io.BytesIO()).find_class("models.reward", "PopularityPrior") is PopularityPrior  # as stored
True
"""

from __future__ import annotations

import io
import pickle
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import orjson
from river import utils

MAGIC = {"TipModel": b"tipstream:TipModel:1\n", "PopularityPrior": b"tipstream:PopularityPrior:1\n"}


class _Pickler(pickle.Pickler):
    """Pickles a model's per-feature tables as flat buffers: keys as JSON, values as float64.

    A model gains features with every user who gives feedback (`user_id` and its cross with
    `category`), and its snapshot is taken at every checkpoint that follows learning (from a
    frozen copy, in the checkpoint's writer thread; `frozen`). Stock pickle took 120-200 ms for
    a logistic regression's 400k weights here (this: ~55 ms), and 725 ms for a factorisation
    machine's 100k latent vectors, one numpy array each (this: ~90 ms). Exact, NaN and
    infinities included.
    """

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is utils.VectorDict:  # River's linear weights
            _, (data, *rest) = obj.__reduce__()
            return _vector_from_buffers, (*_buffers(data, list(data.values())), *rest)
        if kind is defaultdict and obj:  # the factorisation machine's weights and latents
            values = list(obj.values())
            if all(type(v) is float for v in values):
                return _table_from_buffers, (obj.default_factory, *_buffers(obj, values), 0)
            first = values[0]
            if type(first) is np.ndarray and first.ndim == 1 and all(
                    type(v) is np.ndarray and v.dtype == np.float64 and v.shape == first.shape for v in values):
                return _table_from_buffers, (obj.default_factory, *_buffers(obj, values), len(first))
        return NotImplemented


# Release 0.1.0 defined these in models.reward, and its snapshots name them there. They live where this
# table says now, but keep that name (`stored_in_reward`; models.reward resolves it, its `__getattr__`):
# a release before the move reads only the names it knows, and going back to one (docs/operations.md, "Upgrading")
# must read the models this one saved.
STORED_IN_REWARD: dict[str, str] = {
    "Interactions": "models.interactions", "PopularityPrior": "models.prior",
    "_FastFMClassifier": "models.factorization", "_table_from_buffers": "models.snapshot",
    "_vector_from_buffers": "models.snapshot",
}
_Stored = TypeVar("_Stored", bound=Callable[..., Any])


def stored_in_reward(obj: _Stored) -> _Stored:
    """Have snapshots name `obj` models.reward.<name> (`STORED_IN_REWARD`)."""
    if STORED_IN_REWARD.get(obj.__name__) != obj.__module__:
        raise ValueError(f"{obj.__module__}.{obj.__name__} is not in STORED_IN_REWARD: add where it lives")
    obj.__module__ = "models.reward"
    return obj


def _buffers(table: Mapping[str, Any], values: list[Any]) -> tuple[bytes, bytes]:
    return orjson.dumps(list(table)), np.asarray(values, np.float64).tobytes()


@stored_in_reward
def _vector_from_buffers(keys: bytes, values: bytes, *rest: Any) -> utils.VectorDict:
    return utils.VectorDict(dict(zip(orjson.loads(keys), np.frombuffer(values, np.float64).tolist())), *rest)


@stored_in_reward
def _table_from_buffers(factory: Any, keys: bytes, values: bytes, width: int) -> defaultdict:
    flat = np.frombuffer(values, np.float64)
    # Each latent vector its own array, as learning leaves them (a view would pin the whole block).
    rows = flat.tolist() if width == 0 else list(flat.reshape(-1, width).copy())
    return defaultdict(factory, zip(orjson.loads(keys), rows))


def dumps(obj: object) -> bytes:
    out = io.BytesIO()
    out.write(MAGIC[type(obj).__name__])
    _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return out.getvalue()


# What a snapshot's pickle may name: the classes and functions our models are made of (each kind, optimizer
# and latents setting, trained; `tests/unit/test_models_reward.py` checks the list against them), numpy's
# spellings of 1.x too; our own by the names snapshots store (`STORED_IN_REWARD`). Stock pickle
# called whatever a blob named: anyone who could write `model_versions` or `learner_state` (a database role,
# a restored backup) ran code as the service at its next start.
ALLOWED_GLOBALS = frozenset({
    ("builtins", "float"), ("builtins", "set"), ("builtins", "str"), ("builtins", "int"), ("builtins", "dict"),
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "frozenset"), ("builtins", "bool"),
    ("collections", "Counter"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("functools", "partial"), ("numbers", "Number"),
    ("models.reward", "Interactions"), ("models.reward", "PopularityPrior"), ("models.reward", "TipModel"),
    ("models.reward", "_FastFMClassifier"), ("models.reward", "_table_from_buffers"),
    ("models.reward", "_vector_from_buffers"), ("models.user_expiry", "_from_buffers"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy.random._mt19937", "MT19937"), ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("river.compose.pipeline", "Pipeline"), ("river.compose.select", "SelectType"),
    ("river.compose.union", "TransformerUnion"), ("river.linear_model.log_reg", "LogisticRegression"),
    ("river.optim.ada_grad", "AdaGrad"), ("river.optim.initializers", "Normal"),
    ("river.optim.initializers", "Zeros"), ("river.optim.losses", "Log"), ("river.optim.schedulers", "Constant"),
    ("river.optim.sgd", "SGD"), ("river.preprocessing.one_hot", "OneHotEncoder"),
    ("river.preprocessing.scale", "StandardScaler"),
    # Written by stock pickle before the tables had their own format (`_Pickler`), by River 0.26 and older:
    ("river._river_rust.vectordict", "VectorDict"), ("river.utils.vectordict", "VectorDict"),
})


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"the snapshot names {module}.{name}, which no tipstream model is made of: refused, as loading it "
                "would run what the blob says. Was the row written by something other than tipstream? If a "
                "tipstream release wrote it, report this with the name")
        return super().find_class(module, name)


def loads(cls: type, data: bytes) -> Any:
    magic = MAGIC[cls.__name__]
    if not data.startswith(magic):
        raise ValueError(f"not a {cls.__name__} snapshot (expected the header {magic!r})")
    obj = Unpickler(io.BytesIO(data[len(magic):])).load()
    if not isinstance(obj, cls):
        raise ValueError(f"snapshot holds a {type(obj).__name__}, not a {cls.__name__}")
    return obj

"""Every docstring example in models/, app/ and streams/ runs.

pyproject's `--doctest-modules` collects only what pytest collects, and `testpaths` is `tests`: a
module's examples ran only where a test called `doctest.testmod` on it, and those of
models/registry.py, models/policy.py, models/thompson.py, app/settings.py, app/demo.py and
streams/ ran nowhere.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

PACKAGES = ("models", "app", "streams")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names += [f"{package}.{info.name}" for info in pkgutil.iter_modules(path)]
    return names


def _examples(module: ModuleType) -> int:
    return sum(len(test.examples) for test in doctest.DocTestFinder().find(module))


WITH_EXAMPLES = [name for name in _modules() if _examples(importlib.import_module(name))]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_the_docstring_examples_hold(name: str) -> None:
    assert doctest.testmod(importlib.import_module(name), raise_on_error=False).failed == 0


def test_the_modules_with_examples_are_found() -> None:
    assert {"models.registry", "models.reward", "models.interactions", "models.prior", "models.snapshot",
            "models.validation", "app.registry_store", "streams.fold"} <= set(WITH_EXAMPLES)

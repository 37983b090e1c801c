"""A periodic background step survives its own failures (app/periodic.py)."""

from __future__ import annotations

import doctest

import app.periodic


def test_doctests() -> None:
    assert doctest.testmod(app.periodic, raise_on_error=False).failed == 0

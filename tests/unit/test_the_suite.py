"""What the suite's conftest promises its tests: the same draws each run, and settings of its own."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import settings

from app.settings import is_setting_variable


def test_property_tests_draw_the_same_examples_each_run_unless_asked_to_explore() -> None:
    exploring = bool(os.environ.get("TIPSTREAM_TEST_FUZZ_EXPLORE"))
    # A test's own `@settings(max_examples=...)` inherits the profile: that is how they are written.
    assert settings(max_examples=3).derandomize is not exploring
    assert settings.default.derandomize is not exploring


def test_the_only_settings_in_the_environment_are_the_suite_s_own() -> None:
    assert sorted(name for name in os.environ if is_setting_variable(name)) == [
        "TIPSTREAM_DATA_DIR", "TIPSTREAM_SPOOL_RESERVE_MB"
    ]
    assert Path(os.environ["TIPSTREAM_DATA_DIR"]).is_relative_to(tempfile.gettempdir())

"""What the suite's conftest promises its tests: the same draws each run, settings of its own, and
ports no other test is starting a server on."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings

from app.settings import is_setting_variable
from tests import ports


def test_property_tests_draw_the_same_examples_each_run_unless_asked_to_explore() -> None:
    exploring = bool(os.environ.get("TIPSTREAM_TEST_FUZZ_EXPLORE"))
    # A test's own `@settings(max_examples=...)` inherits the profile: that is how they are written.
    assert settings(max_examples=3).derandomize is not exploring
    assert settings.default.derandomize is not exploring


def test_no_property_test_times_its_examples() -> None:
    """Hypothesis's default deadline fails an example over 200 ms: a loaded machine's verdict, not the code's."""
    assert settings(max_examples=3).deadline is None and settings.default.deadline is None


def test_the_only_settings_in_the_environment_are_the_suite_s_own() -> None:
    assert sorted(name for name in os.environ if is_setting_variable(name)) == [
        "TIPSTREAM_DATA_DIR", "TIPSTREAM_SPOOL_RESERVE_MB"
    ]
    assert Path(os.environ["TIPSTREAM_DATA_DIR"]).is_relative_to(tempfile.gettempdir())


def test_two_xdist_workers_pick_their_ports_from_slices_that_do_not_meet() -> None:
    low, high = ports.LOWEST, ports._ephemeral_low() - 1
    slices = [ports.worker_slice(low, high, {"PYTEST_XDIST_WORKER": f"gw{n}", "PYTEST_XDIST_WORKER_COUNT": "3"})
              for n in range(3)]
    assert slices[0][0] == low and slices[-1][1] == high
    assert all(this[1] < after[0] for this, after in itertools.pairwise(slices))


def test_a_process_never_hands_out_a_port_twice_though_each_is_free_again_at_once(monkeypatch: Any) -> None:
    monkeypatch.setattr(ports, "_handed_out", set())  # the suite's picks so far: near half the slice, it is cleared
    picked = [ports.free_port() for _ in range(500)]  # each closed once picked, so binding it again would work
    assert len(set(picked)) == len(picked)

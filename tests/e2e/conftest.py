"""End-to-end tests run `tipstream run` as a subprocess (support.py)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.e2e.support import LAUNCHED


@pytest.fixture(autouse=True)
def no_service_left_running() -> Iterator[None]:
    """A test that fails before stopping its services leaves them to this: SIGKILL, as the
    embedded nats-server then goes with its parent (PR_SET_PDEATHSIG)."""
    yield
    while LAUNCHED:
        process = LAUNCHED.pop()
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)

"""bench/restart.py knows the warm-up's end by the service's own line, as app/warm_up.py writes it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from streams.log_throttle import counted

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_warm_up_line_of_many_users_is_read_with_its_thousands_marks(monkeypatch) -> None:
    """The line counts with thousands marks ('all 100,000 users loaded in 2.5s'): the bench read digits only, never
    saw the warm-up end, and waited out its --timeout-s (280 s) to report timed_out and no warm_s."""
    monkeypatch.syspath_prepend(str(BENCH))  # its `_harness`, as when run as a script
    spec = importlib.util.spec_from_file_location("restart_bench_under_test", BENCH / "restart.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    for users in (1, 100_000):
        line = f"all {counted(users, 'user', 'users')} loaded in {2.5:.1f}s ({counted(0, 'idle one', 'idle ones')} left"
        found = bench.LOADED.search(line.encode())
        assert found is not None, line
        assert found.group(2) == b"2.5"

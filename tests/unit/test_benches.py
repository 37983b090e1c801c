"""The in-process benchmarks still run: each, with flags for its smallest run, ends with its JSON line.

The benchmarks are not timed here (speed goals live in `bench/`); this only catches one that
no longer runs against the code it measures, as `bench/score_cost.py` once stopped when /score
began reading a service attribute its stub lacked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

SMALLEST_RUNS = {
    "score_cost": ["--requests", "20", "--repeat", "1", "--users", "10"],
    "features": ["--users", "10", "--repeat", "1"],
    "fold": ["--events", "2000", "--repeat", "1"],
    "caches": ["--decisions", "2000", "--users", "100"],
    "checkpoint_check": ["--rounds", "3", "--users", "2"],
    "checkpoint_memory": ["--users", "300", "--typical", "20"],
    "memory": ["--users", "50", "--restart-users", "50"],
    "metrics_cost": ["--rounds", "2000", "--repeat", "1"],
    "row_writes": ["--rows", "200", "--batches", "1"],
    "retention": ["--rows", "2000", "--late", "0,500", "--backlog", "500", "--repeat", "1"],
    "evaluation_read": ["--rows", "2000", "--waiting", "200", "--limit", "50", "--repeat", "1"],
    "quality": ["--users", "20", "--rounds", "4", "--seeds", "1"],
    "score_floor": ["--duration", "0.4", "--rounds", "1"],
    "offpolicy_coverage": ["--seeds", "1", "--replications", "20", "--score-runs", "1", "--score-decisions", "200"],
    "model_size": ["--users", "200", "--reactions", "3", "--repeat", "1", "--days", "365"],
    "scrub": ["--messages", "3000", "--repeat", "1"],
    "snapshot": ["--credited", "300", "--baseline", "100", "--rounds", "2", "--per-round", "10", "--waiting", "50"],
}


@pytest.mark.parametrize("name", sorted(SMALLEST_RUNS))
def test_bench_runs_and_ends_with_its_json_line(name: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *SMALLEST_RUNS[name]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["bench"] == name
    numbers = [v for v in figures.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert numbers and all(math.isfinite(v) for v in numbers), figures


def test_a_bench_whose_in_process_service_fails_to_start_says_so(tmp_path: Path) -> None:
    """bench/memory.py serves the app in a task of its own loop: uvicorn's `sys.exit(3)` after a failed start escaped
    the loop, and the bench ended with status 3 and nothing said after uvicorn's own lines."""
    env = {**os.environ, "TIPSTREAM_STREAM_REPLICAS": "3"}  # three copies on its single embedded server: refused
    done = subprocess.run([sys.executable, str(BENCH / "memory.py"), *SMALLEST_RUNS["memory"]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "RuntimeError: the service's start failed (uvicorn exited with 3)" in done.stderr, done.stderr[-3000:]


def test_every_in_process_bench_is_covered() -> None:
    """A new bench that needs no service joins the list above (the others start one: run by hand)."""
    starts_a_service = {"score", "learn", "ingest", "freshness", "restart", "soak", "fuzz", "forget_soak"}
    found = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert found - starts_a_service == set(SMALLEST_RUNS)


def test_the_readme_names_every_bench() -> None:
    """The README's "Benchmarks" list is where a user finds them: `offpolicy_coverage.py` was missing."""
    readme = (BENCH.parent / "README.md").read_text()
    section = readme.partition("\n## Benchmarks\n")[2].partition("\n## ")[0]
    found = {p.name for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert {name for name in found if f"`{name} " not in section and f"`{name}`" not in section} == set()


def test_every_bench_flag_the_docs_name_exists() -> None:
    """The README's small runs and the docs' measurements name benches with flags: a flag renamed in
    a bench and not there fails a reader's run at its argument parser."""
    import re

    named: dict[str, set[str]] = {}
    for path in (BENCH.parent / "README.md", *sorted((BENCH.parent / "docs").glob("*.md"))):
        text = path.read_text()
        for run, name in re.findall(r"`([^`]*bench/(\w+)\.py[^`]*)`", text):
            named.setdefault(name, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", run))
        # The README's list gives each bench's small-run flags after its name, in brackets.
        for name, flags in re.findall(r"^- `(\w+)\.py \[([^\]]*)\]`", text, re.MULTILINE):
            named.setdefault(name, set()).update(re.findall(r"--[a-z][a-z-]*", flags))
    assert len(named) >= 15, "the docs name benches otherwise: update this test"
    for name, flags in named.items():
        source = (BENCH / f"{name}.py").read_text()
        if "add_settings_option(parser)" in source:
            source += (BENCH / "_harness.py").read_text()
        assert {flag for flag in flags if f'"{flag}"' not in source} == set(), name


def test_a_bench_refuses_a_setting_the_service_does_not_have_before_it_starts() -> None:
    for given, told in (("polcy=thompson", "--set polcy: not a tipstream setting (did you mean policy?)"),
                        ("policy", "--set 'policy': give NAME=VALUE")):
        done = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--set", given], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and told in done.stderr, done.stderr


def test_a_bench_s_service_takes_its_settings_from_the_flags_and_names_those_of_the_shell_it_left_out(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A soak run as `TIPSTREAM_LEARNER_JOIN_CACHE_MB=48 python bench/soak.py` ran with the default 256 MB,
    without a word, and its figures were written down as the 48 MB cache's."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _harness

    monkeypatch.setattr(_harness, "_told_left_out", False)
    for name in [name for name in os.environ if name.startswith("TIPSTREAM_")]:  # the suite's own
        monkeypatch.delenv(name)
    monkeypatch.setenv("TIPSTREAM_LEARNER_JOIN_CACHE_MB", "48")
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone@db.example/production")
    monkeypatch.setenv("TIPSTREAM_TEST_SOMETHING", "1")
    env = _harness.service_environment(data_dir="/tmp/d", policy="softmax")
    assert env["TIPSTREAM_DATA_DIR"] == "/tmp/d" and env["TIPSTREAM_POLICY"] == "softmax"
    assert not {"TIPSTREAM_LEARNER_JOIN_CACHE_MB", "DATABASE_URL", "TIPSTREAM_TEST_SOMETHING"} & set(env)
    told = capsys.readouterr().err
    assert "DATABASE_URL, TIPSTREAM_LEARNER_JOIN_CACHE_MB" in told and "--set learner_join_cache_mb=" in told
    assert "TIPSTREAM_TEST_SOMETHING" not in told
    _harness.service_environment(data_dir="/tmp/d")
    assert capsys.readouterr().err == ""  # once a run


def test_every_bench_that_runs_the_service_takes_its_settings_as_the_readme_says() -> None:
    """The README: the benches that start `tipstream run` run it on the defaults, not on the shell's
    TIPSTREAM_* variables, and take a setting as `--set NAME=VALUE`. freshness.py took `--env` pairs of its
    own, names unchecked and the shell's left out without a word, and the README's list of them missed it."""
    import re

    readme = (BENCH.parent / "README.md").read_text()
    section = readme.partition("\n## Benchmarks\n")[2].partition("\n## ")[0]
    named = re.search(r"Those that start the service \(([^)]*)\)", section)
    assert named, "the README's Benchmarks no longer say which benches start the service: update this test"
    listed = set(re.findall(r"`(\w+\.py)`", named.group(1)))
    starting = {p.name for p in BENCH.glob("*.py")
                if not p.stem.startswith("_") and re.search(r'ServiceProcess\(|"run"[,\]]', p.read_text())}
    assert listed == starting
    for name in starting:
        source = (BENCH / name).read_text()
        runs_it_with = source + ((BENCH / "_harness.py").read_text() if "ServiceProcess(" in source else "")
        assert "settings_given(parser, args.set)" in source and "service_environment(" in runs_it_with, name

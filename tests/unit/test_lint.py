"""The code passes the linter as configured in pyproject.toml (ruff, pinned in the test extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                            capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, f"ruff check found problems; `ruff check --fix .` fixes most:\n{result.stdout}{result.stderr}"

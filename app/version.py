"""Which release this is: the package's version, the database schema it migrates to, and the commit
it was built from when it runs from a git checkout (releases are told apart by commit and date; the
package version moves only with the wire contract).

>>> release = describe()
>>> release.version == version("tipstream") and release.schema == revisions()[-1]
True
>>> str(release).startswith(f"tipstream {release.version}, database schema {release.schema}")
True
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from app.migrate import revisions

SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Release:
    version: str
    schema: str
    commit: str | None  # "<short hash> <commit date>", None outside a git checkout

    def __str__(self) -> str:
        built = f" (commit {self.commit})" if self.commit else ""
        return f"tipstream {self.version}, database schema {self.schema}{built}"


def _commit(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    try:  # a checkout without git installed, or a broken one, is simply not told
        done = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %cs"],
                              capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


@functools.cache
def describe() -> Release:
    return Release(version("tipstream"), revisions()[-1], _commit(SOURCE_ROOT))

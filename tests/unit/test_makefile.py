"""The Makefile's targets, beside the two the README names."""

from __future__ import annotations

from pathlib import Path

MAKEFILE = (Path(__file__).parents[2] / "Makefile").read_text()


def test_clean_leaves_the_data_directory() -> None:
    """`make clean` to rebuild .venv deleted `data/`, the default TIPSTREAM_DATA_DIR: the NATS store,
    the log everything is rebuilt from, and the database with the registry's history."""
    recipe = MAKEFILE.partition("\nclean:\n")[2].split("\n\n")[0]
    assert recipe.strip(), "no clean target"
    assert "data" not in recipe.split(), recipe

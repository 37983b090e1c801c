"""Generated documentation: the event JSON Schema and the feature table."""

from __future__ import annotations

import json
from pathlib import Path

from streams.events import json_schema
from streams.features import features_markdown


def generated() -> dict[str, str]:
    return {
        "events.schema.json": json.dumps(json_schema(), indent=2, sort_keys=True) + "\n",
        "features.md": features_markdown(),
    }


def write_docs(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generated().items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written

"""Links within the README and docs/ lead somewhere: each `(#anchor)` names a heading of its file, each
relative link names a file of the repository, and each section named in prose (`docs/operations.md, "Limits"`) is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.

    >>> slug("Forgetting a user, and what is held of them")
    'forgetting-a-user-and-what-is-held-of-them'
    >>> slug("Invalid events: the DLQ")
    'invalid-events-the-dlq'
    """
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    in_code = False
    found = set()
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_links_lead_somewhere(doc: Path) -> None:
    text = doc.read_text()
    headings = anchors(text)
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        if path:
            linked = doc.parent / path
            # `docs/learning.md#model-registry`: a heading of that file.
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text())):
                broken.append(target)
        elif anchor not in headings:
            broken.append(target)
    assert not broken, f"{doc.name} links to what is not there: {broken}"


def test_the_readme_layout_names_every_directory_of_the_repository() -> None:
    """The README's Layout is where a reader finds their way in: it left docs/ out. Build output and what
    a run makes (data/, .venv/) are not the repository's."""
    layout = (ROOT / "README.md").read_text().partition("\n## Layout\n")[2].partition("\n## ")[0]
    named = set(re.findall(r"^(\w+)/ ", layout.partition("```")[2].partition("```")[0], re.MULTILINE))
    made = {"data", "build"}
    present = {path.name for path in ROOT.iterdir() if path.is_dir() and not path.name.startswith((".", "_"))
               and path.name not in made and not path.name.endswith(".egg-info")}
    assert named == present, f"the README's Layout names {sorted(named)}, the repository has {sorted(present)}"


# A section named in prose rather than linked: `docs/learning.md, "Model registry"`, `("Limits" below)`, `see
# "Restarts"`; in code comments and docstrings too (`docs/operations.md, "Which NATS servers"`), and in the messages
# an operator reads, single-quoted inside a string (`docs/operations.md, 'Backups and restores'`).
TITLE = r'(?:"[A-Z`][^"]*"|\'[A-Z`][^\']*\')'
FILE_REFERENCE = re.compile(r"\b(README(?:\.md)?|docs/[\w-]+\.md)`?(?:,|'s)? ((?:" + TITLE + r"(?:,? (?:and |or )?)?)+)")
SAME_FILE_REFERENCE = re.compile(
    r'(?:\b[Ss]ee|\bbelow,|\babove,) ((?:"[A-Z`][^"]*"(?:,? (?:and |or )?)?)+)|"([A-Z`][^"]*)" (?:below|above)\b')


def places(path: Path) -> list[str]:
    """What a reader can find a section reference at: a heading, a bold label opening a paragraph or a
    bullet, a table row's first cell."""
    text = path.read_text()
    found, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.append(line.lstrip("#").strip())
    found += re.findall(r"\*\*([^*]+)\*\*", text) + re.findall(r"^\| ([^|]+?) \|", text, re.MULTILINE)
    return [place.replace("`", "") for place in found]


def test_sections_named_in_prose_are_there() -> None:
    """A reference by a section's title (or the start of it) leads to one: `(below, "With a million users")`
    named a paragraph's opening words, not a section."""
    # tests/ too: their messages quote the ones the service prints. compose.yaml's comments name sections.
    sources = DOCS + sorted(path for folder in ("app", "streams", "models", "bench", "tests")
                            for path in (ROOT / folder).rglob("*.py")) + [ROOT / "compose.yaml"]
    missing, seen = [], 0
    for source in sources:
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", source.read_text())  # a reference wrapped, in prose or a comment
        found = [(ROOT / ("README.md" if target.startswith("README") else target), names)
                 for target, names in FILE_REFERENCE.findall(text)]
        if source.suffix == ".md":
            found += [(source, listed or f'"{one}"') for listed, one in SAME_FILE_REFERENCE.findall(text)]
        for target, names in found:
            titles = places(target)
            for quoted in re.findall(r'"([^"]+)"|\'([^\']+)\'', names):
                # A message's title split over two string literals: 'Backups and "\n "restores'.
                name = "".join(quoted).replace('" "', "")
                seen += 1
                if not any(title.startswith(name.replace("`", "")) for title in titles):
                    missing.append(f"{source.relative_to(ROOT)}: {target.name}, {name!r}")
    assert seen >= 40, "the docs name sections otherwise now: update this test"
    assert not missing, f"sections named that are not there: {missing}"

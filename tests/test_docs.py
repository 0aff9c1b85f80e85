"""The documentation holds together: every relative link in README.md and docs/*.md reaches a
file (and a heading, when it names one), and the configuration reference lists exactly the
variables the settings object reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(FENCE.sub("", path.read_text()))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, f"{doc.name}: {broken}"


def test_the_docs_are_reachable_from_the_readme():
    """Every docs/ page is linked from README.md (so a reader finds it)."""
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert [p.name for p in DOCS[1:] if p.resolve() not in linked] == []


def _reference_variables() -> set[str]:
    """The variables of docs/configuration.md's service table (the first column, every name in it)."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text.split("## Service variables", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split("|")[1]))
    return names


def test_configuration_reference_lists_exactly_the_settings_variables():
    read = {name.upper() for name in Settings.model_fields}  # pydantic-settings: a field's env name
    listed = _reference_variables()
    assert read - listed == set(), "read by shared/settings.py but missing from docs/configuration.md"
    assert listed - read == set(), "in docs/configuration.md's service table but not read by shared/settings.py"


def test_readme_stays_one_page_with_the_run_and_test_commands_first():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    head = text[: text.index("\n## ", text.index("./test.sh"))]
    assert "./run.sh" in head and "./test.sh" in head
    assert "./test.sh" in (ROOT / ".ci" / "run").read_text()

"""The documentation: the strict site build (`make docs`) and the README as the front door.

The site build is MkDocs in strict mode (mkdocs.yml): a broken link or anchor between
pages, a page missing from the navigation, or an API reference (`::: lra.x.y`) that names
no module fails it. It needs the docs tools (the `docs` extra, also in the `test` extra)
and nothing from the network. The README is read on GitHub, outside the site, so its own
links are checked here: each relative link names a file of the repository and, for a
Markdown file, an existing heading.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 320
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def test_site_builds_in_strict_mode(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed (pip install '.[docs]')")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    assert (site / "index.html").is_file()
    assert (site / "reference" / "training" / "index.html").is_file()
    assert "train_and_evaluate" in (site / "reference" / "training" / "index.html").read_text()


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """The headings' anchors of a Markdown file (outside fenced code blocks)."""
    found, fenced = set(), False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.*)", line)):
            found.add(github_slug(match.group(1)))
    return found


def test_every_relative_link_in_the_readme_exists():
    targets = [t for t in LINK.findall(README.read_text())
               if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto:
    assert targets, "the README links into docs/"
    for target in targets:
        path, _, anchor = target.partition("#")
        file = (README.parent / path) if path else README
        assert file.exists(), f"README.md links to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"README.md links to {target}: no such heading"


def test_readme_names_every_docs_page():
    linked = {t.partition("#")[0] for t in LINK.findall(README.read_text())}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"}
    assert pages <= linked, f"docs pages missing from the README's map: {pages - linked}"

"""Every relative link of the README and the docs pages points at a file that exists, and the
README stays short enough to read in a few screens."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]

# [text](target) and ![alt](target); the target ends at the first space (an optional "title") or ")".
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)")
README_MAX_LINES = 250


def relative_targets(page: Path) -> list[str]:
    """Link targets of a page that name a file of this repository (web and mail links are left out:
    the tests run offline), without their #anchor."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
    targets = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_pages_are_found():
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = [target for target in relative_targets(page) if not (page.parent / target).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_a_missing_target_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [there](missing.md), [here](page.md#top), [web](https://example.org) and\n"
                    "```\n[not a link](inside/code.md)\n```\n![plot](plot.png \"title\")\n")
    assert relative_targets(page) == ["missing.md", "page.md", "plot.png"]


def test_the_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move long sections into docs/"

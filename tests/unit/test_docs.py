"""The README and docs/ stay navigable: every relative link reaches a file (and its heading), and the README stays
short enough to read on a screen or two while still showing the two commands that get a newcomer started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from triton_launcher.paths import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
DOCS = sorted((PROJECT_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 200

_FENCE = re.compile(r"^(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); an optional "title" after the target is ignored.
_MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_IMG_SRC = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose_lines(page: Path) -> list[tuple[str, str]]:
    """The page's lines outside fenced code blocks, each as written and with inline code blanked (code shows
    syntax, not links: ``[1, 1]`` followed by a parenthesis is no link)."""
    lines, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append((line, _INLINE_CODE.sub("``", line)))
    return lines


def relative_links(page: Path) -> list[str]:
    text = "\n".join(blanked for _, blanked in prose_lines(page))
    targets = _MARKDOWN_LINK.findall(text) + _IMG_SRC.findall(text)
    return [target for target in targets if target and not _EXTERNAL.match(target)]


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: its rendered text, lowercase, punctuation but '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(character for character in text if character.isalnum() or character in "-_ ")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line, _ in prose_lines(page):
        match = _HEADING.match(line)
        if match is None:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def link_problem(page: Path, target: str) -> str | None:
    """Why ``target``, a relative link on ``page``, leads nowhere (None when it resolves)."""
    path_part, _, fragment = target.partition("#")
    destination = page if not path_part else (page.parent / path_part).resolve()
    if not destination.is_relative_to(PROJECT_ROOT):
        return f"{target}: outside the repository"
    if not destination.exists():
        return f"{target}: no file {destination.relative_to(PROJECT_ROOT)}"
    if fragment:
        if destination.suffix != ".md":
            return f"{target}: an anchor into a file that is not Markdown"
        if fragment not in anchors(destination):
            return f"{target}: no heading with anchor #{fragment} in {destination.name}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(PROJECT_ROOT).as_posix() for page in PAGES])
def test_every_relative_link_resolves_when_followed_from_its_page(page: Path) -> None:
    problems = [problem for target in relative_links(page) if (problem := link_problem(page, target))]
    assert not problems, f"{page.relative_to(PROJECT_ROOT)}: " + "; ".join(problems)


def test_the_docs_pages_are_found_when_collecting_the_pages() -> None:
    # Guards the parametrisation above: an empty docs/ would make the link test pass vacuously.
    names = {page.name for page in DOCS}
    assert {"contract.md", "capabilities.md", "serving.md", "models.md", "deployment.md", "measurements.md",
            "development.md", "guarantees.md", "metrics.md", "soak.md"} <= names


def test_every_docs_page_is_linked_from_the_readme_when_it_exists() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    unlinked = [page.name for page in DOCS if page.resolve() not in linked]
    assert not unlinked, f"README.md's 'where to read on' misses {unlinked}"


def test_readme_fits_on_a_screen_or_two_when_counted_in_lines() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {MAX_README_LINES})"


def test_readme_shows_the_quick_start_commands_when_read() -> None:
    text = README.read_text(encoding="utf-8")
    assert "scripts/demo" in text
    assert "scripts/test" in text


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Serving: `scripts/serve`", "serving-scriptsserve"),
        ("`config.pbtxt` parameters", "configpbtxt-parameters"),
        ("Where a lone request's time goes", "where-a-lone-requests-time-goes"),
        ("6. The capability store loses nothing", "6-the-capability-store-loses-nothing"),
        ("The tables, 2026-11-25", "the-tables-2026-11-25"),
        ("perf_analyzer", "perf_analyzer"),
        ("See [serving](serving.md)", "see-serving"),
    ],
)
def test_github_anchor_follows_githubs_rules_when_given_punctuation(heading: str, anchor: str) -> None:
    assert github_anchor(heading) == anchor


def test_a_missing_file_and_a_missing_heading_are_reported_when_linked() -> None:
    # The checker itself must be able to fail: a broken target on a real page is named, a good one is not.
    page = PROJECT_ROOT / "docs" / "serving.md"
    assert link_problem(page, "contract.md#overload") is None
    assert link_problem(page, "no-such-page.md") is not None
    assert link_problem(page, "contract.md#no-such-heading") is not None
    assert link_problem(page, "#no-such-heading-here") is not None

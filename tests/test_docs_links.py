"""Every relative link and image of the README and of ``docs/*.md`` leads somewhere.

A link or image to a relative path must name an existing file or folder; a ``#anchor`` (``#q1`` in the same
file, ``file.md#anchor`` in another) must be a heading of the target file, under GitHub's slug rules
(lowercase; punctuation other than ``-`` and ``_`` dropped; spaces to ``-``; ``-1``, ``-2``, ... for repeated
headings), or an explicit ``<a id="...">`` / ``<a name="...">`` there. Links inside fenced code blocks and
inline code are not links; ``http:``, ``https:`` and ``mailto:`` links are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO_ROOT

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the target may be <bracketed> and carry a "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(?P<target>\S+)")
HTML_TARGET = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"'](?P<target>[^\"']+)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)\s*=\s*[\"'](?P<anchor>[^\"']+)[\"']", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def documentation_files(root: Path = REPO_ROOT) -> list[Path]:
    """README.md, then every ``docs/*.md`` by name."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, inline code blanked out."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, markup and punctuation dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a link may name in ``path``: its headings' slugs and its explicit ``<a id/name>``."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set(explicit_anchors(text))
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def explicit_anchors(text: str) -> list[str]:
    """The ids and names of ``<a id="...">`` / ``<a name="...">`` outside code."""
    return [m.group("anchor") for _, line in prose_lines(text) for m in HTML_ANCHOR.finditer(line)]


def links(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link and image outside code."""
    found = []
    for number, line in prose_lines(text):
        for pattern in (LINK, REFERENCE_LINK, HTML_TARGET):
            for match in pattern.finditer(line):
                found.append((number, match.group("target").strip("<>")))
    return found


def problems(files: list[Path], root: Path = REPO_ROOT) -> list[str]:
    """``file:line: ...`` for every link or image of ``files`` that leads nowhere."""
    out = []
    anchor_cache: dict[Path, set[str]] = {}
    for path in files:
        where = path.relative_to(root).as_posix()
        for number, target in links(path.read_text(encoding="utf-8")):
            if EXTERNAL.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path.resolve()
            if not destination.exists():
                out.append(f"{where}:{number}: {target!r}: no file {file_part!r}")
                continue
            if not anchor:
                continue
            if destination.suffix != ".md" or not destination.is_file():
                out.append(f"{where}:{number}: {target!r}: an anchor into something that is not Markdown")
                continue
            if destination not in anchor_cache:
                anchor_cache[destination] = anchors(destination)
            if anchor not in anchor_cache[destination]:
                out.append(
                    f"{where}:{number}: {target!r}: no heading or <a id> {anchor!r} in {file_part or where}"
                )
    return out


def test_every_link_and_image_leads_somewhere() -> None:
    found = problems(documentation_files())
    assert not found, "broken links:\n" + "\n".join(found)


def test_the_documentation_has_links_to_check() -> None:
    files = documentation_files()
    assert len(files) >= 10
    assert sum(len(links(path.read_text(encoding="utf-8"))) for path in files) >= 50


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = REPO_ROOT / "README.md"
    linked = {
        (REPO_ROOT / t.partition("#")[0]).resolve() for _, t in links(readme.read_text(encoding="utf-8"))
    }
    orphans = [
        p.relative_to(REPO_ROOT).as_posix() for p in documentation_files()[1:] if p.resolve() not in linked
    ]
    assert not orphans, f"docs pages the README does not link: {orphans}"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        (
            "The demo: all of SemLA, offline, in five and a half minutes",
            "the-demo-all-of-semla-offline-in-five-and-a-half-minutes",
        ),
        (
            "Reproducing the original trainer: `MODEL.LORA.REFERENCE_TRAINING`",
            "reproducing-the-original-trainer-modellorareference_training",
        ),
        ("`train_net.py` flags", "train_netpy-flags"),
        (
            "The tiny synthetic case, end to end (CPU, about a minute)",
            "the-tiny-synthetic-case-end-to-end-cpu-about-a-minute",
        ),
        ("Q1: the original's LoRA is inert", "q1-the-originals-lora-is-inert"),
    ],
)
def test_slugs_follow_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## A section: `x`\n\n[ok](docs/a.md#q1) [ok](#a-section-x) ![ok](docs/pic.png)\n"
        "[gone](docs/missing.md) ![gone](docs/missing.png) [bad anchor](docs/a.md#nowhere)\n"
        "`[not a link](docs/missing.md)`\n\n```\n[not a link](nothing.md)\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "docs" / "a.md").write_text(
        '# A\n\n<a id="q1"></a>\n\n[back](../README.md#top) [bad](#a-section-x)\n', encoding="utf-8"
    )
    found = problems(documentation_files(tmp_path), root=tmp_path)
    assert found == [
        "README.md:6: 'docs/missing.md': no file 'docs/missing.md'",
        "README.md:6: 'docs/missing.png': no file 'docs/missing.png'",
        "README.md:6: 'docs/a.md#nowhere': no heading or <a id> 'nowhere' in docs/a.md",
        "docs/a.md:5: '#a-section-x': no heading or <a id> 'a-section-x' in docs/a.md",
    ]

"""Reading the project's Markdown documents as the tests need them: fenced blocks with the
section and line they sit at, the marker a block may carry, headings and their anchors.

A block is marked by the line ``<!-- readme: not runnable (REASON) -->`` as its nearest
preceding non-blank line (README "Testing"); nothing else changes how a block is treated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*readme:\s*(.*?)\s*-->$")
NOT_RUNNABLE = re.compile(r"^not runnable \((.*\S.*)\)$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its language (``""`` when none), text, 1-based line of the opening
    fence, the heading it sits under, its marker (the text inside ``<!-- readme: ... -->``,
    or None) and the prose line just before it (marker excluded)."""

    lang: str
    text: str
    line: int
    section: str
    marker: str | None
    lead: str

    @property
    def not_runnable(self) -> str | None:
        """The reason given by a ``not runnable (REASON)`` marker, else None."""
        match = NOT_RUNNABLE.match(self.marker or "")
        return match.group(1).strip() if match else None

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-") or "top"
        return f"{slug}-L{self.line}"


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, in order."""
    lines, prose = text.splitlines(), outside_blocks(text).splitlines()
    out, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if m := HEADING.match(line):
            section = plain(m.group(2))
        elif m := FENCE.match(line.strip()):
            fence, lang = m.groups()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence):
                end += 1
            if end == len(lines):
                raise ValueError(f"line {i + 1}: the fenced block is never closed")
            before = [b.strip() for b in prose[:i] if b.strip()]
            marker = MARKER.match(before[-1]) if before else None
            if marker:
                before.pop()
            out.append(Block(lang.lower(), "\n".join(lines[i + 1:end]) + "\n", i + 1, section,
                             marker.group(1) if marker else None, before[-1] if before else ""))
            i = end
        i += 1
    return out


def markers(text: str) -> list[tuple[int, str]]:
    """(1-based line, content) of every ``<!-- readme: ... -->`` line outside fenced blocks."""
    return [(n, m.group(1)) for n, line in enumerate(outside_blocks(text).splitlines(), 1)
            if (m := MARKER.match(line.strip()))]


def plain(heading: str) -> str:
    """A heading's text without Markdown emphasis or code marks."""
    return re.sub(r"[`*_]", "", heading).strip()


def headings(text: str) -> list[str]:
    """The plain text of every heading outside fenced blocks."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m and (fence is None or m.group(1) == fence):
            fence = None if fence else m.group(1)
        elif fence is None and (h := HEADING.match(line)):
            out.append(plain(h.group(2)))
    return out


def anchors(text: str) -> set[str]:
    """The link anchors GitHub gives the headings (lower case, punctuation dropped, spaces
    as hyphens, ``-1``, ``-2`` ... for repeats)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(text):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def outside_blocks(text: str) -> str:
    """``text`` with every fenced block blanked out (its lines kept empty)."""
    lines, fence = text.splitlines(), None
    for n, line in enumerate(lines):
        m = FENCE.match(line.strip())
        if m and (fence is None or m.group(1) == fence):
            fence = None if fence else m.group(1)
            lines[n] = ""
        elif fence is not None:
            lines[n] = ""
    return "\n".join(lines)

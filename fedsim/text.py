"""User strings are data: each is escaped for where it goes, so a name never adds a line.

Claim names, sweep axis keys and values, scenario names and folder names reach report.md,
figures and terminal lines. Written there verbatim, a name holding a newline forges a
heading, a table row or a second ``error:`` line; ``<script>`` becomes a tag where Markdown
is rendered as HTML; an ANSI escape recolours or rewrites the terminal; a ``$`` pair turns a
figure label into mathtext. These functions turn any string into text that reads as itself
in one medium:

- :func:`one_line`: a terminal line or a one-line error — no line breaks, no control
  characters (C0, C1, DEL) and no Unicode format characters (bidirectional overrides), each
  shown as a visible escape (``\\n``, ``\\x1b``, ``\\u202e``);
- :func:`markdown`: one line of Markdown (CommonMark / GitHub) text, tables included — the
  characters that start inline markup escaped with a backslash, and ``&`` and ``<`` as HTML
  entities, so no tag, entity, link, emphasis, code span, math or cell break forms;
- :func:`mathtext`: a matplotlib label — one line, ``$`` escaped so it prints as itself.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: characters that open inline Markdown mid-line (emphasis, code spans, links and images,
#: math, strikethrough, table cell breaks, escapes) or close a heading (``#``); the rest of
#: Markdown's punctuation acts only at the start of a line, which one line of text never is
_MARKDOWN_PUNCTUATION = set("\\`*_[]#|~$")
#: ``<`` opens an HTML tag or an autolink, ``&`` an entity; ``>`` acts only at the start of
#: a line (a quote), so it stays readable as it is
_ENTITIES = {"&": "&amp;", "<": "&lt;"}


def _visible(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _unsafe(ch: str) -> bool:
    """A character a terminal or a one-line format must not receive as it is: control
    characters (Cc: C0, DEL, C1), format characters (Cf: bidirectional overrides, zero-width
    characters) and line or paragraph separators (Zl, Zp)."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def one_line(text: object) -> str:
    """``text`` as one line for a terminal: every line break, control or format character
    replaced by a visible escape (``"a\\nb"`` → ``a\\nb``, ESC → ``\\x1b``)."""
    return "".join(_visible(ch) if _unsafe(ch) else ch for ch in str(text))


def markdown(text: object) -> str:
    """``text`` as one line of Markdown that renders as the text itself (also in a table
    cell and a heading): :func:`one_line`, then Markdown punctuation backslash-escaped and
    ``&`` and ``<`` written as entities."""
    out = []
    for ch in one_line(text):
        if ch in _ENTITIES:
            out.append(_ENTITIES[ch])
        elif ch in _MARKDOWN_PUNCTUATION:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def code(text: object) -> str:
    """``text`` as one Markdown code span, shown verbatim (no markup or HTML inside a code
    span): :func:`one_line`, fenced by one more backtick than its longest run of them."""
    text = one_line(text)
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def mathtext(text: object) -> str:
    """``text`` as a matplotlib label that prints as itself: one line, and ``$`` escaped so
    no pair of them starts mathtext."""
    return one_line(text).replace("$", r"\$")

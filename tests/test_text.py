"""Names are data: user strings escaped for Markdown, a terminal line and a matplotlib label
read as themselves and add no line, heading, table, tag, control sequence or mathtext."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsim.text import code, markdown, mathtext, one_line

HOSTILE = "x\n# Injected heading\n| a | b |\r\x1b[31m<script>alert(1)</script>$x^2$ \u202e"


def test_one_line_shows_line_breaks_and_control_characters_as_escapes():
    assert one_line("a\nb\rc\td") == r"a\nb\rc\td"
    assert one_line("\x1b[31mred\x1b[0m") == r"\x1b[31mred\x1b[0m"
    assert one_line("\x00\x7f\x85") == r"\x00\x7f\x85"  # NUL, DEL, C1 NEL
    assert one_line("bidi \u202e flip \u2028 sep") == r"bidi \u202e flip \u2028 sep"
    assert one_line("Ünïcode – names ok") == "Ünïcode – names ok"  # printable text untouched
    assert one_line(3.5) == "3.5"


def test_a_forged_error_line_stays_on_the_first_line():
    text = one_line("bad axis 'k\nerror: all is well'")
    assert "\n" not in text and text.count("error:") == 1


def test_markdown_escapes_what_opens_markup_mid_line_and_keeps_the_rest():
    assert markdown("GN > BN, model.norm=gn (a-b)") == "GN > BN, model.norm=gn (a-b)"
    assert markdown("*a* _b_ `c` [d](e) #f |g| ~h~ $i$ \\") == (
        r"\*a\* \_b\_ \`c\` \[d\](e) \#f \|g\| \~h\~ \$i\$ \\")
    assert markdown("<script>&amp;") == "&lt;script>&amp;amp;"


def test_a_hostile_claim_name_renders_as_one_literal_line():
    text = markdown(HOSTILE)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "<" not in text and not re.search(r"(?<!\\)[|#$`*_\[\]]", text)
    # CommonMark renders "\\\\" as "\\", "\\#" as "#", "&lt;" as "<": the name's own characters,
    # its newline shown as the two characters "\\n"
    assert text.startswith(r"x\\n\# Injected heading\\n\| a \| b \|\\r\\x1b\[31m&lt;script>")


@given(st.text())
def test_markdown_and_one_line_never_produce_a_line_break_or_a_control_character(text):
    for out in (one_line(text), markdown(text), mathtext(text), code(text)):
        assert not any(ch in out for ch in "\n\r\x1b\x00\x85\u2028\u2029")


@pytest.mark.parametrize(("text", "span"), [
    ("final.global_test_accuracy", "`final.global_test_accuracy`"),
    ("a`b", "``a`b``"),
    ("`x``", "``` `x`` ```"),
    ("<b>|", "`<b>|`"),
])
def test_code_spans_are_fenced_longer_than_any_backtick_run(text, span):
    assert code(text) == span


def test_mathtext_label_prints_dollars_as_themselves():
    """A "$" pair in a name is mathtext to matplotlib: ``$\\frac{$`` does not even parse, and
    the figure fails to save. The escaped label draws as the literal text."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "cost $\\frac{$ and $x^2$"
    assert mathtext(name) == r"cost \$\frac{\$ and \$x^2\$"
    assert mathtext("a\nb") == r"a\nb"
    for title, ok in ((name, False), (mathtext(name), True)):
        fig, ax = plt.subplots()
        ax.set_title(title)
        try:
            fig.savefig(io.BytesIO(), format="png")
            saved = True
        except ValueError:  # matplotlib's mathtext parse error
            saved = False
        finally:
            plt.close(fig)
        assert saved is ok


@pytest.mark.parametrize("terminal", [False, True])
def test_a_scenario_name_in_the_progress_line_is_neither_markup_nor_a_control_sequence(
        terminal):
    import dataclasses
    import io
    from pathlib import Path

    from fedsim.config import load_scenario
    from fedsim.sinks.base import RunEnd, RunStart
    from fedsim.sinks.progress import ProgressLine

    name = "[bold red]x[/]\x1b[2J\ry"
    scenario = dataclasses.replace(
        load_scenario("scenarios/quickstart.toml", ["server.rounds=2"]), name=name)
    out = io.StringIO()
    line = ProgressLine(stream=out, min_interval=0.0, terminal=terminal)
    line.start(RunStart(scenario, Path(".")))
    line.on_round({"round": 1, "updates": 2})
    line.end(RunEnd({"stopped": {"round": 1, "reason": "z\nerror: forged"}}, [], Path(".")))
    text = out.getvalue()
    assert "\x1b[2J" not in text and not any(
        part.lstrip().startswith("error:") for part in re.split(r"[\r\n]", text))
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-hk-z]", "", text)  # rich's own cursor codes
    assert "[bold red]x[/]\\x1b[2J\\ry: round 1/2" in shown
    assert "stopped after round 1: z\\nerror: forged" in shown

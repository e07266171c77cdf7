"""The progress line: a rich bar on a terminal, complete plain lines anywhere else."""

import io
import re
from pathlib import Path

from fedsim.config import load_scenario
from fedsim.sinks.base import RunEnd, RunStart
from fedsim.sinks.progress import ProgressLine

SCENARIO = load_scenario("scenarios/quickstart.toml", ["server.rounds=3"])


def records():
    yield {"round": 0, "global_test_accuracy": 0.1}
    for r in (1, 2, 3):
        yield {"round": r, "updates": 10, "clients": list(range(r, r + 10)),
               "train_seconds": 0.5, "train_loss": 2.0 / r,
               **({"global_test_accuracy": 0.2 * r} if r != 2 else {})}


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_one_complete_line_per_round_with_round_loss_accuracy_and_eta():
    log = io.StringIO()  # not a terminal: no carriage returns, nothing overwritten
    line = ProgressLine(stream=log, min_interval=0.0)
    line.start(RunStart(SCENARIO, Path(".")))
    for rec in records():
        line.on_round(rec)
    line.end(RunEnd({}, [], Path(".")))
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [re.search(r"round (\d)/3", s).group(1) for s in lines] == ["0", "1", "2", "3"]
    assert "acc 0.100" in lines[0] and "ETA ?" in lines[0]
    assert "10 of 20 clients" in lines[1] and "loss 2.000" in lines[1]
    assert "acc 0.200" in lines[2]  # round 2 was not evaluated: the last accuracy stays
    assert "30 updates by 12 clients" in lines[3] and "loss 0.667  acc 0.600" in lines[3]
    assert all(re.match(r"quickstart: round \d/3  elapsed \d:\d\d:\d\d  ETA (\d:\d\d:\d\d|\?)",
                        s) for s in lines)
    assert "ETA 0:00:00" in lines[3]


def test_a_log_line_held_back_by_the_interval_is_printed_at_the_end():
    log = io.StringIO()
    line = ProgressLine(stream=log, min_interval=3600)
    line.start(RunStart(SCENARIO, Path("."), resumed_round=1))
    line.on_round({"round": 2, "updates": 10, "train_loss": 1.0})  # first of this part
    line.end(RunEnd({"stopped": {"round": 2, "reason": "early stop after round 2: x"}}, [],
                    Path(".")))
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("quickstart (resumed): round 2/3")
    assert lines[1] == "quickstart (resumed): stopped after round 2: early stop after round 2: x"


def test_a_terminal_gets_one_updating_line_cut_from_the_right(monkeypatch):
    monkeypatch.setenv("COLUMNS", "72")  # a narrow terminal: the stats are cut, not the round
    tty = Tty()
    line = ProgressLine(stream=tty)
    line.start(RunStart(SCENARIO, Path(".")))
    for rec in records():
        line.on_round(rec)
    line.end(RunEnd({}, [], Path(".")))
    text = tty.getvalue()
    assert "\x1b[" in text  # rich's control codes: the line is redrawn in place
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).split("\r")[-1].strip()
    assert last.startswith("████████████ quickstart: round 3/3  elapsed 0:00:00  ETA 0:00:00")
    assert len(last) <= 72 and last.endswith("…")

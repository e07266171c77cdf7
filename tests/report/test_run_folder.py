"""Reports that survive damage: a finished cell whose files cannot be read is listed (which
file, why) and left out of tables and claims exactly like an unfinished cell, whatever the
damage; names in report.md, figures and terminal lines are escaped for their medium.

The sweep folders here are written by hand (scenario, summary and rounds of each cell, with
exact accuracies), so every test reads what it wrote and nothing trains."""

import json
import shutil
from pathlib import Path

import pytest
import tomli_w
from markdown_it import MarkdownIt

from fedsim.cli import main
from fedsim.config import load_scenario
from fedsim.report.compare import report
from fedsim.report.run_folder import Damaged, RunFiles, read_run
from fedsim.sweep import SWEEP_JSON, expand, run_sweep

BASE = """name = "damage"
[data]
name = "digits"
[partition]
num_clients = 4
holdout_clients = 0.0
[model]
arch = "mlp"
width = 16
groups = 4
[server]
rounds = 2
clients_per_round = 2
[sweep]
model.norm = ["bn", "gn"]
seed = [0, 1, 2]

[[claims]]
name = {name}
a = {{ "model.norm" = "gn" }}
b = {{ "model.norm" = "bn" }}
"""
#: final accuracy of each cell: GN beats BN by 0.10, 0.09, 0.08 over seeds 0, 1, 2
ACC = {("bn", s): 0.70 + 0.02 * s for s in range(3)} | {("gn", s): 0.80 + 0.01 * s
                                                          for s in range(3)}
DAMAGED = "norm-gn__seed-1"
PARTNER = "norm-bn__seed-1"


def write_sweep(root: Path, name: str = "GN beats BN") -> Path:
    """A finished sweep folder as ``fedsim sweep`` leaves it (base scenario, sweep.json, one
    folder per cell with scenario.toml, summary.json and rounds.jsonl)."""
    root.mkdir(parents=True)
    toml = root / "base.toml"
    toml.write_text(BASE.format(name=json.dumps(name)))  # a JSON string is a TOML string
    base = load_scenario(toml)
    cells = expand(base, root)
    (root / "scenario.toml").write_text(tomli_w.dumps(base.to_dict()))
    (root / SWEEP_JSON).write_text(json.dumps(
        {"cells": [{"name": c.name, "params": c.params} for c in cells]}))
    for cell in cells:
        folder = root / cell.name
        folder.mkdir()
        (folder / "scenario.toml").write_text(tomli_w.dumps(cell.scenario.to_dict()))
        acc = ACC[(cell.params["model.norm"], cell.params["seed"])]
        curve = [0.1, acc - 0.05, acc]
        (folder / "rounds.jsonl").write_text("".join(
            json.dumps({"round": r, "global_test_accuracy": a}) + "\n"
            for r, a in enumerate(curve)))
        (folder / "summary.json").write_text(json.dumps(
            {"scenario": cell.scenario.name, "final": {"round": 2, "global_test_accuracy": acc},
             "timing": {"seconds": 1.0}}))
    return root


def _cut_mid_line(folder: Path) -> None:
    text = (folder / "rounds.jsonl").read_text()
    (folder / "rounds.jsonl").write_text(text[: len(text) - 12])


def _drop_last_line(folder: Path) -> None:
    lines = (folder / "rounds.jsonl").read_text().splitlines(keepends=True)
    (folder / "rounds.jsonl").write_text("".join(lines[:-1]))


def _summary(value) -> callable:
    return lambda folder: (folder / "summary.json").write_text(json.dumps(value))


#: (how the cell is damaged, the file named, the reason given)
DAMAGE = [
    (lambda f: (f / "summary.json").write_text('{"final": {"round": 2,'), "summary.json",
     "not JSON (Expecting property name enclosed in double quotes: line 1 column 23 "
     "(char 22))"),
    (_summary([0.8, 0.9]), "summary.json", "is a JSON list, not an object"),
    (_summary({"final": {"round": 2, "global_test_accuracy": "0.81"}}), "summary.json",
     'final.global_test_accuracy = "0.81" is not a number'),
    (_summary({"final": "done"}), "summary.json", "final is a string, not an object"),
    (_summary({"final": {"round": 2, "client_accuracy": {"p10": True}}}), "summary.json",
     "final.client_accuracy.p10 = true is not a number"),
    (lambda f: (f / "summary.json").write_bytes(b"\xff\xfe{}"), "summary.json",
     "not UTF-8 text"),
    (_cut_mid_line, "rounds.jsonl", "line 3 not JSON (Unterminated string starting at: line "
     "1 column 14 (char 13)); the file is cut short"),
    (_drop_last_line, "rounds.jsonl", "ends at round 1, before round 2, the final round "
     "summary.json records: the file was cut short"),
    (lambda f: (f / "rounds.jsonl").write_text('{"round": 0}\ngarbage\n{"round": 2}\n'),
     "rounds.jsonl", "line 2 not JSON (Expecting value: line 1 column 1 (char 0))"),
    (lambda f: (f / "rounds.jsonl").write_text('{"round": 0}\n{"round": "one"}\n'),
     "rounds.jsonl", 'line 2: round = "one" is not an integer'),
    (lambda f: (f / "rounds.jsonl").unlink(), "rounds.jsonl",
     "missing, though summary.json says the run finished"),
    (lambda f: (f / "scenario.toml").write_text("[model\nnorm = 'gn'"), "scenario.toml",
     "not valid TOML"),
]
IDS = ["summary-not-json", "summary-list", "string-for-number", "section-not-object",
       "bool-for-number", "summary-not-utf8", "rounds-cut-mid-line", "rounds-cut-at-line",
       "rounds-garbled", "round-not-int", "rounds-missing", "scenario-garbled"]


@pytest.mark.parametrize(("damage", "file", "why"), DAMAGE, ids=IDS)
def test_read_run_names_the_file_and_why(tmp_path, damage, file, why):
    root = write_sweep(tmp_path / "s")
    good = read_run(root / PARTNER)
    assert isinstance(good, RunFiles) and good.summary["final"]["global_test_accuracy"] == 0.72
    assert [r["round"] for r in good.rounds] == [0, 1, 2] and good.scenario.seed == 1
    damage(root / DAMAGED)
    got = read_run(root / DAMAGED)
    assert isinstance(got, Damaged) and got.file == file and why in got.why, got
    assert read_run(tmp_path / "nowhere") is None  # unfinished: no summary.json


@pytest.mark.parametrize(("damage", "file", "why"), DAMAGE, ids=IDS)
def test_report_lists_a_damaged_cell_and_treats_it_as_missing(tmp_path, capsys, damage, file,
                                                              why):
    damaged = write_sweep(tmp_path / "damaged")
    damage(damaged / DAMAGED)
    missing = write_sweep(tmp_path / "missing")
    shutil.rmtree(missing / DAMAGED)
    assert main(["report", str(damaged)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: cell {DAMAGED} is damaged and left out of the report "
                   f"({file}: {read_run(damaged / DAMAGED).why})"]
    assert main(["report", str(missing)]) == 0
    got, ref = (json.loads((r / "report.json").read_text()) for r in (damaged, missing))
    assert got["damaged"] == [{"cell": DAMAGED, "folder": str(damaged / DAMAGED), "file": file,
                               "why": read_run(damaged / DAMAGED).why}]
    assert ref["damaged"] == []
    assert [r["cell"] for r in got["rows"]] == [r["cell"] for r in ref["rows"]]
    assert len(got["rows"]) == 5 and DAMAGED not in [r["cell"] for r in got["rows"]]
    # the claim is not evaluated, naming the partner left alone, as with the missing cell
    assert got["claims"][0]["error"] == ref["claims"][0]["error"]
    assert f"cell {PARTNER} of arm b has no partner" in got["claims"][0]["error"]
    text = (damaged / "report.md").read_text()
    assert "5 of 6 cells finished (1 more finished but damaged, see below)." in text
    escaped = DAMAGED.replace("_", "\\_")
    assert "## Damaged cells" in text and f"- {escaped}: `{file}` " in text


def test_a_report_without_damage_evaluates_the_claim_exactly(tmp_path):
    root = write_sweep(tmp_path / "s")
    report([root])
    (claim,) = json.loads((root / "report.json").read_text())["claims"]
    assert claim["n_pairs"] == 3 and claim["diff_mean"] == pytest.approx(0.09, abs=1e-12)
    assert [p["diff"] for p in claim["pairs"]] == pytest.approx([0.10, 0.09, 0.08], abs=1e-12)


def test_a_finishing_sweep_reports_a_damaged_cell_and_does_not_stop(tmp_path):
    """Every cell is finished; one is damaged (its scenario.toml too, which the sweep's
    own check of finished cells reads): the sweep skips it, warns once, writes the report."""
    root = write_sweep(tmp_path / "s")
    (root / DAMAGED / "summary.json").write_text("[]")
    (root / PARTNER / "scenario.toml").write_text("not = [toml")
    said = []
    result = run_sweep(root / "base.toml", out=root, progress=said.append)
    assert result.ran == [] and len(result.skipped) == 6
    warned = [m for m in said if m.startswith("warning:")]
    noted = [m for m in said if m.startswith("note: cell")]  # cells.csv leaves them out too
    assert noted == [f"note: cell {c} skipped: damaged: {read_run(root / c)}"
                     for c in (PARTNER, DAMAGED)]
    assert warned == [
        f"warning: cell {PARTNER} is damaged and left out of the report (scenario.toml: "
        f"{read_run(root / PARTNER).why})",
        f"warning: cell {DAMAGED} is damaged and left out of the report (summary.json: is a "
        "JSON list, not an object)"]
    damaged = json.loads((root / "report.json").read_text())["damaged"]
    assert [d["cell"] for d in damaged] == [PARTNER, DAMAGED]


HOSTILE = "x\n# Injected heading\n| a | b |\n<script>alert(1)</script> \x1b[31m $\\frac{$"


def _render(text: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(text)


def test_a_hostile_claim_name_adds_no_heading_table_tag_or_mathtext(tmp_path, capsys):
    root = write_sweep(tmp_path / "s", name=HOSTILE)
    assert load_scenario(root / "scenario.toml").claims[0].name == HOSTILE
    assert main(["report", str(root)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    text = (root / "report.md").read_text()
    html = _render(text)
    assert "Injected heading</h1>" not in html and "<h1>Injected" not in html
    assert "<script>" not in html and "\x1b" not in text
    # the norms' table and the Budget section's arms, no table from the name
    assert html.count("<table>") == 2 and html.count("<th>arm</th>") == 1
    claim_line = next(line for line in text.splitlines() if "Injected" in line)
    assert claim_line.startswith("- **x\\\\n\\# Injected heading\\\\n\\| a \\| b \\|")
    # rendered, the claim shows its own characters, the newlines as "\n"
    assert "<strong>x\\n# Injected heading\\n| a | b |\\n&lt;script&gt;alert(1)&lt;/script&gt;" \
           " \\x1b[31m $\\frac{$</strong>" in html
    assert (root / "claims.png").is_file()  # the forest plot drew the name ($ escaped)


def test_hostile_axis_values_and_folder_names_are_escaped_in_the_report(tmp_path):
    """Run folders compared by ``fedsim report --out``: a free-form scenario value that
    differs between them (``server.params``) becomes an axis, shown in report.md's axes line
    and setting headings; the output folder's name is the report's title."""
    root = write_sweep(tmp_path / "s")
    runs = [root / "norm-bn__seed-0", root / "norm-gn__seed-0"]
    for run, tag in zip(runs, ("<i>a|b</i>\n# H1", "`$x$`")):
        raw = load_scenario(run / "scenario.toml").to_dict()
        raw["server"]["params"] = {"tag": tag}
        (run / "scenario.toml").write_text(tomli_w.dumps(raw))
    out = tmp_path / "<b>cmp|$x$"
    report(runs, out=out)
    text = (out / "report.md").read_text()
    html = _render(text)
    assert html.count("<h1>") == 1 and "<b>" not in html and "<i>" not in html
    assert "<h1>Comparison of runs: &lt;b&gt;cmp|$x$</h1>" in html
    assert html.count("<h3>") == 2 and html.count("<table>") == 3  # 2 settings, Budget
    # the Budget section's arm labels, one cell each, read as their own characters
    assert "<td>model.norm=bn, server.params.tag=&lt;i&gt;a|b&lt;/i&gt;\\n# H1</td>" in html
    assert "<td>model.norm=gn, server.params.tag=`$x$`</td>" in html
    assert "<h3>server.params.tag=&lt;i&gt;a|b&lt;/i&gt;\\n# H1</h3>" in html
    assert ("<code>server.params.tag</code> = <code>[&quot;&lt;i&gt;a|b&lt;/i&gt;\\n# H1&quot;, "
            "&quot;`$x$`&quot;]</code>") in html  # JSON in a code span: shown verbatim


def test_a_sweep_says_how_far_its_check_of_cells_got(tmp_path, monkeypatch):
    """While cells are built (scenarios) and checked (data and model), a progress line every
    CHECK_PROGRESS_SECONDS (here: after every cell)."""
    import fedsim.cells

    monkeypatch.setattr(fedsim.cells, "CHECK_PROGRESS_SECONDS", 0.0)
    root = write_sweep(tmp_path / "s")
    said = []
    run_sweep(root / "base.toml", out=root, progress=said.append)
    for step in ("building", "checking"):
        lines = [m.split(" (")[0] for m in said if m.startswith(f"{step} cells:")]
        assert lines == [f"{step} cells: {i} of 6" for i in range(1, 6)]


def test_fields_beside_the_numbers_a_reader_opens_are_no_damage(tmp_path):
    """What runs write next to the numbers (a TPR's ``null_because``, the prose and flags of
    ``privacy.membership_epsilon`` beside its attacks) is not judged: the cell reads whole."""
    root = write_sweep(tmp_path / "s")
    folder = root / PARTNER
    summary = json.loads((folder / "summary.json").read_text())
    summary["privacy"] = {
        "mia": {"loss": {"auc": 0.61, "tpr_at_fpr_1e-3": None,
                         "null_because": {"tpr_at_fpr_1e-3": "215 non-members: below 1/1000"}}},
        "mia_by_round": [{"round": 2, "global_test_accuracy": 0.72,
                          "loss": {"auc": 0.6, "tpr_at_fpr_1e-3": None,
                                   "null_because": {"tpr_at_fpr_1e-3": "too few"}}}],
        "membership_epsilon": {"loss": {"epsilon_if_independent": 0.4}, "what": "a bound",
                               "valid_for_one_run": False, "accountant_epsilon": None}}
    (folder / "summary.json").write_text(json.dumps(summary))
    assert isinstance(read_run(folder), RunFiles)
    summary["privacy"]["mia_by_round"][0]["loss"]["auc"] = "0.6"
    (folder / "summary.json").write_text(json.dumps(summary))
    assert read_run(folder).why == 'privacy.mia_by_round[0].loss: auc = "0.6" is not a number'
    summary["privacy"]["mia_by_round"][0]["loss"]["auc"] = 0.6
    summary["privacy"]["membership_epsilon"]["loss"]["epsilon_if_independent"] = "0.4"
    (folder / "summary.json").write_text(json.dumps(summary))
    assert read_run(folder).why == ("privacy.membership_epsilon.loss.epsilon_if_independent = "
                                    '"0.4" is not a number')


#: a [privacy] section as fedsim wrote it into results folders before audits had sections
FLAT_PRIVACY = {"mia": ["loss", "lira"], "shadows": 4, "audit_every": 2, "client_mia": False,
                "inversion": True, "inversion_steps": 50, "bn_mode": "eval", "leakage": False,
                "canary_clients": 0, "audit_confidence": 0.9}


def test_a_scenario_an_earlier_fedsim_wrote_reads_with_its_audits_spelled_per_section():
    from fedsim.config import scenario_from_dict, upgrade_flat_privacy

    raw = upgrade_flat_privacy({"privacy": FLAT_PRIVACY})
    assert raw["privacy"] == {
        "audits": ["mia", "inversion"], "audit_confidence": 0.9,
        "mia": {"attacks": ["loss", "lira"], "shadows": 4, "every": 2},
        "inversion": {"steps": 50, "bn_mode": "eval"}}
    privacy = scenario_from_dict(raw).privacy
    assert privacy.mia.shadows == 4 and privacy.inversion.steps == 50
    assert upgrade_flat_privacy({"privacy": raw["privacy"]}) == {"privacy": raw["privacy"]}


def test_a_cell_an_earlier_fedsim_wrote_is_read_not_damaged(tmp_path):
    """Every results folder holds its resolved scenario with every key, so one written before
    the audits had sections spells [privacy] flat; reports still read it."""
    import tomllib

    root = write_sweep(tmp_path / "s")
    cell = next(p for p in root.iterdir() if (p / "summary.json").is_file())
    raw = tomllib.loads((cell / "scenario.toml").read_text())
    raw["privacy"] = {"mia": [], "shadows": 8, "audit_every": 0, "inversion": False,
                      "inversion_steps": 1000, "client_round": 0}
    (cell / "scenario.toml").write_text(tomli_w.dumps(raw))
    assert not isinstance(read_run(cell), Damaged)
    with pytest.raises(Exception, match="one section per audit now"):
        load_scenario(cell / "scenario.toml")  # a file a user writes gets the new spelling

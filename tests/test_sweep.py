"""``fedsim sweep``: grid expansion, resumability, claims checked up front, report.md."""

import json
import shutil

import pytest
import torch

from fedsim.cli import main
from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.report.report import add_matched_accuracy
from fedsim.sweep import cell_name, expand, run_sweep

TINY = ["server.rounds=2", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.2", "model.width=8", "client.epochs=1",
        "privacy.audits=[\"mia\"]", "privacy.mia.every=1",
        "sweep.model.norm=[\"bn\",\"ln\"]", "sweep.seed=[0,1]"]


def test_grid_parses_from_dotted_toml_keys_and_round_trips(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nworkers = 2\nmodel.norm = ["bn", "gn"]\n"client.batch_size" = [4]\n'
                    'seed = [0, 1]\n')
    scn = load_scenario(path)
    assert scn.sweep.grid == {"model.norm": ["bn", "gn"], "client.batch_size": [4],
                              "seed": [0, 1]}
    assert scn.sweep.workers == 2
    cells = expand(scn, tmp_path / "out")
    assert [c.name for c in cells][:2] == ["norm-bn__batch_size-4__seed-0",
                                          "norm-bn__batch_size-4__seed-1"]
    assert len(cells) == 4 and cells[-1].scenario.model.norm == "gn"
    assert cells[-1].scenario.seed == 1 and cells[-1].scenario.sweep.grid == {}
    assert cells[0].scenario.output.dir == str(tmp_path / "out" / cells[0].name)
    resolved = tmp_path / "resolved.toml"
    import tomli_w

    resolved.write_text(tomli_w.dumps(scn.to_dict()))
    assert load_scenario(resolved).sweep == scn.sweep


def test_max_cells_expands_only_the_first_cells_in_grid_order(tmp_path, monkeypatch):
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nmodel.norm = ["bn", "gn"]\nseed = [0, 1, 2]\n')
    every = [c.name for c in expand(load_scenario(path), tmp_path / "out")]
    monkeypatch.setenv("FEDSIM_MAX_CELLS", "2")
    assert [c.name for c in expand(load_scenario(path), tmp_path / "out")] == every[:2] == [
        "norm-bn__seed-0", "norm-bn__seed-1"]
    monkeypatch.setenv("FEDSIM_MAX_CELLS", "0")
    with pytest.raises(ScenarioError, match="FEDSIM_MAX_CELLS='0' must be a whole number"):
        expand(load_scenario(path), tmp_path / "out")


def test_cell_names_use_full_keys_only_when_short_ones_clash():
    assert cell_name({"model.norm": "bn", "seed": 3}) == "norm-bn__seed-3"
    assert cell_name({"a.x": 1, "b.x": 2}) == "a.x-1__b.x-2"


@pytest.mark.parametrize(("text", "pattern"), [
    ('[sweep]\nmodel.nrom = ["bn"]\n', "sweep axis 'model.nrom'"),
    ('[sweep]\nmodel.norm = []\n', "non-empty list"),
    ('[sweep]\nmodel.norm = ["bn", "batchnorm"]\n', "unknown norm"),
    ('name = "x"\n', "no \\[sweep\\] grid"),
])
def test_bad_grids_are_refused_before_any_cell_runs(tmp_path, text, pattern):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=pattern):
        run_sweep(path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sweep_is_resumable_and_writes_a_report_with_claims(tmp_path):
    out = tmp_path / "sweep"
    lines = []
    first = run_sweep("scenarios/quickstart.toml", TINY, out=out, workers=2,
                      progress=lines.append)
    assert len(first.ran) == 4 and first.skipped == []
    assert any(line.startswith("[4/4]") for line in lines)  # progress across cells
    for name in first.ran:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["privacy"]["mia"]["loss"]["auc"] is not None
    report = first.report.read_text()
    assert "## Claims" in report and "declares no claims" in report
    assert "| bn |" in report and "| ln |" in report
    assert (out / "accuracy.png").is_file() and (out / "mia.png").is_file()
    assert not (out / "claims.png").exists()

    stamp = (out / first.ran[0] / "summary.json").stat().st_mtime_ns
    second = run_sweep("scenarios/quickstart.toml", TINY, out=out)
    assert second.ran == [] and sorted(second.skipped) == sorted(first.ran)
    assert (out / first.ran[0] / "summary.json").stat().st_mtime_ns == stamp

    cell = out / first.ran[1]  # killed during round 2: resumes from round 1's checkpoint
    model = torch.load(cell / "model.pt", weights_only=True)
    for name in ("summary.json", "model.pt", "checkpoint.pt"):
        (cell / name).unlink()
    (cell / "checkpoint.prev.pt").rename(cell / "checkpoint.pt")
    lines = []
    third = run_sweep("scenarios/quickstart.toml", TINY, out=out, progress=lines.append)
    assert third.ran == [first.ran[1]]
    assert json.loads((cell / "summary.json").read_text())["resumed_from"] == [1]
    assert any("resumed after round 1" in line for line in lines)
    again = torch.load(cell / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], again[k]) for k in model)

    broken = out / first.ran[2]  # checkpoints unusable: the cell runs from the start
    (broken / "summary.json").unlink()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (broken / name).write_bytes(b"not a checkpoint")
    lines = []
    fourth = run_sweep("scenarios/quickstart.toml", TINY, out=out, progress=lines.append)
    assert fourth.ran == [first.ran[2]]
    assert "resumed_from" not in json.loads((broken / "summary.json").read_text())
    assert any("could not resume" in line for line in lines)

    moved = tmp_path / "moved"  # a sweep folder can be moved and still resumes
    shutil.copytree(out, moved)
    assert run_sweep("scenarios/quickstart.toml", TINY, out=moved).ran == []

    with pytest.raises(ScenarioError, match="different scenario"):
        run_sweep("scenarios/quickstart.toml", TINY + ["client.lr=0.01"], out=out)


def test_cli_sweep_bad_axis_exits_2(tmp_path, capsys):
    code = main(["sweep", "scenarios/quickstart.toml", "--out", str(tmp_path / "o"), "--quiet",
                 "--set", "sweep.model.nrom=[\"bn\"]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "model.nrom" in err


def test_cli_sweep_runs_and_resumes(tmp_path, capsys):
    args = ["sweep", "scenarios/quickstart.toml", "--out", str(tmp_path / "c"), "--quiet",
            "--set", "server.rounds=1", "--set", "partition.num_clients=4", "--set",
            "server.clients_per_round=2", "--set", "model.width=8", "--set", "sweep.seed=[0,1]"]
    assert main(args) == 0
    assert "2 cells run, 0 skipped" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 cells run, 2 skipped" in capsys.readouterr().out
    assert (tmp_path / "c" / "seed-1" / "summary.json").is_file()


def test_dp_sweep_reports_the_privacy_spent_per_setting(tmp_path):
    args = ["sweep", "scenarios/quickstart.toml", "--out", str(tmp_path / "dp"), "--quiet",
            "--set", "server.rounds=1", "--set", "partition.num_clients=4", "--set",
            "server.clients_per_round=2", "--set", "model.width=8", "--set",
            "server.dp.kind=fixed", "--set", "sweep.server.dp.noise_multiplier=[0.5,2.0]"]
    assert main(args) == 0
    report = json.loads((tmp_path / "dp" / "report.json").read_text())
    eps = {r["params"]["server.dp.noise_multiplier"]: r["dp.epsilon"] for r in report["rows"]}
    for z, folder in ((0.5, "noise_multiplier-0.5"), (2.0, "noise_multiplier-2.0")):
        summary = json.loads((tmp_path / "dp" / folder / "summary.json").read_text())
        assert eps[z] == summary["dp"]["privacy_spent"]["epsilon"]
    assert eps[0.5] > eps[2.0] > 0  # more noise, less privacy spent
    text = (tmp_path / "dp" / "report.md").read_text()
    assert text.count("DP ε (summary.json dp.privacy_spent)") == 2  # one table per setting


# --------------------------------------------------------------------------- matched accuracy


def row(norm, seed, batch=32, alpha=0.1, **metrics):
    params = {"model.norm": norm, "client.batch_size": batch, "partition.alpha": alpha,
              "seed": seed}
    return {"params": params, "model.norm": norm, "seed": seed, "client.batch_size": batch,
            "partition.kind": "dirichlet", "partition.alpha": alpha, "mia_by_round": [],
            **metrics}


def test_matched_accuracy_reads_the_first_round_reaching_the_common_level():
    a = row("bn", 0)
    b = row("ln", 0)
    a["mia_by_round"] = [{"round": r, "global_test_accuracy": acc, "loss": {"auc": auc,
                                                                           "tpr_at_fpr_1e-3": 0}}
                         for r, acc, auc in ((1, 0.5, 0.51), (2, 0.7, 0.52), (3, 0.9, 0.6))]
    b["mia_by_round"] = [{"round": r, "global_test_accuracy": acc, "loss": {"auc": auc,
                                                                           "tpr_at_fpr_1e-3": 0}}
                         for r, acc, auc in ((1, 0.6, 0.5), (2, 0.75, 0.53), (3, 0.72, 0.54))]
    levels = add_matched_accuracy([a, b])
    assert list(levels.values()) == [0.75]
    assert (a["matched_round"], a["matched.loss.auc"]) == (3, 0.6)
    assert (b["matched_round"], b["matched.loss.auc"]) == (2, 0.53)


# --------------------------------------------------------------------------- declared claims

SMALL = """name = "small"
[data]
name = "digits"
[partition]
num_clients = 4
holdout_clients = 0.0
[model]
width = 8
[server]
rounds = 1
clients_per_round = 2
[sweep]
output.eval_clients = [100, 200]
seed = [0, 1, 2]
"""

NOOP = """[[claims]]
name = "evaluating up to 200 clients beats up to 100"
metric = "{metric}"
a = {{ "output.eval_clients" = {a} }}
b = {{ "output.eval_clients" = 100 }}
at = "{at}"
"""


@pytest.mark.parametrize(("claim", "pattern"), [
    (dict(a='200, "model.norm" = "gn"', metric="final.global_test_accuracy", at="final"),
     "a and b must fix the same axes"),
    (dict(a=300, metric="final.global_test_accuracy", at="final"),
     r"claims\[0\].a: output.eval_clients = 300 is not among the axis values \[100, 200\]"),
    (dict(a=200, metric="final.global_test_acuracy", at="final"),
     r"claims\[0\].metric 'final.global_test_acuracy' is not a number summary.json holds"),
    (dict(a=200, metric="privacy.mia.loss.auc", at="final"),
     r'sweep cell eval_clients-\d+__seed-0 does not measure it; set privacy.audits = \["mia"\]'),
    (dict(a=200, metric="privacy.membership_epsilon.loss.epsilon_if_independent", at="final"),
     r'set privacy.audits = \["mia"\] and a DP accountant'),
    (dict(a=200, metric="privacy.sample_canary_audit.lower_bound.epsilon_lower_bound",
          at="final"), r'set privacy.audits = \["canary_samples"\] with \[client.dp\]'),
    (dict(a=200, metric="privacy.client_mia.auc.mean", at="matched_accuracy"),
     "has no per-round record"),
    (dict(a=200, metric="final.validation_accuracy", at="final"),
     r"sweep cell eval_clients-\d+__seed-0 does not measure it; set data.validation_fraction"),
])
def test_bad_claims_are_refused_before_any_cell_runs(tmp_path, claim, pattern):
    path = tmp_path / "s.toml"
    path.write_text(SMALL + NOOP.format(**claim))
    with pytest.raises(ScenarioError, match=pattern):
        run_sweep(path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_claim_on_a_key_that_is_not_an_axis_is_an_error_at_the_cli(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(SMALL + '[[claims]]\nname = "x"\na = { "model.norm" = "gn" }\n'
                    'b = { "model.norm" = "bn" }\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: claims[0].a: 'model.norm' is not a sweep axis (axes: "
                   "output.eval_clients, seed); add it to [sweep] or fix the claim")
    assert not (tmp_path / "o").exists()


def test_a_claim_between_no_op_settings_is_inconclusive(tmp_path):
    """eval_clients 100 vs 200 with 4 clients evaluates the same clients: identical metrics."""
    path = tmp_path / "s.toml"
    path.write_text(SMALL + NOOP.format(a=200, metric="final.global_test_accuracy", at="final")
                    + NOOP.format(a=200, metric="final.client_accuracy.p10",
                                  at="matched_accuracy").replace("beats", "matches"))
    result = run_sweep(path, out=tmp_path / "out")
    assert len(result.ran) == 6
    cells = load_scenario(tmp_path / "out" / result.ran[0] / "scenario.toml")
    assert cells.claims == ()  # the claims stay with the sweep
    assert len(load_scenario(tmp_path / "out" / "scenario.toml").claims) == 2
    claims = json.loads((tmp_path / "out" / "report.json").read_text())["claims"]
    for c in claims:
        assert {"name", "verdict", "diff_mean", "ci_low", "ci_high", "ci_level", "ci95",
                "p_value", "p_holm", "n_pairs", "settings", "seeds_needed"} <= set(c)
        assert c["verdict"] == "inconclusive" and c["n_pairs"] == c["n_seeds"] == 3
        assert (c["diff_mean"], c["ci_low"], c["ci_high"], c["p_value"]) == (0, None, None, None)
        assert c["reason"].startswith("every seed gives the same difference")
        assert c["p_holm"] is None and c["seeds_needed"] is None and c["settings"] == []
        assert [p["a"] for p in c["pairs"]] == [f"eval_clients-200__seed-{s}" for s in (0, 1, 2)]
    assert claims[1]["pairs"][0]["a_round"] == claims[1]["pairs"][0]["b_round"] == 1
    text = (tmp_path / "out" / "report.md").read_text()
    assert ("- **evaluating up to 200 clients beats up to 100** — inconclusive: a−b = +0.000, "
            "n = 3 seeds; not tested: every seed gives the same difference") in text
    assert (tmp_path / "out" / "claims.png").is_file()
    assert run_sweep(path, out=tmp_path / "out").ran == []  # finished cells still check out


def test_a_sweep_warns_once_when_a_dp_strategy_gets_no_epsilon(tmp_path):
    """[server.dp] around FedAdam: no ε holds (why_not); the sweep says so once, up front."""
    path = tmp_path / "s.toml"
    path.write_text(SMALL.replace("[server]\n", "[server]\nstrategy = \"fedadam\"\n")
                    + '[server.dp]\nkind = "fixed"\nnoise_multiplier = 1.0\n')
    said = []
    run_sweep(path, out=tmp_path / "out", progress=said.append)
    warnings = [s for s in said if "warning: server.dp" in s]
    assert len(warnings) == 1 and "no ε is reported" in warnings[0], said
    for cell in (tmp_path / "out").glob("*/summary.json"):
        spent = json.loads(cell.read_text())["dp"]["privacy_spent"]
        assert spent["epsilon"] is None and spent["why_not"]


def _traced_sweep(tmp_path, norms: str):
    path = tmp_path / "s.toml"
    path.write_text(f'[data]\nname = "digits"\n[partition]\nnum_clients = 4\n'
                    f'[model]\nwidth = 8\n[engine]\nvectorize = true\n[server]\nrounds = 1\n'
                    f'clients_per_round = 2\n[sweep]\nmodel.norm = {norms}\n'
                    f'client.lr = [0.05, 0.1]\nseed = [0, 1, 2]\n')
    return path


def _count_traces(monkeypatch, fail_on_bn: bool = False) -> list[str]:
    """Record each dry cohort step's model norms; optionally fail those with BatchNorm."""
    import fedsim.engine.vectorized as vectorized
    from fedsim.models.norm import has_running_statistics

    real, calls = vectorized.trace_problem, []

    def traced(model, data):
        bn = any(has_running_statistics(m) for m in model.modules())
        calls.append("bn" if bn else "other")
        if fail_on_bn and bn:
            return "RuntimeError: cannot batch this model"
        return real(model, data)

    monkeypatch.setattr(vectorized, "trace_problem", traced)
    return calls


def test_a_sweep_traces_each_distinct_model_once(tmp_path, monkeypatch):
    """12 cells, 2 models: the vectorize trace check runs twice; seeds and rates share it."""
    from fedsim.sweep import preflight_cells

    calls = _count_traces(monkeypatch)
    cells = expand(load_scenario(_traced_sweep(tmp_path, '["gn", "bn"]')), tmp_path / "out")
    assert len(cells) == 12
    preflight_cells(cells, lambda _msg: None)
    assert calls == ["other", "bn"]


def test_a_shared_trace_failure_still_refuses_the_sweep_before_any_cell_runs(tmp_path,
                                                                           monkeypatch):
    """A model that passed (gn) does not vouch for one that fails (bn), and the failure
    stops the sweep with one error before anything is written."""
    calls = _count_traces(monkeypatch, fail_on_bn=True)
    with pytest.raises(ScenarioError, match="cannot batch this model"):
        run_sweep(_traced_sweep(tmp_path, '["gn", "bn"]'), out=tmp_path / "out")
    assert calls == ["other", "bn"]
    assert not (tmp_path / "out").exists()


def test_a_single_run_traces_every_time(tmp_path, monkeypatch):
    """Outside a sweep nothing is kept between preflights."""
    from fedsim.run import preflight

    calls = _count_traces(monkeypatch)
    cells = expand(load_scenario(_traced_sweep(tmp_path, '["gn"]')), tmp_path / "out")
    preflight(cells[0].scenario)
    preflight(cells[1].scenario)
    assert calls == ["other", "other"]


def test_the_interrupted_line_of_a_large_sweep_builds_no_cell(tmp_path, monkeypatch):
    """Ctrl-C during the check of 1,002 cells: the line counts cells by name only (building
    each cell's scenario again took minutes at 10,000)."""
    import fedsim.sweep

    path = tmp_path / "big.toml"
    path.write_text('[sweep]\nmodel.norm = ["bn", "gn"]\nseed = [' +
                    ", ".join(str(s) for s in range(501)) + "]\n")
    monkeypatch.setattr(fedsim.sweep, "expand", None)  # any call fails the test
    line = fedsim.sweep.interrupted_line(path, out=tmp_path / "o", argv=["sweep", str(path)])
    assert line == (f"interrupted: 0 of 1002 cells done; 1002 not started (in {tmp_path / 'o'}); "
                    f"resume with: fedsim sweep {path}")

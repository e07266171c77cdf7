"""A sweep's [sweep.tune] and [sweep.zip]: bad grids refused before any cell runs, tuning
cells per arm, zipped and scaled values, and selection that never reads test data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import fedsim.data.datasets as datasets
from fedsim.cli import main
from fedsim.config import load_scenario
from fedsim.data.federated import _build
from fedsim.errors import ScenarioError
from fedsim.report.claims import check_claims
from fedsim.sweep import _covering, expand, interrupted_line, run_sweep, tune_cells

BASE = """name = "tiny"
[data]
validation_fraction = 0.2
[partition]
num_clients = 4
[model]
width = 8
[client]
epochs = 1
[server]
rounds = 1
clients_per_round = 2
"""

SWEEP = """[sweep]
model.norm = ["bn", "gn"]
seed = [0, 1, 2]
"""

TUNE = """[sweep.tune]
grid = {{ {grid} }}
seeds = {seeds}
{extra}
"""


def scenario(tmp_path, base=BASE, sweep=SWEEP, grid='"client.lr" = [0.01, 0.1]',
             seeds="[100, 101]", extra="", tail=""):
    path = tmp_path / "s.toml"
    path.write_text(base + sweep + TUNE.format(grid=grid, seeds=seeds, extra=extra) + tail)
    return path


@pytest.mark.parametrize(("kw", "pattern"), [
    (dict(grid='"client.lrr" = [0.1]'), r"sweep.tune.grid.client.lrr: .*unknown key "
                                        r"'client.lrr' \(did you mean 'lr'\?\)"),
    (dict(grid='"model.norm" = ["ln"]'), r"sweep.tune.grid.model.norm: 'model.norm' is also "
                                         "a sweep axis"),
    (dict(seeds="[100, 2]"), r"sweep.tune.seeds \[100, 2\] share \[2\] with the reported "
                             r"seeds \(sweep.seed = \[0, 1, 2\]\)"),
    (dict(extra='metric = "final.global_test_accuracy"'),
     "sweep.tune.metric = 'final.global_test_accuracy' is not a validation metric"),
    (dict(grid='"client.lr" = []'), r"sweep.tune.grid.client.lr must be a non-empty list"),
    (dict(seeds="[]"), "sweep.tune.seeds is empty"),
    (dict(grid='"client.lr" = [-0.1]'), r"sweep.tune cell tune/norm-bn__lr--0.1__seed-100: "
                                        "client.lr = -0.1 is out of range"),
    (dict(base=BASE.replace("validation_fraction = 0.2", "validation_fraction = 0.0")),
     r"sweep.tune selects on the validation split, but sweep cell norm-bn__seed-0 holds none "
     r"out \(data.validation_fraction = 0\); set data.validation_fraction = 0.1"),
    (dict(extra='scale = { "client.lr" = "client.batch_sizes" }'),
     "sweep.tune.scale.client.lr = 'client.batch_sizes' is not a numeric scenario key"),
    (dict(extra='mode = "min"'), "sweep.tune.mode = 'min' contradicts"),
])
def test_bad_tune_grids_are_refused_before_any_cell_runs(tmp_path, kw, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        run_sweep(scenario(tmp_path, **kw), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bad_tune_grid_is_one_error_line_at_the_cli(tmp_path, capsys):
    path = scenario(tmp_path, seeds="[0]")
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep.tune.seeds [0] share [0]") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_tuning_cells_cover_every_arm_value_and_tuning_seed(tmp_path):
    base = load_scenario(scenario(tmp_path, grid='"client.lr" = [0.01, 0.1], '
                                                '"client.momentum" = [0.0, 0.9]'))
    cells = expand(base, tmp_path)
    tuning = tune_cells(base, tmp_path, cells)
    assert len(tuning) == 2 * 4 * 2  # arms x (lr x momentum) x tuning seeds
    first = tuning[0]
    assert first.name == "tune/norm-bn__lr-0.01__momentum-0.0__seed-100"
    assert first.arm == {"model.norm": "bn"} and first.seed == 100
    assert (first.scenario.client.lr, first.scenario.client.momentum) == (0.01, 0.0)
    assert first.scenario.seed == 100 and first.scenario.model.norm == "bn"
    assert first.scenario.output.dir == str(tmp_path / first.name)
    covered = _covering(tuning)  # preflighted: every value on seed 100, every seed at 0.01/0.0
    assert len(covered) == 2 * (4 + 2 - 1)
    assert {(c.seed, tuple(c.values.values())) for c in covered if c.arm == first.arm} == {
        (100, (0.01, 0.0)), (100, (0.01, 0.9)), (100, (0.1, 0.0)), (100, (0.1, 0.9)),
        (101, (0.01, 0.0))}
    assert [c.name for c in tuning[:4]] == [
        "tune/norm-bn__lr-0.01__momentum-0.0__seed-100",
        "tune/norm-bn__lr-0.01__momentum-0.0__seed-101",
        "tune/norm-bn__lr-0.01__momentum-0.9__seed-100",
        "tune/norm-bn__lr-0.01__momentum-0.9__seed-101"]



def test_tuning_cells_report_to_no_tracker_and_reported_cells_keep_theirs(tmp_path):
    """A tracker's run per tuning cell would bury the study's runs: tuning cells keep only
    the sinks that write their folder (here parquet); the reported cells keep every sink."""
    tail = '[output]\nsinks = ["mlflow", "parquet", "wandb"]\n'
    base = load_scenario(scenario(tmp_path, base=BASE + tail))
    cells = expand(base, tmp_path)
    tuning = tune_cells(base, tmp_path, cells)
    assert {c.scenario.output.sinks for c in tuning} == {("parquet",)}
    assert {c.scenario.output.sinks for c in cells} == {("mlflow", "parquet", "wandb")}


ZIP = """[sweep]
model.norm = ["bn", "gn"]
client.batch_size = [2, 32]
seed = [0, 1, 2]
[sweep.zip.schedule]
every_step = { "client.local_steps" = 1, "server.rounds" = 20 }
every_20_steps = { client.local_steps = 20, "server.rounds" = 1 }
"""


def test_a_zipped_axis_sets_several_keys_and_claims_name_its_settings(tmp_path):
    claim = ('[[claims]]\nname = "x"\na = { schedule = "every_step", "model.norm" = "gn" }\n'
             'b = { schedule = "every_step", "model.norm" = "bn" }\n')
    base = load_scenario(scenario(tmp_path, sweep=ZIP, tail=claim,
                                  extra='scale = { "client.lr" = "client.batch_size" }'))
    assert base.sweep.grid["schedule"] == ["every_step", "every_20_steps"]
    cells = expand(base, tmp_path)
    assert len(cells) == 2 * 2 * 3 * 2
    every = [c for c in cells if c.params["schedule"] == "every_step"]
    assert every[0].name == "norm-bn__batch_size-2__seed-0__schedule-every_step"
    assert {(c.scenario.client.local_steps, c.scenario.server.rounds) for c in every} == {(1, 20)}
    rare = [c for c in cells if c.params["schedule"] == "every_20_steps"]
    assert {(c.scenario.client.local_steps, c.scenario.server.rounds) for c in rare} == {(20, 1)}
    check_claims(base, cells)  # the zipped axis is an axis like any other
    tuning = tune_cells(base, tmp_path, cells)
    assert len(tuning) == 8 * 2 * 2  # 8 arms (norm x batch x schedule) x 2 lr x 2 seeds
    small = [c for c in tuning if c.arm["client.batch_size"] == 2]
    large = [c for c in tuning if c.arm["client.batch_size"] == 32]
    # lr = grid value x batch size: the linear scaling rule, one grid for every batch size
    assert {c.scenario.client.lr for c in small} == {0.02, 0.2}
    assert {c.scenario.client.lr for c in large} == {0.32, 3.2}
    assert small[0].values == {"client.lr": 0.01} and small[0].applied == {"client.lr": 0.02}


@pytest.mark.parametrize(("zipped", "pattern"), [
    ('[sweep.zip.schedule]\na = { "model.norm" = "ln" }\n', "sets 'model.norm', which is also "
                                                            "a sweep axis"),
    ('[sweep.zip.model]\na = { "client.lr" = 0.1 }\n', "a zipped axis needs a name of its own"),
    ('[sweep.zip.schedule]\na = { "client.lr" = 0.1 }\n', "'client.lr' is also a sweep axis "
                                                          r"\(set by sweep.zip.schedule\)"),
    ('schedule = ["a"]\n[sweep.zip.schedule]\nb = { "client.lr" = 0.1 }\n',
     r"sweep.schedule = \['a'\] is also given: a zipped axis takes its values from "
     "sweep.zip.schedule alone"),
    ('[sweep.zip.schedule]\na = { "client.local_stepz" = 1 }\n',
     r"sweep.zip.schedule.a: .*unknown key 'client.local_stepz'"),
])
def test_bad_zipped_axes_are_refused(tmp_path, zipped, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        run_sweep(scenario(tmp_path, sweep=SWEEP + zipped), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _poisoned(monkeypatch):
    """The digits test set with random labels (the images and every training split kept)."""
    real = datasets._digits()
    rng = np.random.default_rng(0)
    bad = rng.permutation(real.test_y)
    while (bad == real.test_y).mean() > 0.2:
        bad = rng.permutation(real.test_y)
    bad.flags.writeable = False
    monkeypatch.setattr(datasets, "_digits", lambda: dataclasses.replace(real, test_y=bad))


def test_selection_never_reads_test_data_and_is_reproducible(tmp_path, monkeypatch):
    """A second sweep whose global test set has random labels chooses exactly what the first
    chose, from the same validation scores to the last bit: tuning depends on the seed and
    the validation split alone."""
    sweep = '[sweep]\nseed = [0]\nmodel.norm = ["gn"]\n'
    path = scenario(tmp_path, sweep=sweep, grid='"client.lr" = [0.001, 0.2]', seeds="[100]")
    runs = {}
    for name in ("real", "poisoned"):
        _build.cache_clear()
        if name == "poisoned":
            _poisoned(monkeypatch)
        run_sweep(path, out=tmp_path / name)
        runs[name] = json.loads((tmp_path / name / "report.json").read_text())["tuning"]
    _build.cache_clear()
    assert runs["poisoned"] == runs["real"]
    (arm,) = runs["real"]["arms"]
    low, high = arm["candidates"]
    assert high["mean"] > low["mean"]  # the grid's values differ: the choice is not a tie
    assert arm["chosen"]["values"] == {"client.lr": 0.2}

    def test_acc(name: str, cell: str) -> float:
        summary = json.loads((tmp_path / name / cell / "summary.json").read_text())
        return summary["final"]["global_test_accuracy"]

    cell = "tune/norm-gn__lr-0.2__seed-100"
    assert test_acc("poisoned", cell) != test_acc("real", cell)  # the poison took effect
    chosen = load_scenario(tmp_path / "poisoned" / "seed-0__norm-gn" / "scenario.toml")
    assert chosen.client.lr == 0.2 and chosen.seed == 0

    # resumable: a tuning cell lost is run again, alone; the reported cell stands
    lost = tmp_path / "real" / "tune" / "norm-gn__lr-0.001__seed-100"
    (lost / "summary.json").unlink()
    assert "2 of 3 cells done" in interrupted_line(path, out=tmp_path / "real")
    again = run_sweep(path, out=tmp_path / "real")
    assert again.ran == ["tune/norm-gn__lr-0.001__seed-100"]
    report = (tmp_path / "real" / "report.md").read_text()
    assert "## Tuning" in report and "| **0.2** |" in report and "## Budget" in report
    assert main(["report", str(tmp_path / "real")]) == 0  # rebuilt from the folders on disk
    rebuilt = json.loads((tmp_path / "real" / "report.json").read_text())
    assert rebuilt["tuning"] == runs["real"] and rebuilt["plateau"]["best_arm"] == "model.norm=gn"


STRATEGIES = """[sweep]
server.strategy = ["fedavg", "fedbn"]
seed = [0]
"""


@pytest.mark.parametrize(("follow", "pattern"), [
    ('{ fedbn = "fedprox" }', r"sweep.tune.follow.fedbn = 'fedprox': both must be values of one "
                              r"sweep axis \(axis server.strategy = \['fedavg', 'fedbn'\] "
                              r"lacks 'fedprox'\)"),
    ('{ scaffold = "fedavg" }', r"sweep.tune.follow.scaffold = 'fedavg': both must be values "
                                r"of one sweep axis \('scaffold' is a value of 0 axes\)"),
    ('{ fedbn = "fedavg", fedavg = "fedbn" }', "sweep.tune.follow.fedbn = 'fedavg' must name "
                                               "another value of the same axis, one that is "
                                               "tuned itself"),
    ('{ fedbn = "fedbn" }', "sweep.tune.follow.fedbn = 'fedbn' must name another value"),
])
def test_bad_follows_are_refused_before_any_cell_runs(tmp_path, follow, pattern):
    path = scenario(tmp_path, sweep=STRATEGIES, extra=f"follow = {follow}")
    with pytest.raises(ScenarioError, match=pattern):
        run_sweep(path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_follower_arm_runs_no_tuning_cells_and_takes_its_leaders_choice(tmp_path):
    """FedBN's global model lacks the clients' BN layers, so the validation split cannot
    rank its rates: with follow = { fedbn = "fedavg" } it runs at FedAvg's tuned rate."""
    path = scenario(tmp_path, base=BASE.replace('[model]\n', '[model]\nnorm = "bn"\n'),
                    sweep=STRATEGIES, grid='"client.lr" = [0.001, 0.2]', seeds="[100]",
                    extra='follow = { fedbn = "fedavg" }')
    base = load_scenario(path)
    cells = expand(base, tmp_path / "out")
    assert base.sweep.leader({"server.strategy": "fedbn"}) == {"server.strategy": "fedavg"}
    assert base.sweep.leader({"server.strategy": "fedavg"}) is None
    assert [c.name for c in tune_cells(base, tmp_path / "out", cells)] == [
        "tune/strategy-fedavg__lr-0.001__seed-100", "tune/strategy-fedavg__lr-0.2__seed-100"]
    result = run_sweep(path, out=tmp_path / "out")
    assert sorted(result.ran) == sorted([
        "tune/strategy-fedavg__lr-0.001__seed-100", "tune/strategy-fedavg__lr-0.2__seed-100",
        "strategy-fedavg__seed-0", "strategy-fedbn__seed-0"])
    tuning = json.loads((tmp_path / "out" / "report.json").read_text())["tuning"]
    lead, follower = tuning["arms"]
    assert lead["follows"] is None and len(lead["candidates"]) == 2
    assert follower == {"arm": {"server.strategy": "fedbn"}, "label": "server.strategy=fedbn",
                        "candidates": [], "chosen": lead["chosen"], "at_edge": [],
                        "follows": "server.strategy=fedavg", "why_none": None}
    ran = {name: load_scenario(tmp_path / "out" / name / "scenario.toml").client.lr
           for name in ("strategy-fedavg__seed-0", "strategy-fedbn__seed-0")}
    assert ran["strategy-fedbn__seed-0"] == ran["strategy-fedavg__seed-0"] == \
        lead["chosen"]["applied"]["client.lr"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| server.strategy=fedbn |" in report
    assert "not tuned: follows server.strategy=fedavg |" in report
    assert main(["report", str(tmp_path / "out")]) == 0  # rebuilt from the folders on disk
    rebuilt = json.loads((tmp_path / "out" / "report.json").read_text())["tuning"]
    assert rebuilt == tuning

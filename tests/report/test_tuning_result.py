"""Choosing each arm's values from tuning cells' summaries: the best mean over tuning seeds,
early stops never chosen, ties to the first value, grid edges flagged; the report table."""

import json

import pytest

from fedsim.config import TuneConfig
from fedsim.report.tuning import tuning_lines, tuning_result

GRID = {"client.lr": [0.01, 0.1, 1.0]}


def write_cells(root, scores, metric="validation_accuracy", stopped=(), dp_stopped=()):
    """One tuning cell per (arm, lr, seed) with its score (a finished folder: its scenario,
    rounds and summary); ``stopped``: cells that diverged."""
    cells = []
    for (norm, lr, seed), score in scores.items():
        name = f"tune/norm-{norm}__lr-{lr}__seed-{seed}"
        summary = {"final": {metric: score}}
        if (norm, lr, seed) in stopped:
            summary["stopped"] = {"round": 3, "reason": "round 3: the run diverged"}
        if (norm, lr, seed) in dp_stopped:
            summary["stopped"] = {"round": 3, "reason": "budget"}
            summary["dp"] = {"stopped": "budget"}
        if score is not None or (norm, lr, seed) in stopped:
            (root / name).mkdir(parents=True)
            (root / name / "scenario.toml").write_text(f'name = "t/{name}"\n')
            (root / name / "rounds.jsonl").write_text('{"round": 0}\n')
            (root / name / "summary.json").write_text(json.dumps(summary))
        cells.append({"name": name, "arm": {"model.norm": norm}, "values": {"client.lr": lr},
                      "applied": {"client.lr": lr}, "seed": seed})
    return cells


def tune(**kw):
    return TuneConfig(grid=GRID, seeds=(100, 101), **kw)


def test_each_arm_keeps_the_best_mean_over_its_tuning_seeds(tmp_path):
    scores = {("bn", 0.01, 100): 0.50, ("bn", 0.01, 101): 0.60,
              ("bn", 0.1, 100): 0.80, ("bn", 0.1, 101): 0.70,
              ("bn", 1.0, 100): 0.90, ("bn", 1.0, 101): 0.52,  # mean 0.71 < 0.75
              ("gn", 0.01, 100): 0.40, ("gn", 0.01, 101): 0.45,
              ("gn", 0.1, 100): 0.61, ("gn", 0.1, 101): 0.63,
              ("gn", 1.0, 100): 0.70, ("gn", 1.0, 101): 0.70}
    result = tuning_result(tmp_path, tune(), write_cells(tmp_path, scores))
    bn, gn = result["arms"]
    assert [c["mean"] for c in bn["candidates"]] == pytest.approx([0.55, 0.75, 0.71])
    assert bn["chosen"] == {"values": {"client.lr": 0.1}, "applied": {"client.lr": 0.1},
                            "mean": pytest.approx(0.75)}
    assert bn["candidates"][2]["per_seed"] == {"100": 0.90, "101": 0.52}
    assert bn["at_edge"] == []
    assert gn["chosen"]["values"] == {"client.lr": 1.0}
    assert gn["at_edge"] == ["client.lr = 1.0 is the grid's largest value"]
    lines = "\n".join(tuning_lines(result))
    assert "| model.norm=bn | 0.01 | 0.5500 | 0.5000 | 0.6000 |  |" in lines
    assert "|  | **0.1** | **0.7500** | 0.8000 | 0.7000 | **chosen** |" in lines
    assert "- model.norm=gn: client.lr = 1.0 is the grid's largest value: the best may lie " \
           "beyond the grid" in lines


def test_a_value_that_stopped_early_on_any_seed_is_never_chosen(tmp_path):
    scores = {("bn", 0.01, 100): 0.5, ("bn", 0.01, 101): 0.5,
              ("bn", 0.1, 100): 0.6, ("bn", 0.1, 101): 0.6,
              ("bn", 1.0, 100): 0.9, ("bn", 1.0, 101): 0.9}
    cells = write_cells(tmp_path, scores, stopped={("bn", 1.0, 101)},
                        dp_stopped={("bn", 0.1, 100)})  # a DP budget's stop is complete
    (arm,) = tuning_result(tmp_path, tune(), cells)["arms"]
    high = arm["candidates"][2]
    assert high["mean"] is None
    assert high["problems"] == ["seed 101 stopped at round 3: the run diverged"]
    assert arm["chosen"]["values"] == {"client.lr": 0.1}
    assert "seed 101 stopped at round 3" in "\n".join(tuning_lines(
        tuning_result(tmp_path, tune(), cells)))


def test_ties_go_to_the_value_listed_first_and_min_metrics_pick_the_lowest(tmp_path):
    scores = {("bn", lr, s): v for lr, v in ((0.01, 0.7), (0.1, 0.7), (1.0, 0.6))
              for s in (100, 101)}
    (arm,) = tuning_result(tmp_path, tune(), write_cells(tmp_path, scores))["arms"]
    assert arm["chosen"]["values"] == {"client.lr": 0.01}
    assert arm["at_edge"] == ["client.lr = 0.01 is the grid's smallest value"]
    loss = tmp_path / "loss"
    loss.mkdir()
    cells = write_cells(loss, scores, metric="validation_loss")
    (arm,) = tuning_result(loss, tune(metric="final.validation_loss"), cells)["arms"]
    assert arm["chosen"]["values"] == {"client.lr": 1.0}


def test_unfinished_cells_leave_their_value_unscored(tmp_path):
    scores = {("bn", 0.01, 100): 0.5, ("bn", 0.01, 101): None,
              ("bn", 0.1, 100): None, ("bn", 0.1, 101): None,
              ("bn", 1.0, 100): None, ("bn", 1.0, 101): None}
    (arm,) = tuning_result(tmp_path, tune(), write_cells(tmp_path, scores))["arms"]
    assert arm["chosen"] is None and arm["candidates"][0]["problems"] == ["seed 101 unfinished"]
    assert arm["why_none"] == "no value finished on every tuning seed with the metric"


def test_a_damaged_cell_leaves_its_value_unscored_and_is_told(tmp_path):
    scores = {("bn", lr, s): 0.5 + lr / 10 for lr in GRID["client.lr"] for s in (100, 101)}
    cells = write_cells(tmp_path, scores)
    (tmp_path / cells[5]["name"] / "summary.json").write_text('{"final": ')  # lr 1.0, seed 101
    told = []
    (arm,) = tuning_result(tmp_path, tune(), cells, warn=told.append)["arms"]
    why = "summary.json: not JSON (Expecting value: line 1 column 11 (char 10))"
    assert arm["candidates"][2]["problems"] == [f"seed 101 damaged ({why})"]
    assert arm["candidates"][2]["mean"] is None and arm["chosen"]["values"] == {"client.lr": 0.1}
    assert told == [f"tuning cell {cells[5]['name']} is damaged and left unscored ({why})"]

"""Every shipped scenario loads and passes the pre-training checks (data, model, engine)."""

import dataclasses
from pathlib import Path

import pytest

from fedsim.config import ModelConfig, ServerConfig, load_scenario
from fedsim.report.claims import check_claims
from fedsim.run import preflight
from fedsim.sweep import expand

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))
STUDIES = sorted((ROOT / "scenarios" / "studies").glob("*.toml"))


def test_the_shipped_scenarios_are_all_here():
    assert {p.stem for p in SCENARIOS} >= {"quickstart", "thousand_clients", "norm_sweep"}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenario_passes_preflight(path, tmp_path):
    scenario = load_scenario(path)
    if scenario.sweep.grid:  # every cell of a sweep scenario
        cells = expand(scenario, tmp_path)
        assert cells
        for cell in cells:
            preflight(cell.scenario)
    else:
        preflight(scenario)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_studies_are_all_here():
    assert {p.stem for p in STUDIES} >= {"norms_label_skew", "norms_leakage", "bn_small_batch",
                                         "hybrid_alpha", "norms_regimes", "bn_statistics",
                                         "in_label_vs_feature", "small_batch_protocol"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_cells_and_claims_pass_the_checks_a_sweep_makes_first(path, tmp_path):
    """What ``fedsim sweep`` checks before any cell runs: every cell validates, and every
    claim names axes, values and metrics the cells have (preflight of one cell per study
    keeps this fast; the sweep preflights them all)."""
    if path.stem == "bn_statistics" and not {"bn_statistics", "bn_eval"} <= (
            _fields(ServerConfig) | _fields(ModelConfig)):
        pytest.skip("bn_statistics.toml sets server.bn_statistics and model.bn_eval, which "
                    "fedsim.config does not define in this tree")
    study = load_scenario(path)
    assert study.claims, "a study states what it tests"
    cells = expand(study, tmp_path)
    check_claims(study, cells)
    preflight(cells[0].scenario)

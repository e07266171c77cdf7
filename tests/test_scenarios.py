"""Every shipped scenario loads and passes the pre-training checks (data, model, engine)."""

from pathlib import Path

import pytest

from fedsim.config import load_scenario
from fedsim.run import preflight
from fedsim.sweep import expand

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))


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

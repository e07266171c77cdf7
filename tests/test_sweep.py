"""``fedsim sweep``: grid expansion, resumability, report.md, and the Claims logic."""

import json
import shutil

import pytest
import torch

from fedsim.cli import main
from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.report.report import (
    add_matched_accuracy,
    claim_hybrid_alpha,
    claim_mia,
    claim_non_iid,
    claim_small_batches,
    direction,
)
from fedsim.sweep import cell_name, expand, run_sweep

TINY = ["server.rounds=2", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.2", "model.width=8", "client.epochs=1",
        "privacy.mia=[\"loss\"]", "privacy.audit_every=1",
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
    assert "## Claims" in report
    for n in (1, 2, 3, 4):
        assert f"\n{n}. **" in report
    assert "| bn |" in report and "| ln |" in report
    assert "not addressed" in report  # no batch-size axis: claims 1 and 3 say so
    assert (out / "accuracy.png").is_file() and (out / "mia.png").is_file()

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


# --------------------------------------------------------------------------- claims logic


def row(norm, seed, batch=32, alpha=0.1, **metrics):
    params = {"model.norm": norm, "client.batch_size": batch, "partition.alpha": alpha,
              "seed": seed}
    return {"params": params, "model.norm": norm, "seed": seed, "client.batch_size": batch,
            "partition.kind": "dirichlet", "partition.alpha": alpha, "mia_by_round": [],
            **metrics}


def test_direction_needs_the_difference_to_exceed_its_spread():
    assert direction([0.10, 0.12, 0.11]) == 1
    assert direction([-0.10, -0.12, -0.11]) == -1
    assert direction([0.10, -0.05, 0.02]) == 0
    assert direction([0.5]) == 0  # one seed: no spread, no verdict


def batch_rows(bn_small, gn_small):
    """BN and GN at batch 4 and 32 over three seeds; accuracy at batch 32 is 0.9."""
    rows = []
    for s, noise in enumerate((-0.01, 0.0, 0.01)):
        rows += [row("bn", s, 32, acc=0.9 + noise), row("gn", s, 32, acc=0.9 + noise),
                 row("bn", s, 4, acc=bn_small + noise), row("gn", s, 4, acc=gn_small + noise)]
    return rows


def test_claim_1_supported_contradicted_inconclusive_and_not_addressed():
    assert claim_small_batches(batch_rows(bn_small=0.7, gn_small=0.9)).verdict == "supported"
    assert claim_small_batches(batch_rows(bn_small=0.9, gn_small=0.7)).verdict == "contradicted"
    rows = batch_rows(bn_small=0.7, gn_small=0.9)
    for r in rows:  # seed-dependent noise larger than the effect
        if r["model.norm"] == "bn" and r["client.batch_size"] == 4:
            r["acc"] += (-0.4, 0.3, 0.0)[r["seed"]]
    assert claim_small_batches(rows).verdict == "inconclusive"
    one_batch = [r for r in batch_rows(0.7, 0.9) if r["client.batch_size"] == 32]
    claim = claim_small_batches(one_batch)
    assert claim.verdict == "not addressed" and "batch_size" in claim.evidence[-1]


def test_claim_2_uses_only_non_iid_settings():
    def rows(gn_minus_bn, alpha):
        return [r for s, e in enumerate((-0.01, 0.0, 0.01))
                for r in (row("bn", s, alpha=alpha, acc=0.8 + e),
                          row("gn", s, alpha=alpha, acc=0.8 + gn_minus_bn + 2 * e),
                          row("in", s, alpha=alpha, acc=0.8 + gn_minus_bn - e))]
    assert claim_non_iid(rows(+0.1, 0.1)).verdict == "supported"
    assert claim_non_iid(rows(-0.1, 0.1)).verdict == "contradicted"
    assert claim_non_iid(rows(+0.001, 0.1)).verdict == "inconclusive"
    assert claim_non_iid(rows(+0.1, 100.0)).verdict == "not addressed"  # IID only
    mixed = rows(+0.1, 0.1) + rows(-0.1, 0.5)
    assert claim_non_iid(mixed).verdict == "inconclusive"  # settings disagree


def test_claim_3_reads_alpha_drift_by_batch_size():
    def rows(large, small):
        return [r for s, e in enumerate((-0.002, 0.0, 0.002))
                for r in (row("hybrid", s, 64, alpha_drift=large + e),
                          row("hybrid", s, 2, alpha_drift=small + e))]
    assert claim_hybrid_alpha(rows(0.05, -0.05)).verdict == "supported"
    assert claim_hybrid_alpha(rows(-0.05, -0.05)).verdict == "contradicted"
    assert claim_hybrid_alpha(rows(0.05, 0.0)).verdict == "inconclusive"
    assert claim_hybrid_alpha([row("bn", 0, alpha_drift=None)]).verdict == "not addressed"


def test_claim_4_compares_bn_and_ln_at_matched_rounds_and_accuracy():
    def rows(bn_auc, ln_auc):
        out = []
        for s, e in enumerate((-0.002, 0.0, 0.002)):
            for norm, auc in (("bn", bn_auc), ("ln", ln_auc)):
                r = row(norm, s, **{"mia.loss.auc": auc + e})
                r["mia_by_round"] = [
                    {"round": 1, "global_test_accuracy": 0.5, "loss": {"auc": auc - 0.05 + e,
                                                                       "tpr_at_fpr_1e-3": 0}},
                    {"round": 2, "global_test_accuracy": 0.8, "loss": {"auc": auc + e,
                                                                       "tpr_at_fpr_1e-3": 0}}]
                out.append(r)
        add_matched_accuracy(out)
        return out
    claim = claim_mia(rows(0.6, 0.55))
    assert claim.verdict == "supported"
    assert any("matched accuracy" in e for e in claim.evidence)
    assert any("batch-size half cannot be addressed" in e for e in claim.evidence)
    assert claim_mia(rows(0.55, 0.6)).verdict == "contradicted"
    assert claim_mia(rows(0.6, 0.6)).verdict == "inconclusive"
    assert claim_mia([row("bn", 0, acc=0.9)]).verdict == "not addressed"


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

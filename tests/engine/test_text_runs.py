"""scenarios/shakespeare.toml at tiny size: whole runs on token windows, sequential and in
vectorized cohorts (the same model), perplexity, and the privacy audits on text."""

import json
import math

import pytest
import torch

import fedsim
from fedsim.errors import ScenarioError

SCENARIO = "scenarios/shakespeare.toml"
TINY = ["partition.num_clients=4", "partition.max_clients=4", "server.clients_per_round=3",
        "server.rounds=2", "client.local_steps=3", "client.batch_size=8", "model.width=16",
        "model.layers=1", "data.seq_len=20", "data.test_samples=40", "output.eval_samples=16",
        "output.eval_clients=2", "client.lr=0.3"]


@pytest.mark.parametrize("arch,norm", [("transformer", "ln"), ("transformer", "bn"),
                                       ("lstm", "rms")])
def test_vectorized_text_run_matches_sequential_run(tmp_path, arch, norm):
    tiny = TINY + [f"model.arch={arch}", f"model.norm={norm}"]
    a = fedsim.run(SCENARIO, tiny, out=tmp_path / "seq")
    b = fedsim.run(SCENARIO, tiny + ["engine.vectorize=true", "engine.cohort_size=2"],
                   out=tmp_path / "vec")
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    assert set(sa) == set(sb)
    # 6 SGD steps per client in float32: summation orders of batched kernels differ
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    assert a.summary["timing"]["client_updates"] == b.summary["timing"]["client_updates"] == 6
    final = a.summary["final"]
    assert final["global_test_perplexity"] == pytest.approx(math.exp(final["global_test_loss"]))
    assert 1 < final["global_test_perplexity"] < 80  # it learned: below a uniform guess
    assert final["client_perplexity"]["n"] == 2
    rounds = [json.loads(line) for line in (a.path / "rounds.jsonl").read_text().splitlines()]
    assert all("global_test_perplexity" in r for r in rounds)


@pytest.mark.parametrize("arch,norm", [("lstm", "rms"), ("transformer", "ln")])
def test_dpsgd_on_text_in_vectorized_cohorts_matches_sequential_run(tmp_path, arch, norm):
    """DP-SGD on token windows: per-sample gradients nested in the cohort's vmap (the LSTM's
    fused kernel, attention) give the sequential run's model, each client's noise from its
    own generator on both, and the same ε."""
    tiny = TINY + [f"model.arch={arch}", f"model.norm={norm}", "client.dp.noise_multiplier=0.5"]
    a = fedsim.run(SCENARIO, tiny, out=tmp_path / "seq")
    b = fedsim.run(SCENARIO, tiny + ["engine.vectorize=true", "engine.cohort_size=2"],
                   out=tmp_path / "vec")
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    for k in sa:  # as the non-private text runs: float32 summation orders differ
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    assert a.summary["client_dp"] == b.summary["client_dp"]
    assert a.summary["timing"]["client_updates"] == b.summary["timing"]["client_updates"] == 6


def test_privacy_audits_on_text(tmp_path):
    """Membership inference on the global model and per upload, the leakage report, and
    canary exposure on the global model and the canary clients' uploads."""
    result = fedsim.run(SCENARIO, TINY + [
        'privacy.audits=["mia", "client_mia", "leakage", "exposure"]',
        "model.norm=bn", "server.clients_per_round=4", "privacy.exposure.canaries=2",
        "privacy.exposure.repeats=4", "privacy.exposure.digits=2"], out=tmp_path / "p")
    privacy = result.summary["privacy"]
    assert 0 <= privacy["mia"]["loss"]["auc"] <= 1
    assert privacy["client_mia"]["auc"]["n"] == 4
    assert privacy["leakage"]["running_stats_uploaded"] is True
    exposure = privacy["exposure"]
    assert exposure["space"] == 100 and exposure["method"] == "exact"
    assert exposure["max_exposure"] == pytest.approx(math.log2(100))
    rows = exposure["global"]["per_canary"]
    assert [r["client"] for r in rows] == [0, 1] and exposure["global"]["round"] == 2
    for r in rows + exposure["upload"]["per_canary"]:
        assert r["exposure"] == pytest.approx(math.log2(100) - math.log2(r["rank"]))
    assert len(exposure["upload"]["per_canary"]) == 2  # every client was sampled


def test_inversion_and_image_archs_are_refused_on_text(tmp_path):
    with pytest.raises(ScenarioError, match="'inversion', which reconstructs images"):
        fedsim.run(SCENARIO, TINY + ['privacy.audits=["inversion"]'], out=tmp_path / "a")
    with pytest.raises(ScenarioError, match="model.arch = 'mlp' reads images"):
        fedsim.run(SCENARIO, TINY + ["model.arch=mlp"], out=tmp_path / "b")
    with pytest.raises(ScenarioError, match="privacy.exposure plants secrets"):
        fedsim.run("scenarios/quickstart.toml", ['privacy.audits=["exposure"]'],
                   out=tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_resume_keeps_exposure_captured_before_the_interruption(tmp_path):
    """Exposure on the global model of rounds 1-2 and on the uploads of round 1 was measured
    before the kill: the checkpoint carries it, and the resumed run equals the whole one, its
    captures bit for bit."""
    import shutil

    from same_run import records, same_bits  # tests/same_run.py

    from fedsim.checkpoint import read_checkpoint

    audit = TINY + ["server.rounds=3", 'privacy.audits=["exposure"]',
                    "privacy.exposure.canaries=2", "privacy.exposure.every=1",
                    "privacy.exposure.round=1", "privacy.exposure.digits=2",
                    "server.clients_per_round=4"]
    ref = fedsim.run(SCENARIO, audit, out=tmp_path / "ref").path
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)  # as a kill right after round 2's checkpoint leaves it
    for name in ("summary.json", "model.pt", "learning_curves.png", "checkpoint.pt"):
        (cut / name).unlink()
    (cut / "checkpoint.prev.pt").rename(cut / "checkpoint.pt")
    resumed = fedsim.resume(cut)
    assert resumed.summary["resumed_from"] == [2]
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (ref, cut))
    assert all(torch.equal(a[k], b[k]) for k in a) and records(ref) == records(cut)
    pa, pb = (json.loads((p / "summary.json").read_text())["privacy"] for p in (ref, cut))
    assert [r["round"] for r in pb["exposure"]["global_by_round"]] == [1, 2, 3]
    assert pb["exposure"]["upload"]["round"] == 1
    assert pa["exposure"] == pb["exposure"]
    ca, cb = (read_checkpoint(p / "checkpoint.pt").privacy for p in (ref, cut))
    assert same_bits(ca, cb) and len(ca["audits"]["exposure"]["global"]) == 3

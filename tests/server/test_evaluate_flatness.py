"""``output.sharpness``: flatness of the global model at every evaluated round, end to end,
and exactly the same after ``--resume``."""

import json
import math
import shutil

import fedsim

TINY = ["server.rounds=3", "output.eval_every=2", "partition.num_clients=6",
        "server.clients_per_round=3", "partition.holdout_clients=0.2", "client.epochs=1",
        "model.width=8", "output.sharpness=true", "output.sharpness_samples=64",
        "output.sharpness_iters=5", "output.sharpness_draws=2"]
TIMING = {"seconds", "train_seconds"}


def records(path):
    lines = (path / "rounds.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def test_flatness_is_recorded_at_evaluated_rounds_and_survives_resume(tmp_path):
    ref = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "ref").path
    rounds = records(ref)
    evaluated = [r for r in rounds if "global_test_accuracy" in r]
    assert [r["round"] for r in evaluated] == [0, 2, 3]  # eval_every and the last round
    assert all("hessian_max_eig" not in r for r in rounds if r not in evaluated)
    for r in evaluated:
        assert math.isfinite(r["hessian_max_eig"]) and r["hessian_max_eig"] > 0
        assert math.isfinite(r["sharpness"])
    final = json.loads((ref / "summary.json").read_text())["final"]
    assert final["hessian_max_eig"] == evaluated[-1]["hessian_max_eig"]
    assert final["sharpness"] == evaluated[-1]["sharpness"]

    # killed after round 2's checkpoint: round 3 (evaluated) is measured again on resume
    out = shutil.copytree(ref, tmp_path / "resumed")
    for name in ("summary.json", "model.pt", "learning_curves.png", "checkpoint.pt"):
        (out / name).unlink()
    (out / "checkpoint.prev.pt").rename(out / "checkpoint.pt")
    resumed = fedsim.resume(out)
    assert resumed.summary["resumed_from"] == [2]
    assert records(out) == rounds
    assert resumed.summary["final"] == final

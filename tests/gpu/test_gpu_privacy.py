"""The privacy audits run on the GPU: membership inference with shadow federations, what
leaves the client (BN buffers), gradient inversion, and DP-SGD with its accountant."""

import math

from audit_settings import TINY, audit  # tests/audit_settings.py

import fedsim

AUDIT = audit("loss", "lira")


def in_unit(x):
    return x is not None and 0.0 <= x <= 1.0


def test_every_audit_runs_on_the_device(tmp_path, on_device):
    result = fedsim.run("scenarios/quickstart.toml", TINY + AUDIT + ["model.norm=bn"] + on_device,
                        out=tmp_path / "audit")
    p = result.summary["privacy"]
    assert set(p["mia"]) == {"loss", "lira_online", "lira_offline"}
    for metrics in p["mia"].values():
        assert in_unit(metrics["auc"]) and metrics["best_balanced_accuracy"] >= 0.5
    assert [r["round"] for r in p["mia_by_round"]] == [1, 2]
    assert p["shadows"]["count"] == 2
    assert len(p["client_mia"]["per_client"]) == 3 and in_unit(p["client_mia"]["auc"]["mean"])
    inv = p["inversion"]
    assert math.isfinite(inv["psnr_db"]) and -1 <= inv["ssim"] <= 1
    assert inv["objective"] == min(inv["restart_objectives"])
    leak = p["leakage"]
    assert leak["running_stats_uploaded"] is True
    assert leak["data_mean_recovery"]["abs_error"] >= 0


def test_dpsgd_trains_and_is_accounted_on_the_device(tmp_path, on_device):
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["model.norm=gn", "client.dp.noise_multiplier=1.0",
                                "client.dp.max_grad_norm=1.0"] + on_device,
                        out=tmp_path / "dp")
    dp = result.summary["client_dp"]
    assert dp["epsilon"]["clients"] >= 3 and 0 < dp["epsilon"]["max"] < math.inf
    assert dp["noise_multiplier"] == {"min": 1.0, "max": 1.0}
    assert math.isfinite(result.summary["final"]["global_test_accuracy"])

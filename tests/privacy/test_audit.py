"""The privacy audit wired into a run: summary keys, ranges, PNGs, pools and shadow federations."""

import json

import numpy as np
import pytest
from audit_settings import TINY, audit, audits  # tests/audit_settings.py

import fedsim
from fedsim.config import load_scenario
from fedsim.context import RunContext
from fedsim.data.federated import build_federated_data
from fedsim.errors import ScenarioError
from fedsim.privacy.audits.pool import MembershipPool, ShadowData
from fedsim.server.audits import train_federation

AUDIT = audit("loss", "lira", "rmia")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "bn"
    return fedsim.run("scenarios/quickstart.toml", TINY + AUDIT + [
        "model.norm=bn", audits("mia", "client_mia", "leakage", "inversion", "client_membership"),
        "privacy.mia.population=100"], out=out)


def in_unit(x):
    return x is not None and 0.0 <= x <= 1.0


def test_summary_has_every_privacy_key_in_range(audited):
    p = json.loads((audited.path / "summary.json").read_text())["privacy"]
    assert set(p["mia"]) == {"loss", "lira_online", "lira_offline", "rmia"}
    pool = p["mia_pool"]
    assert 100 <= pool["nonmembers"] < 1000
    for metrics in p["mia"].values():
        for key in ("auc", "balanced_accuracy", "best_balanced_accuracy", "tpr_at_fpr_1e-2"):
            assert in_unit(metrics[key]), key
        assert metrics["best_balanced_accuracy"] >= 0.5  # the best threshold: never below chance
        # fewer than 1,000 non-members: no TPR at 0.1% FPR, and why
        assert metrics["tpr_at_fpr_1e-3"] is None
        assert metrics["null_because"]["tpr_at_fpr_1e-3"].startswith(
            f"{pool['nonmembers']} non-members: an FPR of 0.001 needs at least 1000")
    assert [r["round"] for r in p["mia_by_round"]] == [1, 2] and p["mia_round"] == 2
    assert pool["members"] == pool["nonmembers"] > 0 and pool["clients"] == 5
    assert pool["population"] == 100 and pool["rmia_a"] == 0.3 and pool["rmia_gamma"] == 1.0
    assert "use privacy.mia.population >= 1000" in pool["population_warning"]
    assert "membership_epsilon" not in p  # no DP, no accountant to compare with
    cm = p["client_membership"]  # 6 clients, 1 held out, 3 of 5 sampled in each of 2 rounds
    assert cm["unit"] == "client" and cm["members"] + cm["nonmembers"] == 6
    assert cm["nonmembers"] >= 1 and in_unit(cm["auc"])
    assert p["shadows"]["count"] == 2 and p["shadows"]["engine"] == "inprocess"
    assert p["shadows"]["fix_variance"] is True  # LiRA's option, reported with the shadows
    cm = p["client_mia"]
    assert cm["round"] == 2 and cm["auc"]["n"] == 3 and len(cm["per_client"]) == 3
    assert in_unit(cm["auc"]["mean"]) and in_unit(cm["auc"]["p90"])
    inv = p["inversion"]
    assert inv["bn_mode"] == "train" and inv["bn_buffers_shared"] is True
    assert inv["bn_prior_layers"] == 2 and inv["batch_size"] == 2
    assert inv["target"] == "step" and inv["local_steps"] == 1 and inv["restarts"] == 4
    assert inv["objective"] == min(inv["restart_objectives"])
    assert np.isfinite(inv["psnr_db"]) and -1 <= inv["ssim"] <= 1 and in_unit(inv["label_accuracy"])
    leak = p["leakage"]
    assert leak["running_stats_uploaded"] is True
    assert {"weight", "bias", "running_mean", "running_var"} <= set(leak["uploaded"])
    rec = leak["data_mean_recovery"]
    assert rec["applies_to"].startswith("output of features.0") and rec["abs_error"] >= 0
    assert (audited.path / "privacy_roc.png").stat().st_size > 1000
    assert (audited.path / "privacy_inversion.png").stat().st_size > 1000


def test_norms_without_running_statistics_upload_none(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["server.rounds=1", "model.norm=gn", audits("leakage")],
                        out=tmp_path / "gn")
    leak = result.summary["privacy"]["leakage"]
    assert leak["running_stats_uploaded"] is False and leak["data_mean_recovery"] is None
    assert set(leak["uploaded"]) == {"weight", "bias"}
    assert "mia" not in result.summary["privacy"]


def test_one_local_batch_reveals_the_clients_data_mean_exactly(tmp_path):
    # batch 512 > any client: one batch per round, so BN buffers hold that batch's statistics
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["server.rounds=2", "model.norm=bn", "model.width=16",
                                "client.batch_size=512", audits("leakage")],
                        out=tmp_path / "bn")
    rec = result.summary["privacy"]["leakage"]["data_mean_recovery"]
    assert rec["method"] == "taps" and rec["abs_error"] < 1e-5 < rec["baseline_abs_error"]


@pytest.mark.parametrize(("extra", "pattern"), [
    ([audits("mia"), 'privacy.mia.attacks=["lossy"]'],
     r"unknown membership attack in privacy.mia.attacks = 'lossy' \(did you mean 'loss'\?\)"),
    ([audits("mai")], r"unknown privacy audit in privacy.audits = 'mai' \(did you mean 'mia'\?\)"),
    ([audits("inversion"), "privacy.inversion.client=99"], "not a client"),
    ([audits("client_mia"), "privacy.client_mia.round=9"], "privacy.client_mia.round = 9"),
    ([audits("leakage"), "privacy.leakage.round=9"], "privacy.leakage.round = 9"),
    ([audits("inversion"), "privacy.inversion.round=9"], "privacy.inversion.round = 9"),
    ([audits("mia"), 'privacy.mia.attacks=["lira"]', "privacy.mia.shadows=1"],
     "privacy.mia.shadows = 1 .* lira need >= 2 shadows"),
    ([audits("mia"), 'privacy.mia.attacks=["loss","rmia"]', "privacy.mia.shadows=1"],
     "privacy.mia.shadows = 1 .* rmia need >= 2 shadows"),
    ([audits("mia"), 'privacy.mia.attacks=["rmia"]', "privacy.mia.population=5000"],
     "privacy.mia.population = 5000 exceeds the 360 examples"),
    (["privacy.inversion.bn_mode=test"], "privacy.inversion.bn_mode"),
    (["privacy.mia.rmia.a=1.5"], "privacy.mia.rmia.a"),
    (["privacy.mia.rmia.gamma=0"], "privacy.mia.rmia.gamma"),
    (["privacy.mia.attacks=[]"], "privacy.mia.attacks"),
    (["privacy.audit_confidence=1.0"], "privacy.audit_confidence"),
    (["privacy.inversion.restarts=0"], "privacy.inversion.restarts"),
    (["privacy.inversion.target=upload"], "privacy.inversion.target"),
    ([audits("inversion", "inversion")], "name each audit once"),
    ([audits("inversion"), "privacy.inversion.target=update", "model.norm=bn",
      "privacy.inversion.batch=2", "client.batch_size=1"], "leaves no local step"),
    ([audits("inversion"), "client.compress=qsgd"], "uncompressed gradient"),
    (["privacy.plugins.inversion.steps=3"], r"privacy.plugins.inversion configures the "
     r"'inversion' privacy audit, which privacy.audits = \[\] does not name"),
    ([audits("inversion"), "privacy.plugins.inversion.steps=3"],
     r"configured in \[privacy.inversion\]; move the table there"),
    ([audits("client_membership"), "privacy.plugins.client_membership.x=1"],
     "the 'client_membership' privacy audit takes no options"),
])
def test_bad_privacy_input_fails_before_writing(tmp_path, extra, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        fedsim.run("scenarios/quickstart.toml", TINY + extra, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_update_inversion_attacks_the_real_upload(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["model.norm=bn", "client.batch_size=2", "client.epochs=2",
                                audits("inversion"), "privacy.inversion.target=update",
                                "privacy.inversion.batch=3", "privacy.inversion.steps=10",
                                "privacy.inversion.restarts=2"], out=tmp_path / "upd")
    inv = result.summary["privacy"]["inversion"]
    # 3 images in batches of 2: the trailing singleton is dropped, 1 step per epoch
    assert inv["target"] == "update" and inv["local_steps"] == 2 and inv["batch_size"] == 3
    assert inv["restarts"] == 2 and len(inv["restart_objectives"]) == 2
    assert inv["objective"] == min(inv["restart_objectives"]) and inv["bn_prior_layers"] == 2
    assert np.isfinite(inv["psnr_db"]) and "batch assignment" in inv["attacker_knows"]


def test_update_inversion_attacks_the_compressed_upload(tmp_path, monkeypatch):
    """With client.compress, the attacker's observed update is the decoded upload: the same
    compressor and derived randomness as the client's hook (top-k keeps k entries)."""
    import fedsim.privacy.audits.inversion as audit_module
    from fedsim.client.compress import topk_count

    seen = []
    real = audit_module.invert_update

    def spy(model, update, *args, **kwargs):
        seen.append([u.clone() for u in update])
        return real(model, update, *args, **kwargs)

    monkeypatch.setattr(audit_module, "invert_update", spy)
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["client.batch_size=2", "client.epochs=1",
                                "client.compress=topk", "client.compress_ratio=0.1",
                                audits("inversion"), "privacy.inversion.target=update",
                                "privacy.inversion.batch=2", "privacy.inversion.steps=5",
                                "privacy.inversion.restarts=1"], out=tmp_path / "topk")
    (update,) = seen
    assert [int((u != 0).sum()) for u in update] == \
        [min(u.numel(), topk_count(u.numel(), 0.1)) for u in update]
    assert "topk-compressed" in result.summary["privacy"]["inversion"]["attacker_knows"]


def test_holdout_inversion_client_is_refused(tmp_path):
    scn = load_scenario("scenarios/quickstart.toml", TINY)
    holdout = build_federated_data(scn).holdout[0]
    with pytest.raises(ScenarioError, match="holdout client"):
        fedsim.run(scn, [audits("inversion"), f"privacy.inversion.client={holdout}"],
                   out=tmp_path / "x")


def test_pool_is_balanced_per_client_and_shadows_keep_client_structure():
    scn = load_scenario("scenarios/quickstart.toml", TINY + ["partition.test_fraction=0.2"])
    data = build_federated_data(scn)
    pool = MembershipPool.build(data, scn.seed)
    assert pool.clients == data.participating
    masks = pool.shadow_masks(4, scn.seed)
    shadows = [ShadowData.for_shadow(data, pool, masks, i) for i in range(4)]
    for cid in pool.clients:
        k = len(pool.members[cid])
        assert k == len(pool.nonmembers[cid]) == min(len(data.client_train(cid)[1]),
                                                      len(data.client_test(cid)[1]))
        assert (masks[cid].sum(axis=0) == 2).all()  # every pool example IN for half the shadows
        sizes = []
        for s in shadows:
            x, y = s.client_train(cid)
            sizes.append(len(y))
            # every training sample comes from this client's own data
            own = np.concatenate([data.client_train(cid)[0].numpy(),
                                  data.client_test(cid)[0].numpy()]).reshape(-1, 64)
            assert all((own == row).all(axis=1).any() for row in x.numpy().reshape(-1, 64))
        # as many samples as the real client on average over the shadows
        assert np.mean(sizes) == len(data.client_train(cid)[1])


def test_shadow_federation_runs_through_the_engine_without_holdout_clients():
    scn = load_scenario("scenarios/quickstart.toml", TINY + ["server.rounds=2"])
    data = build_federated_data(scn)
    pool = MembershipPool.build(data, scn.seed)
    shadow = ShadowData.for_shadow(data, pool, pool.shadow_masks(2, scn.seed), 0)
    seen: dict[int, list[int]] = {}

    def on_replies(rnd, replies, _arrays):
        seen[rnd] = [int(m.content.config_records["client"]["client-id"]) for m in replies]

    train_federation(RunContext.build(scn, shadow), on_replies)
    assert seen[0] == [] and len(seen[1]) == len(seen[2]) == 3
    assert not set(seen[1] + seen[2]) & set(data.holdout)


@pytest.mark.parametrize("dp,unit,eps_at", [
    # client level, fixed-size cohorts (replace-one): one changed sample is one replaced client
    (["server.dp.kind=fixed", "server.dp.noise_multiplier=1.0"], "client",
     ("dp", "privacy_spent", "epsilon")),
    (["client.dp.noise_multiplier=1.0", "model.norm=gn"], "sample",  # DP-SGD: same unit
     ("client_dp", "epsilon", "max")),
])
def test_membership_epsilon_never_exceeds_the_accountants(tmp_path, dp, unit, eps_at):
    result = fedsim.run("scenarios/quickstart.toml", TINY + [audits("mia"), *dp],
                        out=tmp_path / "dp")
    summary = json.loads((result.path / "summary.json").read_text())
    eps = summary[eps_at[0]][eps_at[1]][eps_at[2]]
    found = summary["privacy"]["membership_epsilon"]
    assert found["accountant_epsilon"] == eps and found["accountant_unit"] == unit
    assert found["accountant_from"] == ".".join(eps_at)
    assert found["unit"] == "sample" and found["comparable_epsilon"] == eps
    assert found["valid_for_one_run"] is False
    loss = found["loss"]
    assert 0.0 <= loss["epsilon_if_independent"] <= eps
    assert loss["n_members"] == summary["privacy"]["mia_pool"]["members"]

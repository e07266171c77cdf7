"""A membership attack and an audit registered from this file alone run in a scenario: named
in ``privacy.mia.attacks`` / ``privacy.audits``, configured in their own tables, their needs
met, their bad options refused at the edge — with no edit anywhere else."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from audit_settings import TINY, audits  # tests/audit_settings.py
from flwr.app import ArrayRecord
from sklearn.metrics import roc_auc_score

import fedsim
from fedsim.arrays import record_to_state
from fedsim.config import load_scenario
from fedsim.data.federated import build_federated_data
from fedsim.errors import ScenarioError
from fedsim.privacy.attacks.base import MIA_ATTACKS, MembershipAttack, MiaInputs, register_attack
from fedsim.privacy.audits import Audit, RoundView, register_audit
from fedsim.privacy.audits.base import SHADOWS, UPLOADS
from fedsim.privacy.audits.pool import MembershipPool

SEEN: list[tuple[MiaInputs, object]] = []  # what the toy attack was given, per audited round


@dataclass(frozen=True)
class GapOptions:
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ScenarioError(f"privacy.mia.plugins.shadow_gap.scale = {self.scale!r} is "
                                "out of range; it must be > 0")


@register_attack("shadow_gap")
class ShadowGap(MembershipAttack):
    """Difficulty calibration (Watson et al., ICLR 2022): the target's confidence minus the
    mean confidence of the shadows the example was OUT of, times ``scale``."""

    needs = frozenset({SHADOWS})
    options = GapOptions

    @staticmethod
    def scores(inputs: MiaInputs, options: GapOptions) -> dict[str, np.ndarray]:
        SEEN.append((inputs, options))
        out = ~inputs.shadow_in
        mean_out = (inputs.shadow_conf * out).sum(axis=0) / out.sum(axis=0)
        return {"shadow_gap": options.scale * (inputs.confidences - mean_out)}


@dataclass(frozen=True)
class NormOptions:
    last: int = 0  # record the rounds after this one (0: all)


@register_audit("upload_norms")
class UploadNorms(Audit):
    """The L2 norm of every accepted update (sent − uploaded), per round."""

    options = NormOptions
    summary = {"upload_norms": ""}

    @classmethod
    def needs(cls, scenario, options) -> frozenset[str]:
        return frozenset({UPLOADS})

    def __init__(self, ctx, options: NormOptions) -> None:
        super().__init__(ctx, options)
        self.norms: dict[int, list[float]] = {}

    def observe(self, view: RoundView) -> None:
        if view.round <= self.opts.last:
            return
        sent = record_to_state(view.sent)
        self.norms[view.round] = [
            math.sqrt(sum(float(((sent[k].double() - v.double()) ** 2).sum())
                          for k, v in record_to_state(u.arrays).items()
                          if v.dtype.is_floating_point))
            for u in view.uploads]

    def state(self) -> dict:
        return {"norms": self.norms}

    def restore(self, state: dict) -> None:
        self.norms = {int(k): v for k, v in state["norms"].items()}

    def finish(self, final: ArrayRecord, accountants: Sequence) -> dict:
        return {"upload_norms": {str(r): n for r, n in sorted(self.norms.items())}}


def test_a_registered_attack_runs_with_its_options_and_gets_the_shadows_it_needs(tmp_path):
    SEEN.clear()
    sets = TINY + [audits("mia"), 'privacy.mia.attacks=["loss","shadow_gap"]',
                   "privacy.mia.shadows=2", "privacy.mia.plugins.shadow_gap.scale=3.0"]
    result = fedsim.run("scenarios/quickstart.toml", sets, out=tmp_path / "r")
    p = result.summary["privacy"]
    assert set(p["mia"]) == {"loss", "shadow_gap"}
    assert p["shadows"]["count"] == 2  # trained because shadow_gap needs them
    ((inputs, options),) = SEEN  # the final round only (privacy.mia.every = 0)
    assert options == GapOptions(scale=3.0) and inputs.shadow_conf.shape[0] == 2
    scn = load_scenario("scenarios/quickstart.toml", sets)
    data = build_federated_data(scn)
    is_member = MembershipPool.build(data, scn.seed).tensors(data)[2]
    scores = ShadowGap.scores(inputs, GapOptions(scale=1.0))["shadow_gap"]  # scale: same AUC
    assert p["mia"]["shadow_gap"]["auc"] == pytest.approx(roc_auc_score(is_member, scores),
                                                          abs=1e-12)


def test_an_attack_that_needs_nothing_trains_no_shadows(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml", TINY + [audits("mia")], out=tmp_path / "r")
    assert result.summary["privacy"]["shadows"] is None


@pytest.mark.parametrize(("extra", "pattern"), [
    (["privacy.mia.plugins.shadow_gap.scale=0"],
     r"privacy.mia.plugins.shadow_gap.scale = 0.0 is out of range; it must be > 0"),
    (["privacy.mia.plugins.shadow_gap.scal=2"],
     r"unknown key 'privacy.mia.plugins.shadow_gap.scal' \(did you mean 'scale'\?\)"),
    (["privacy.mia.shadows=1"], "shadow_gap need >= 2 shadows"),
    (["privacy.mia.plugins.shadow_gapp.scale=2"],
     r"unknown membership attack in privacy.mia.plugins.shadow_gapp = 'shadow_gapp' "
     r"\(did you mean 'shadow_gap'\?\)"),
])
def test_a_registered_attack_s_bad_options_fail_before_anything_runs(tmp_path, extra, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        fedsim.run("scenarios/quickstart.toml", TINY + [
            audits("mia"), 'privacy.mia.attacks=["shadow_gap"]', *extra], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_registered_audit_runs_with_its_own_section(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml", TINY + [
        audits("upload_norms"), "privacy.plugins.upload_norms.last=1"], out=tmp_path / "r")
    norms = result.summary["privacy"]["upload_norms"]
    assert list(norms) == ["2"]  # rounds after round 1 of server.rounds = 2
    assert len(norms["2"]) == 3 and all(n > 0 for n in norms["2"])  # clients_per_round = 3


def test_a_registered_audit_s_unknown_option_is_refused(tmp_path):
    with pytest.raises(ScenarioError, match=r"unknown key 'privacy.plugins.upload_norms.lats' "
                                            r"\(did you mean 'last'\?\)"):
        fedsim.run("scenarios/quickstart.toml", TINY + [
            audits("upload_norms"), "privacy.plugins.upload_norms.lats=1"], out=tmp_path / "x")


def test_an_attack_without_scores_is_refused_when_it_registers():
    class NoScores(MembershipAttack):
        needs = frozenset()

    with pytest.raises(TypeError, match="must subclass MembershipAttack and define scores"):
        register_attack("no_scores")(NoScores)
    assert "no_scores" not in MIA_ATTACKS

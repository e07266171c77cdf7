"""``inversion``: gradient inversion of one client's local step, or of its whole multi-step
upload (``[privacy.inversion]``; Geiping et al., "Inverting Gradients", NeurIPS 2020).

The server takes the model it sent at the start of ``round`` and attacks ``batch`` images of
``client``: with ``target = "step"`` one gradient of one batch (labels read off the
last-layer gradient, iDLG; with shared BN buffers, the batch statistics they reveal as a
prior), with ``target = "update"`` the client's real FedAvg upload of τ local steps, which
the client layer computes (:attr:`AuditContext.attacked_client`) and the attacker simulates
(:func:`~fedsim.privacy.inversion.invert_update`, Geiping et al. §5). Best of ``restarts``
random starts by the attack's own objective.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import record_to_state
from fedsim.config import InversionConfig, Scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import (
    LOCAL_TRAINING,
    AttackedClient,
    Audit,
    AuditContext,
    RoundView,
    register_audit,
)
from fedsim.privacy.audits.pool import Probe
from fedsim.privacy.inversion import (
    client_gradient,
    image_metrics,
    invert_gradients,
    invert_update,
    match_reconstructions,
    recover_labels,
    save_image_grid,
)
from fedsim.privacy.leakage import has_running_stats, recover_batch_stats
from fedsim.rng import numpy_rng

INVERSION_PNG = "privacy_inversion.png"


def attacked_client_id(options: InversionConfig, participating: Sequence[int]) -> int:
    return participating[0] if options.client < 0 else options.client


@register_audit("inversion")
class Inversion(Audit):
    """Reconstructs one client's images from what it reveals in round ``round``."""

    summary = {"inversion": ""}

    @classmethod
    def needs(cls, scenario: Scenario, options: InversionConfig) -> frozenset[str]:
        return frozenset({LOCAL_TRAINING}) if options.target == "update" else frozenset()

    @classmethod
    def check_names(cls, scenario: Scenario, options: InversionConfig) -> None:
        if options.round > scenario.server.rounds:
            raise ScenarioError(f"privacy.inversion.round = {options.round} is out of range; "
                                f"the run has server.rounds = {scenario.server.rounds}")
        if options.target == "step" and scenario.client.compress != "none":
            raise ScenarioError(
                f"privacy.inversion.target = 'step' attacks one uncompressed gradient, not what "
                f"a client with client.compress = {scenario.client.compress!r} uploads; use "
                "privacy.inversion.target = 'update' (the attack on the compressed upload)")

    @classmethod
    def check(cls, ctx: AuditContext, options: InversionConfig) -> None:
        data, scenario = ctx.data, ctx.scenario
        if data.input_kind != "image":
            raise ScenarioError(
                f"privacy.audits names 'inversion', which reconstructs images from gradients, "
                f"but data.name = {scenario.data.name!r} holds text (token windows); drop "
                "'inversion' (on text, measure memorization with the 'exposure' audit)")
        cid = attacked_client_id(options, data.participating)
        if cid not in data.participating:
            why = "a holdout client (never trains)" if cid in data.holdout else "not a client"
            raise ScenarioError(
                f"privacy.inversion.client = {cid} is {why}; use a participating client id "
                f"(e.g. {data.participating[0]}) or -1")
        n = len(data.client_train(cid)[1])
        if options.batch > n:
            raise ScenarioError(f"privacy.inversion.batch = {options.batch} exceeds the "
                                f"{n} training samples of client {cid}; lower it")
        if options.target == "update" and ctx.attacked_client is not None \
                and not ctx.attacked_client.plan(options.batch, options.round, cid):
            raise ScenarioError(
                f"privacy.inversion.target = 'update' leaves no local step: a model with batch "
                f"statistics drops batches of one image (privacy.inversion.batch = "
                f"{options.batch}, client.batch_size = {scenario.client.batch_size}); "
                "raise them or use privacy.inversion.target = 'step'")

    def __init__(self, ctx: AuditContext, options: InversionConfig) -> None:
        super().__init__(ctx, options)
        self.sent: dict = {}  # the global state sent at the start of `round`

    def observe(self, view: RoundView) -> None:
        if view.round == self.opts.round - 1:
            self.sent = record_to_state(view.arrays)

    def state(self) -> dict:
        return {"sent": self.sent}

    def restore(self, state: dict) -> None:
        self.sent = state["sent"]

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        ctx, opts = self.ctx, self.opts
        model = Probe(ctx.new_model().to(ctx.device), ctx.initial).load(self.sent)
        cid = attacked_client_id(opts, ctx.data.participating)
        x_all, y_all = ctx.on_device.client_train(cid)
        rows = numpy_rng(ctx.scenario.seed, "privacy", "inversion-batch", cid).choice(
            len(y_all), size=opts.batch, replace=False)
        rows = torch.as_tensor(np.sort(rows), device=y_all.device)
        x, y = x_all[rows], y_all[rows]
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ScenarioError("privacy.inversion needs a model whose classifier is "
                                "`model.head` (nn.Linear), as every fedsim arch has")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        test_x = ctx.on_device.global_test()[0]
        lo, hi = float(test_x.min()), float(test_x.max())
        common = dict(steps=opts.steps, lr=opts.lr, tv_weight=opts.tv, seed=ctx.scenario.seed,
                      bn_mode=opts.bn_mode, bounds=(lo, hi), bn_weight=opts.bn_prior_weight,
                      restarts=opts.restarts)
        if opts.target == "update":
            x, y, labels, recon, extra = self._invert_update(model, cid, x, y, names, common)
        else:
            grads = client_gradient(model, x, y, bn_mode=opts.bn_mode)
            g_w = grads[names.index("head.weight")]
            g_b = grads[names.index("head.bias")] if "head.bias" in names else None
            labels = recover_labels(g_w, g_b, num_images=len(y))
            bn_stats = (uploaded_batch_stats(model, x)
                        if opts.bn_buffers_shared and opts.bn_mode == "train" else {})
            recon = invert_gradients(
                model, grads, labels, tuple(ctx.data.input_shape), num_images=len(y),
                bn_stats=bn_stats or None, **common)
            extra = {"local_steps": 1, "bn_prior_layers": len(bn_stats),
                     "attacker_knows": "the sent model and one batch's gradient (up to scale)"}
        metrics = image_metrics(x.cpu(), recon.x.cpu(), data_range=hi - lo)
        matched, _ = match_reconstructions(x.cpu(), recon.x.cpu())
        save_image_grid(x.cpu(), matched, ctx.out / INVERSION_PNG, bounds=(lo, hi))
        classes = ctx.data.num_classes
        true_counts = np.bincount(y.cpu().numpy(), minlength=classes)
        got_counts = np.bincount(labels.cpu().numpy(), minlength=classes)
        return {"inversion": {
            "round": opts.round,
            "client": cid,
            "target": opts.target,
            "batch_size": len(y),
            "local_steps": extra["local_steps"],
            "bn_mode": opts.bn_mode,
            "bn_buffers_shared": opts.bn_buffers_shared,
            "bn_prior_layers": extra["bn_prior_layers"],
            "psnr_db": metrics["psnr"],
            "ssim": metrics["ssim"],
            "mse": metrics["mse"],
            "label_accuracy": float(np.minimum(true_counts, got_counts).sum() / len(y)),
            "steps": opts.steps,
            "restarts": opts.restarts,
            "restart_objectives": list(recon.losses),
            "chosen_restart": recon.best,
            "objective": recon.loss,
            "attacker_knows": extra["attacker_knows"],
            "png": INVERSION_PNG,
        }}

    def _invert_update(self, model: nn.Module, cid: int, x: torch.Tensor, y: torch.Tensor,
                       names: list[str], common: dict):
        """Attack the real upload of ``τ`` local steps on the ``N = batch`` images.

        The client trains for real (:attr:`AuditContext.attacked_client`: plain local SGD
        without strategy hooks, BN in ``bn_mode``) on the batches of its own plan. The
        attacker knows the sent model, the client's lr, momentum and weight decay, N, and
        which images form each batch in order (so τ and the batch size); it reads the labels
        off the update's classifier rows and matches its simulated update (and, if shared, BN
        buffers).
        """
        opts, client = self.opts, self.ctx.scenario.client
        victim: AttackedClient | None = self.ctx.attacked_client
        if victim is None:
            raise ScenarioError("privacy.inversion.target = 'update' needs the attacked "
                                "client's training, which this run does not hand in")
        # The local dataset lists its images by label, so the (sorted) recovered labels name
        # the image at each position the batch plan refers to.
        order = torch.argsort(y, stable=True)  # integer labels: the same order on any device
        x, y = x[order], y[order]
        plan = victim.plan(len(y), opts.round, cid)
        real = victim.train(copy.deepcopy(model), x, y, opts.round, cid, opts.bn_mode)
        after = dict(real.named_parameters())
        update = [(p - after[n]).detach() for n, p in model.named_parameters()
                  if p.requires_grad]
        if client.compress != "none":  # the attacker sees what is uploaded: the decoded update
            update = [-d for d in victim.uploaded([-u for u in update], opts.round, cid)]
        u_b = update[names.index("head.bias")] if "head.bias" in names else None
        labels = recover_labels(update[names.index("head.weight")], u_b, num_images=len(y))
        buffers = ({n: (m.running_mean.detach(), m.running_var.detach())
                    for n, m in real.named_modules() if n and has_running_stats(m)}
                   if opts.bn_buffers_shared and opts.bn_mode == "train" else {})
        recon = invert_update(model, update, labels, tuple(self.ctx.data.input_shape), plan,
                              client.lr, client.momentum, client.weight_decay,
                              bn_buffers=buffers or None, **common)
        extra = {"local_steps": len(plan), "bn_prior_layers": len(buffers),
                 "attacker_knows": "the sent model; the client's lr, momentum and weight decay; "
                                   "its N images' batch assignment in order (tau steps); "
                                   + ("its uploaded BN buffers" if buffers else "no BN buffers")
                                   + (f"; the update as uploaded ({client.compress}-compressed)"
                                      if client.compress != "none" else "")}
        return x, y, labels, recon, extra


def uploaded_batch_stats(model: nn.Module, x: torch.Tensor) -> dict:
    """What a train-mode step uploads in BN buffers, inverted back to the batch statistics
    at each BN layer's input (exact after one batch, see ``recover_batch_stats``)."""
    stepped = copy.deepcopy(model).train()
    with torch.no_grad():
        stepped(x)
    before = dict(model.named_modules())
    stats = {}
    for name, module in stepped.named_modules():
        if not has_running_stats(module) or not name:
            continue
        prev = before[name]
        stats[name] = recover_batch_stats(
            module.running_mean, module.running_var, getattr(module, "momentum", 0.1),
            num_batches=1, prev_mean=prev.running_mean, prev_var=prev.running_var,
            prev_num_batches=round(float(prev.num_batches_tracked)),
        )
    return stats

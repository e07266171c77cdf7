"""Server-side evaluation of the global model: global test set, per-client distribution,
the generalization gaps of Yuan et al. (ICLR 2022), the validation split when one is held
out (``validation_accuracy``, ``validation_loss``: what tuning selects on, never the test
set) and, with ``output.sharpness``, the flatness of the training loss
(:mod:`fedsim.models.flatness`). On text (next-character prediction), perplexity too:
``exp`` of the mean loss, globally and per client.

- out-of-sample gap: participating clients' local train accuracy − their local test accuracy;
- participation gap: participating clients' local test accuracy − the local test accuracy
  of holdout clients, which never train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedsim.arrays import load_record
from fedsim.client.train import evaluate_many
from fedsim.config import OutputConfig
from fedsim.data.federated import FederatedData
from fedsim.device import DeviceSplits
from fedsim.errors import ScenarioError
from fedsim.models import hybrid_alphas
from fedsim.models.flatness import hessian_max_eig, model_loss, sharpness
from fedsim.rng import numpy_rng, torch_generator
from fedsim.stats import distribution


def perplexity(mean_loss: float) -> float:
    """``exp`` of a mean next-token cross-entropy (nats): the perplexity of a language model
    (inf where the loss overflows it, nan for nan)."""
    return math.inf if mean_loss > 700 else math.exp(mean_loss)


def pick_clients(ids: Sequence[int], limit: int, seed: int, purpose: str) -> list[int]:
    """At most ``limit`` of ``ids``, fixed by the seed, so every round evaluates the same ones.

    Draws positions, not ids (``rng.choice(len(ids))`` picks what ``rng.choice(ids)`` picks),
    so a population of millions costs O(``limit``): no array of every id is built.
    """
    if len(ids) <= limit:
        return list(ids)
    rng = numpy_rng(seed, "eval-clients", purpose)
    return sorted(int(ids[i]) for i in rng.choice(len(ids), size=limit, replace=False))


def flatness_sample(data: FederatedData | DeviceSplits, clients: list[int], size: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``size`` training examples pooled from ``clients``' train splits, fixed by the
    seed (in pooled order), so every evaluation measures the loss on the same sample; on
    the device of ``data``'s tensors."""
    xs, ys = zip(*(data.client_train(cid) for cid in clients)) if clients else ((), ())
    total = sum(len(y) for y in ys)
    if total == 0:
        raise ScenarioError("output.sharpness: the evaluated participating clients have no "
                            "training examples to measure the loss on")
    if total <= size:
        return torch.cat(xs), torch.cat(ys)
    rng = numpy_rng(seed, "flatness", "sample")
    keep = np.sort(rng.choice(total, size=size, replace=False))  # positions in pooled order
    # gathered client by client: never a pooled copy of every client's samples (a text
    # client's windows are views of its text, T times smaller than their copy)
    bounds = np.cumsum([0, *(len(y) for y in ys)])
    parts = [torch.from_numpy(keep[(keep >= a) & (keep < b)] - a).to(y.device)
             for a, b, y in zip(bounds[:-1], bounds[1:], ys)]
    return (torch.cat([x[rows] for x, rows in zip(xs, parts)]),
            torch.cat([y[rows] for y, rows in zip(ys, parts)]))


def flatness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, output: OutputConfig,
             seed: int) -> dict[str, float]:
    """``hessian_max_eig`` and ``sharpness`` of the mean training loss on ``(x, y)``.

    Both use the same derived directions at every evaluation (common random numbers), so
    differences between rounds come from the model, not from the draws, and ``--resume``
    reproduces them.
    """
    loss, params = model_loss(model, x, y)
    eig = hessian_max_eig(loss, params, torch_generator(seed, "flatness", "power"),
                          iters=output.sharpness_iters)
    sharp = sharpness(loss, params, output.sharpness_radius, output.sharpness_draws,
                      torch_generator(seed, "flatness", "perturb"))
    return {"hessian_max_eig": eig, "sharpness": sharp}


class Evaluator:
    """Evaluates global arrays on the global test set and on clients' local splits.

    ``on_device``: the run's splits on its device (:attr:`fedsim.context.RunContext.on_device`),
    shared with the clients and the privacy audit, so each evaluated split is copied to the
    device once per run; by default, the evaluator's own. ``bn_eval``: ``model.bn_eval``
    (:func:`fedsim.client.train.evaluate`).
    """

    def __init__(self, output: OutputConfig, seed: int, data: FederatedData, model: nn.Module,
                 device: torch.device, on_device: DeviceSplits | None = None,
                 bn_eval: str = "running") -> None:
        self.data = data
        self.model = model
        self.device = device
        self.on_device = DeviceSplits(data, device) if on_device is None else on_device
        limit = output.eval_clients
        self.clients = pick_clients(data.participating, limit, seed, "participating")
        self.holdout = pick_clients(data.holdout, limit, seed, "holdout")
        self._splits: list | None = None  # every evaluated split, on the device, built once
        self.output = output
        self.seed = seed
        self.bn_eval = bn_eval
        self._flat_sample: tuple | None = None  # output.sharpness: the fixed training sample

    def _all_splits(self) -> list:
        """Global test, then each client's test and train split, then holdout test splits
        (each cut to ``output.eval_samples``), then the validation split when one is held
        out."""
        if self._splits is None:
            on = self.on_device
            splits = [on.global_test()]
            for cid in self.clients:
                splits += [self._cut(on.client_test(cid), cid, "test"),
                           self._cut(on.client_train(cid), cid, "train")]
            splits += [self._cut(on.client_test(cid), cid, "test") for cid in self.holdout]
            validation = on.validation()
            self._splits = splits + ([validation] if validation is not None else [])
        return self._splits

    def _cut(self, split: tuple[torch.Tensor, torch.Tensor], cid: int, name: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``output.eval_samples`` rows of a client split, fixed by the seed (the
        same rows at every evaluation): large clients (a speaking role's thousands of
        windows) cost what a small one does."""
        x, y = split
        limit = self.output.eval_samples
        if not limit or len(y) <= limit:
            return split
        rows = numpy_rng(self.seed, "eval-samples", cid, name).choice(len(y), size=limit,
                                                                      replace=False)
        keep = torch.from_numpy(np.sort(rows)).to(y.device)
        return x[keep], y[keep]

    def __call__(self, arrays) -> dict:
        load_record(self.model, arrays)
        results = evaluate_many(self.model, self._all_splits(),  # one batched pass
                                bn_eval=self.bn_eval)
        loss, acc, _ = results[0]
        k = len(self.clients)
        test_acc = [a for _, a, _ in results[1 : 1 + 2 * k : 2]]
        test_n = [n for _, _, n in results[1 : 1 + 2 * k : 2]]
        train_acc = [a for _, a, _ in results[2 : 2 + 2 * k : 2]]
        hold_acc = [a for _, a, _ in results[1 + 2 * k : 1 + 2 * k + len(self.holdout)]]
        clients = distribution(test_acc, test_n)
        train = distribution(train_acc)
        result = {
            "global_test_loss": loss,
            "global_test_accuracy": acc,
            "client_accuracy": clients,
            "client_train_accuracy": train,
            "generalization": {
                "out_of_sample_gap": train["mean"] - clients["mean"],
                "participation_gap": (
                    clients["mean"] - float(np.mean(hold_acc)) if hold_acc else None
                ),
                "holdout_accuracy": distribution(hold_acc) if hold_acc else None,
            },
        }
        if len(results) > 1 + 2 * k + len(self.holdout):  # the validation split, last
            result["validation_loss"], result["validation_accuracy"], _ = results[-1]
        if self.data.input_kind == "tokens":  # a language model: exp of the mean loss
            result["global_test_perplexity"] = perplexity(loss)
            result["client_perplexity"] = distribution(
                [perplexity(x) for x, _, _ in results[1 : 1 + 2 * k : 2]], test_n)
        alphas = hybrid_alphas(self.model)
        if alphas:
            result["hybrid_alpha"] = alphas
        if self.output.sharpness:
            if self._flat_sample is None:  # pooled from the clients' device copies
                self._flat_sample = flatness_sample(self.on_device, self.clients,
                                                    self.output.sharpness_samples, self.seed)
            result.update(flatness(self.model, *self._flat_sample, self.output, self.seed))
        return result

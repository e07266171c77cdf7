"""Server-side evaluation of the global model: global test set, per-client distribution,
and the generalization gaps of Yuan et al. (ICLR 2022).

- out-of-sample gap: participating clients' local train accuracy − their local test accuracy;
- participation gap: participating clients' local test accuracy − the local test accuracy
  of holdout clients, which never train.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsim.arrays import load_record
from fedsim.client.train import evaluate
from fedsim.config import Scenario
from fedsim.data.federated import FederatedData
from fedsim.models import hybrid_alphas
from fedsim.rng import numpy_rng


def distribution(values: list[float], weights: list[int] | None = None) -> dict[str, float]:
    """Mean, example-weighted mean, std, median, p10, p90, min, max and count of ``values``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    out = {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }
    if weights is not None:
        w = np.asarray(weights, dtype=float)[np.isfinite(np.asarray(values, dtype=float))]
        out["weighted_mean"] = float((v * w).sum() / w.sum()) if w.sum() > 0 else out["mean"]
    return out


def pick_clients(ids: tuple[int, ...], limit: int, seed: int, purpose: str) -> list[int]:
    """At most ``limit`` of ``ids``, fixed by the seed, so every round evaluates the same ones."""
    if len(ids) <= limit:
        return list(ids)
    rng = numpy_rng(seed, "eval-clients", purpose)
    return sorted(int(i) for i in rng.choice(np.asarray(ids), size=limit, replace=False))


class Evaluator:
    """Evaluates global arrays on the global test set and on clients' local splits."""

    def __init__(self, scenario: Scenario, data: FederatedData, model: nn.Module,
                 device: torch.device) -> None:
        self.data = data
        self.model = model
        self.device = device
        limit = scenario.output.eval_clients
        self.clients = pick_clients(data.participating, limit, scenario.seed, "participating")
        self.holdout = pick_clients(data.holdout, limit, scenario.seed, "holdout")

    def _eval(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int]:
        return evaluate(self.model, x.to(self.device), y.to(self.device))

    def __call__(self, arrays) -> dict:
        load_record(self.model, arrays)
        loss, acc, _ = self._eval(*self.data.global_test())
        test_acc, test_n, train_acc = [], [], []
        for cid in self.clients:
            _, a, n = self._eval(*self.data.client_test(cid))
            test_acc.append(a)
            test_n.append(n)
            train_acc.append(self._eval(*self.data.client_train(cid))[1])
        hold_acc = [self._eval(*self.data.client_test(cid))[1] for cid in self.holdout]
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
        alphas = hybrid_alphas(self.model)
        if alphas:
            result["hybrid_alpha"] = alphas
        return result

"""What freezing BN statistics does to one local step: the check behind FixBN's ``lr_scale``.

Trains a BN model with FedAvg for ``--rounds`` rounds (by default ``bn_statistics.toml``'s
ResNet cell: digits, 2 classes per client over 10 clients, 1 local step a round, lr 0.3,
tuning seed 100), then from that global model takes one local SGD step per client on its
first minibatch, with BN normalising by

- the minibatch's own statistics (train mode: what FedAvg-BN trains with),
- the global running statistics (eval mode: FixBN's frozen phase), or
- the statistics of the union of all clients' training data (eval mode: the exact
  federation statistics, to separate "the averaged statistics are wrong" from "training
  with any fixed statistics is sharper"),

and reports, per learning rate, how many of the clients' own minibatch losses the step
raised and the median loss-gradient norm. A step that raises the loss of the very batch it
was computed on has overshot: the loss is too sharp for that rate. From the repository root::

    python benchmarks/fixbn_freeze_step.py
    python benchmarks/fixbn_freeze_step.py --set model.arch=cnn
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedsim  # noqa: E402
from fedsim.config import load_scenario  # noqa: E402
from fedsim.data.federated import build_federated_data  # noqa: E402
from fedsim.models import build_model  # noqa: E402

SCENARIO = "scenarios/studies/bn_statistics.toml"
BASE = ["model.arch=resnet", "model.norm=bn", "server.strategy=fedavg", "seed=100",
        "client.lr=0.3", "output.eval_every=1000", "output.checkpoint_every=0"]


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in train mode with every BN layer normalising by its running statistics."""
    model.train()
    for layer in model.modules():
        if isinstance(layer, _BatchNorm):
            layer.eval()
    return model


def union_statistics(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` whose BN running statistics are those of ``x`` (one pass)."""
    union = copy.deepcopy(model)
    for layer in union.modules():
        if isinstance(layer, _BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average: exactly the batch's moments
    union.train()
    with torch.no_grad():
        union(x)
    return union


def one_step(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, lr: float,
             mode: str) -> tuple[float, float]:
    """(loss change on the batch after one SGD step, loss-gradient norm)."""
    m = copy.deepcopy(model)
    m = frozen(m) if mode != "batch" else m.train()
    loss = cross_entropy(m(xb), yb)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    with torch.no_grad():
        for p, g in zip(m.parameters(), grads):
            p -= lr * g
        m = frozen(m) if mode != "batch" else m.train()
        after = cross_entropy(m(xb), yb).item()
    return after - loss.item(), torch.sqrt(sum((g ** 2).sum() for g in grads)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=SCENARIO)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--lrs", default="0.3,0.03,0.01,0.003")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    overrides = BASE + [f"server.rounds={args.rounds}", *args.overrides]
    scenario = load_scenario(args.scenario, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = fedsim.run(scenario, out=Path(tmp) / "run")
        state = torch.load(Path(tmp) / "run" / "model.pt", map_location="cpu",
                           weights_only=True)
    data = build_federated_data(scenario)
    m, d = scenario.model, data
    model = build_model(m.arch, m.norm, num_classes=d.num_classes, in_channels=d.input_shape[0],
                        image_size=d.input_shape[-1], width=m.width, groups=m.groups)
    model.load_state_dict(state)
    clients = sorted(d.participating)
    union = union_statistics(model, torch.cat([d.client_train(c)[0] for c in clients]))
    print(f"{args.scenario} {' '.join(overrides)}: global test accuracy after "
          f"{args.rounds} rounds {result.summary['final']['global_test_accuracy']:.3f}; "
          f"one step on each of {len(clients)} clients' first minibatch "
          f"(batch {scenario.client.batch_size})")
    print("| statistics | lr | steps that raised the batch's loss | median loss change | "
          "median gradient norm |")
    print("|---|---|---|---|---|")
    for label, base, mode in [("batch (train mode)", model, "batch"),
                              ("global running, frozen", model, "frozen"),
                              ("union of the clients' data, frozen", union, "frozen")]:
        for lr in (float(v) for v in args.lrs.split(",")):
            rows = []
            for c in clients:
                x, y = d.client_train(c)
                n = scenario.client.batch_size
                rows.append(one_step(base, x[:n], y[:n], lr, mode))
            raised = sum(change > 0 for change, _ in rows)
            print(f"| {label} | {lr:g} | {raised}/{len(rows)} | "
                  f"{statistics.median(c for c, _ in rows):+.3f} | "
                  f"{statistics.median(g for _, g in rows):.2f} |")


if __name__ == "__main__":
    main()

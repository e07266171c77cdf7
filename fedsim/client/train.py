"""The local training loop one client runs, and local evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.client.hooks import ClientHook
from fedsim.config import ClientConfig


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the local steps
    accuracy: float  # training accuracy seen during the local steps
    num_examples: int
    steps: int


def batches(n: int, batch_size: int, generator: torch.Generator, drop_singleton: bool):
    """Shuffled index batches; a trailing batch of one is dropped when ``drop_singleton``.

    BatchNorm cannot compute batch statistics from a single vector, so models that use batch
    statistics drop a last batch of size 1 instead of crashing mid-run.
    """
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_singleton and len(idx) == 1 and n > 1:
            continue
        yield idx


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClientConfig,
    generator: torch.Generator,
    hooks: list[ClientHook] = (),
    drop_singleton: bool = True,
) -> TrainResult:
    """Run ``cfg.epochs`` epochs of minibatch SGD on (x, y) in place; hooks shape the loss/step."""
    model.train()
    for hook in hooks:
        hook.before_train(model)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(cfg.epochs):
        for idx in batches(len(x), cfg.batch_size, generator, drop_singleton):
            xb, yb = x[idx], y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            full = loss
            for hook in hooks:
                extra = hook.extra_loss(model)
                if extra is not None:
                    full = full + extra
            opt.zero_grad(set_to_none=True)
            full.backward()
            opt.step()
            for hook in hooks:
                hook.after_step(model, cfg.lr)
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            steps += 1
    if seen == 0:
        return TrainResult(float("nan"), float("nan"), 0, 0)
    return TrainResult(total_loss / seen, correct / seen, len(x), steps)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024):
    """(mean loss, accuracy, n) of ``model`` in eval mode on (x, y)."""
    model.eval()
    if len(x) == 0:
        return float("nan"), float("nan"), 0
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return loss / len(x), correct / len(x), len(x)

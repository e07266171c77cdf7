"""Personalized evaluation: each client's own model on its own local test split.

Strategies whose clients keep part of the model (FedBN's normalization layers, SiloBN's
statistics, a user's local head) name, in a ``personal_hooks`` attribute, the client hooks
that rebuild a client's own model from the global arrays and its saved state. On every
evaluated round fedsim then sends an evaluate message with those hooks to each evaluated
participating client (the ClientApp restores its local arrays and tests on its local split,
on any engine), and evaluates the holdout clients on the server with the same hooks and an
empty state: they never trained, so they have nothing saved, and each hook's cold start
applies (FedBN/SiloBN: the global layers, with BN running statistics re-estimated on the
client's local train data without gradient steps).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsim.client.hooks import HookContext, hooks_for, request_hooks
from fedsim.client.pipeline import evaluate_start
from fedsim.client.step import GlobalArrays
from fedsim.client.train import evaluate
from fedsim.data.federated import FederatedData
from fedsim.engine.ordered import ClientOrderedGrid
from fedsim.engine.vectorized_eval import MemberBuilder, evaluate_cohort
from fedsim.models.batched import fold_for_cohort
from fedsim.server.evaluate import Evaluator, distribution

#: seconds to wait for personalized-evaluation replies
REPLY_TIMEOUT = 3600.0

COLD_START = (
    "clients without saved local arrays (holdout clients, which never train, and "
    "participating clients not yet sampled) are evaluated with each hook's cold start: for "
    "FedBN and SiloBN, the global layers with BatchNorm running statistics re-estimated on "
    "the client's local train data (no gradient steps)"
)


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """``strategy`` and the strategies it wraps (DP wrappers keep theirs in ``.strategy``)."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)
    return chain


def personal_hooks(strategy: Strategy) -> tuple[str, ...]:
    """The client hooks that rebuild each client's own model; empty if there is none."""
    for s in strategy_chain(strategy):
        hooks = tuple(getattr(s, "personal_hooks", ()) or ())
        if hooks:
            return hooks
    return ()


def strategy_summaries(strategy: Strategy) -> dict:
    """Sections any strategy in the chain contributes to summary.json (``fedsim_summary()``)."""
    out: dict = {}
    for s in strategy_chain(strategy):
        summarize = getattr(s, "fedsim_summary", None)
        if callable(summarize):
            out.update(summarize())
    return out


class PersonalizedEvaluator:
    """Per-client accuracy of each client's own model (global arrays + its local state)."""

    def __init__(self, hooks: tuple[str, ...], grid: ClientOrderedGrid, evaluator: Evaluator,
                 data: FederatedData, model: nn.Module, device: torch.device,
                 cohort_size: int | None = None, bn_eval: str = "running") -> None:
        self.hooks = hooks
        self.cohort_size = cohort_size  # set (engine.vectorize): holdout clients as vmap cohorts
        self.grid = grid
        self.data = data
        self.model = copy.deepcopy(model)
        self.global_arrays = GlobalArrays(self.model)
        self.on_device = evaluator.on_device  # the run's device copies of client data
        self._cohort_model: nn.Module | None = None
        self.device = device
        # the evaluated clients' nodes in client order, found per client (not per node)
        self.nodes = grid.nodes_of(sorted(set(evaluator.clients)))
        self.holdout = list(evaluator.holdout)
        self.bn_eval = bn_eval  # model.bn_eval, for the holdout clients evaluated here
        self.failures = 0

    def config(self) -> ConfigRecord:
        return request_hooks(ConfigRecord({"personalized": 1}), *self.hooks)

    def _participating(self, arrays: ArrayRecord) -> tuple[list[float], list[int]]:
        content = RecordDict({"arrays": arrays, "config": self.config()})
        msgs = [Message(content, node, MessageType.EVALUATE) for node in self.nodes]
        acc, n = [], []
        for reply in self.grid.send_and_receive(msgs, timeout=REPLY_TIMEOUT):
            if reply.has_error():
                self.failures += 1
                continue
            metrics = reply.content.metric_records["metrics"]
            acc.append(float(metrics["eval_accuracy"]))
            n.append(int(metrics["num-examples"]))
        return acc, n

    def _holdout(self, arrays: ArrayRecord) -> list[float]:
        """Each holdout client's own model (the global arrays, its hooks' cold start) on its
        local test split, through the client pipeline's start
        (:func:`fedsim.client.pipeline.evaluate_start`), one at a time or as cohorts."""
        if self.cohort_size is not None:
            return self._holdout_cohorts(arrays)
        acc = []
        for cid in self.holdout:
            ctx = HookContext(cid, self.config(), RecordDict(), mode="evaluate",
                              local_train=lambda cid=cid: self.on_device.client_train(cid))
            evaluate_start(self.model, self.global_arrays, arrays, hooks_for(ctx),
                           ctx.local_train)
            acc.append(evaluate(self.model, *self.on_device.client_test(cid),
                                bn_eval=self.bn_eval)[1])
        return acc

    def _holdout_cohorts(self, arrays: ArrayRecord) -> list[float]:
        """``_holdout`` with ``cohort_size`` clients at a time (same results within float
        tolerance; fedsim.engine.vectorized_eval)."""
        if self._cohort_model is None:  # folding layers, chosen once (fold_for_cohort)
            self._cohort_model = fold_for_cohort(self.model)
        build = MemberBuilder(self._cohort_model)
        acc = []
        for start in range(0, len(self.holdout), self.cohort_size):
            members = []
            for cid in self.holdout[start : start + self.cohort_size]:
                def local_train(cid=cid):
                    return self.on_device.client_train(cid)

                ctx = HookContext(cid, self.config(), RecordDict(), mode="evaluate",
                                  local_train=local_train)
                x, y = self.on_device.client_test(cid)
                members.append(build(arrays, hooks_for(ctx), x, y, local_train))
            acc += [a for _, a, _ in evaluate_cohort(self._cohort_model, members,
                                                     bn_eval=self.bn_eval)]
        return acc

    def __call__(self, arrays: ArrayRecord) -> dict:
        acc, n = self._participating(arrays)
        hold = self._holdout(arrays)
        clients = distribution(acc, n)
        return {
            "personalized_accuracy": clients,
            "personalized_holdout_accuracy": distribution(hold) if hold else None,
            "personalized_participation_gap": (
                clients["mean"] - float(np.mean(hold)) if hold and acc else None
            ),
        }

    def fedsim_summary(self) -> dict:
        return {"personalized": {"hooks": list(self.hooks), "cold_start": COLD_START,
                                 "evaluate_failures": self.failures}}

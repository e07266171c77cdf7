"""Vectorized cohorts: many clients' local SGD at once with ``torch.func``.

With ``engine.vectorize = true`` the in-process grid hands the train messages of a round to
:class:`CohortTrainer` in cohorts of ``engine.cohort_size``. Each client still gets its own
message, its own ``Context.state``, its own hooks (``on_receive``/``on_reply``) and its own
reply; only the local SGD steps run together: the model is called functionally
(``functional_call``) on per-client parameter stacks, and ``vmap(grad(...))`` computes every
client's gradient in one call.

Clients of different sizes: each client draws exactly the batches the sequential path
draws (same generator, same order). At step ``t`` only clients that still have a batch take
part (the cohort is sorted by step count, so they are a prefix and the stacks are sliced,
not copied); a client's last, smaller batch is padded to the cohort's batch size with
weight-zero samples, so its loss is the mean over its real samples. Padding is exact only
for models that treat samples independently, which is why models with batch statistics
(``bn``, ``hybrid``: running statistics, and batch-dependent outputs) are refused.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.arrays import load_record, state_to_record
from fedsim.client.hooks import ClientHook, HookContext, hooks_for
from fedsim.client.train import TrainResult, batches
from fedsim.config import ClientConfig, Scenario
from fedsim.errors import ScenarioError
from fedsim.models.norm import uses_batch_statistics
from fedsim.rng import torch_generator


def unsupported_model_reason(model: nn.Module, norm: str) -> str | None:
    """Why ``model`` cannot be trained as a vmap cohort, or None if it can."""
    if uses_batch_statistics(norm):
        return (f"model.norm = {norm!r} uses batch statistics (running mean/var updated "
                "in place, outputs that depend on batch peers), which a vmap cohort cannot "
                "keep per client")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers[:3])}), which vmap cannot update"
    return None


def step_hooks(hooks: Sequence[ClientHook]) -> list[str]:
    """Names of hooks that change the loss or the optimizer step (not vectorizable)."""
    return [type(h).__name__ for h in hooks
            if type(h).extra_loss is not ClientHook.extra_loss
            or type(h).after_step is not ClientHook.after_step]


def check_vectorize(scenario: Scenario, model: nn.Module) -> None:
    """Refuse ``engine.vectorize = true`` where a cohort could not equal the sequential path.

    Checks the engine, the model (no batch statistics or buffers) and the client hooks the
    strategy asks for in its first train config (hooks that add a loss term or change the
    step, such as FedProx's proximal term, run per minibatch and are refused).
    """
    if not scenario.engine.vectorize:
        return
    if scenario.engine.kind != "inprocess":
        raise ScenarioError(
            f"engine.vectorize = true applies to the inprocess engine, not engine.kind = "
            f"{scenario.engine.kind!r}; set engine.vectorize = false or engine.kind = 'inprocess'"
        )
    reason = unsupported_model_reason(model, scenario.model.norm)
    if reason:
        raise ScenarioError(
            f"engine.vectorize = true cannot train this model: {reason}; use model.norm = "
            "'gn', 'ln', 'in' or 'none', or set engine.vectorize = false"
        )
    names = step_hooks(hooks_for(HookContext(0, _first_train_config(scenario), RecordDict())))
    if names:
        raise ScenarioError(
            f"engine.vectorize = true cannot run the client hook(s) {', '.join(names)} that "
            f"server.strategy = {scenario.server.strategy!r} asks for (they change every "
            "minibatch's loss or step); set engine.vectorize = false"
        )


class _NodeList:
    """The minimum of a Grid that Flower's sampling needs, for a dry ``configure_train``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _first_train_config(scenario: Scenario) -> ConfigRecord:
    """The train config the strategy sends in round 1 (computed on a throwaway strategy)."""
    from flwr.app import ArrayRecord

    from fedsim.engine.inprocess import set_task_identity
    from fedsim.server.strategies import make_strategy

    saved = random.getstate()
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # no "configure_train: Sampled ..." line for a dry run
    set_task_identity(1)  # messages need a sender identity, as in the in-process grid
    try:
        strategy = make_strategy(scenario)
        msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(),
                                             _NodeList(scenario.num_participating)))
    finally:
        random.setstate(saved)
        flwr_log.setLevel(level)
    if not msgs:
        return ConfigRecord()
    return msgs[0].content.config_records.get("config", ConfigRecord())


# --------------------------------------------------------------------------- training


@dataclass
class CohortMember:
    """One client's inputs to a cohort: start parameters, data and its batch sequence."""

    params: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    batches: list[torch.Tensor]  # index tensors, exactly those the sequential path draws


def plan_batches(n: int, cfg: ClientConfig, generator: torch.Generator,
                 drop_singleton: bool) -> list[torch.Tensor]:
    """Every epoch's minibatch indices, drawn as ``train_local`` draws them."""
    return [idx for _ in range(cfg.epochs)
            for idx in batches(n, cfg.batch_size, generator, drop_singleton)]


def train_cohort(model: nn.Module, members: Sequence[CohortMember],
                 cfg: ClientConfig) -> tuple[list[dict[str, torch.Tensor]], list[TrainResult]]:
    """Local SGD for every member at once; returns final parameters and results, in order.

    Implements ``torch.optim.SGD`` (momentum, weight decay, no dampening or Nesterov) on
    stacked parameters, so each member's result equals ``train_local`` on its own within
    float tolerance.
    """
    k_all = len(members)
    if k_all == 0:
        return [], []
    device = members[0].x.device
    order = sorted(range(k_all), key=lambda i: -len(members[i].batches))  # active = a prefix
    mem = [members[i] for i in order]
    names = list(mem[0].params)
    params = {n: torch.stack([m.params[n] for m in mem]).to(device) for n in names}
    bufs: dict[str, torch.Tensor] | None = None
    n_max = max(len(m.x) for m in mem)
    sample_shape = mem[0].x.shape[1:]
    xs = torch.zeros((k_all, max(n_max, 1), *sample_shape), dtype=mem[0].x.dtype, device=device)
    ys = torch.zeros((k_all, max(n_max, 1)), dtype=torch.long, device=device)
    for i, m in enumerate(mem):
        xs[i, : len(m.x)] = m.x
        ys[i, : len(m.y)] = m.y
    steps = [len(m.batches) for m in mem]
    width = max((len(b) for m in mem for b in m.batches), default=1)
    loss_sum = torch.zeros(k_all, dtype=torch.float64, device=device)
    correct = torch.zeros(k_all, dtype=torch.int64, device=device)
    seen = [0] * k_all

    def loss_fn(p, xb, yb, wb):
        logits = functional_call(model, p, (xb,))
        losses = F.cross_entropy(logits, yb, reduction="none")
        loss = (losses * wb).sum() / wb.sum()
        hits = ((logits.argmax(1) == yb) & (wb > 0)).sum()
        return loss, (loss.detach(), hits)

    step_fn = vmap(grad(loss_fn, has_aux=True))
    model.train()
    for t in range(max(steps)):
        active = sum(s > t for s in steps)  # members 0..active-1 still have a batch
        idx = torch.zeros((active, width), dtype=torch.long)
        wts = torch.zeros((active, width), dtype=xs.dtype)
        for i in range(active):
            b = mem[i].batches[t]
            idx[i, : len(b)] = b
            wts[i, : len(b)] = 1
            seen[i] += len(b)
        idx, wts = idx.to(device), wts.to(device)
        rows = torch.arange(active, device=device)[:, None]
        xb, yb = xs[rows, idx], ys[rows, idx]
        p_act = {n: params[n][:active] for n in names}
        grads, (loss, hits) = step_fn(p_act, xb, yb, wts)
        loss_sum[:active] += loss.double() * wts.sum(1).double()
        correct[:active] += hits
        with torch.no_grad():
            if cfg.momentum and bufs is None:
                bufs = {n: torch.zeros_like(params[n]) for n in names}
            for n in names:
                d_p = grads[n]
                if cfg.weight_decay:
                    d_p = d_p.add(p_act[n], alpha=cfg.weight_decay)
                if cfg.momentum:
                    buf = bufs[n][:active]
                    if t == 0:  # torch.optim.SGD: the first buffer is the gradient itself
                        buf.copy_(d_p)
                    else:
                        buf.mul_(cfg.momentum).add_(d_p)
                    d_p = buf
                params[n][:active].add_(d_p, alpha=-cfg.lr)
    finals: list[dict[str, torch.Tensor]] = [{}] * k_all
    results: list[TrainResult] = [TrainResult(float("nan"), float("nan"), 0, 0)] * k_all
    loss_cpu, correct_cpu = loss_sum.cpu(), correct.cpu()
    for i, m in enumerate(mem):
        finals[order[i]] = {n: params[n][i] for n in names}
        if seen[i]:
            results[order[i]] = TrainResult(loss_cpu[i].item() / seen[i],
                                            correct_cpu[i].item() / seen[i], len(m.x), steps[i])
    return finals, results


# --------------------------------------------------------------------------- the grid's side


class CohortTrainer:
    """The in-process grid's ``cohort_trainer``: train messages in, one reply per message.

    Mirrors ``fedsim.client.app.handle_train`` per client (global arrays, hooks' ``on_receive``
    and ``on_reply``, the same metrics and ``client`` record); a client whose own preparation
    or reply fails gets an error reply, the others are unaffected.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def __call__(self, msgs: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
        from fedsim.client.runtime import client_runtime

        scenario = self.scenario
        rt = client_runtime(scenario)
        model = rt.model
        drop = uses_batch_statistics(scenario.model.norm)
        replies: list[Message | None] = [None] * len(msgs)
        prepared: list[tuple[int, int, list[ClientHook], CohortMember]] = []
        for i, (msg, ctx) in enumerate(zip(msgs, contexts)):
            try:
                cid = rt.client_id(ctx)
                config = msg.content.config_records.get("config", ConfigRecord())
                load_record(model, msg.content.array_records["arrays"])
                hooks = hooks_for(HookContext(cid, config, ctx.state))
                bad = step_hooks(hooks)
                if bad:
                    raise ScenarioError(f"engine.vectorize cannot run client hook(s) {bad}")
                for hook in hooks:
                    hook.on_receive(model)
                start = {n: p.detach().clone() for n, p in model.named_parameters()}
                x, y = rt.data.client_train(cid)
                rnd = int(config.get("server-round", 0))
                gen = torch_generator(scenario.seed, "client-train", rnd, cid)
                plan = plan_batches(len(x), scenario.client, gen, drop)
                member = CohortMember(start, x.to(rt.device), y.to(rt.device), plan)
                prepared.append((i, cid, hooks, member))
            except Exception as exc:
                replies[i] = _error(msg, exc)
        finals, results = train_cohort(model, [p[3] for p in prepared], scenario.client)
        for (i, cid, hooks, _), final, result in zip(prepared, finals, results):
            try:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.copy_(final[name])
                arrays = model.state_dict()
                for hook in hooks:
                    arrays = hook.on_reply(model, arrays)
                replies[i] = _train_reply(msgs[i], cid, arrays, result)
            except Exception as exc:
                replies[i] = _error(msgs[i], exc)
        return replies  # type: ignore[return-value]


def _train_reply(msg: Message, cid: int, arrays: dict[str, torch.Tensor],
                 result: TrainResult) -> Message:
    metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss,
                            "train_accuracy": result.accuracy})
    content = RecordDict({
        "arrays": state_to_record(arrays),
        "metrics": metrics,
        "client": ConfigRecord({"client-id": cid, "steps": result.steps}),
    })
    return Message(content, reply_to=msg)


def _error(msg: Message, exc: Exception) -> Message:
    from flwr.app import Error

    from fedsim.engine.inprocess import CLIENT_EXCEPTION

    reason = f"client node {msg.metadata.dst_node_id} raised {type(exc).__name__}: {exc}"
    return Message(Error(code=CLIENT_EXCEPTION, reason=reason), reply_to=msg)

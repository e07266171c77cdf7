"""Vectorized cohorts: many clients' local SGD at once with ``torch.func``.

With ``engine.vectorize = true`` the in-process grid hands the train messages of a round to
:class:`CohortTrainer` in cohorts of ``engine.cohort_size``. Each client still gets its own
message, its own ``Context.state``, its own hooks (``on_receive``/``on_reply``) and its own
reply; only the local SGD steps run together: the model is called functionally
(``functional_call``) on per-client parameter stacks under ``vmap``, and autograd of the
clients' summed losses (each client's parameters reach only its own loss) computes every
client's gradient in one call.

Clients of different sizes: each client draws exactly the batches the sequential path
draws (same generator, same order). At step ``t`` only clients that still have a batch take
part (the cohort is sorted by step count, so they are a prefix and the stacks are sliced,
not copied). Where no layer mixes the samples of a batch (GN, LN, IN, no norm), a step's
batches are padded to the largest with masked samples (weight 0 in the loss), so the step
is one ``vmap`` call. Where one does (BN, hybrid), the clients train in groups of equal
batch size, so a client's last, smaller batch runs in its own group and every forward pass
sees exactly the client's batch: BN and hybrid layers normalise with the client's own batch
and update per-client running statistics, passed to ``functional_call`` as stacked buffers
and updated in place under ``vmap``.
"""

from __future__ import annotations

import copy
import logging
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.func import functional_call, vmap

from fedsim.arrays import load_record, state_to_record
from fedsim.client.app import import_strategy
from fedsim.client.compress import upload_bytes
from fedsim.client.hooks import ClientHook, HookContext, LocalArraysHook, hooks_for
from fedsim.client.runtime import client_runtime
from fedsim.client.train import TrainResult, plan_batches
from fedsim.config import ClientConfig, Scenario
from fedsim.data.federated import build_federated_data
from fedsim.engine.cohort_arrays import GlobalArrays, overlay_one, saved_arrays
from fedsim.engine.inprocess import CLIENT_EXCEPTION, set_task_identity
from fedsim.engine.vectorized_eval import EvalMember, evaluate_cohort
from fedsim.errors import ScenarioError
from fedsim.models.norm import uses_batch_statistics
from fedsim.records import get_record, require_record
from fedsim.rng import torch_generator
from fedsim.server.factory import make_strategy


def trace_problem(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> str | None:
    """Why ``model`` cannot run as a vmap cohort (one dry step of two clients and one
    evaluation), or None.

    A model whose forward pass uses something ``vmap`` cannot batch (``.item()``, data-
    dependent Python control flow) fails here, before training, instead of mid-run.
    """
    probe = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, *input_shape), generator=g)
    y = torch.randint(0, num_classes, (4,), generator=g)
    start = {n: p.detach().clone() for n, p in probe.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in probe.named_buffers()}
    plan = [torch.arange(4), torch.arange(2)]
    members = [CohortMember(start, x, y, plan, bufs), CohortMember(start, x, y, plan[:1], bufs)]
    try:
        with torch.random.fork_rng(devices=[]):
            train_cohort(probe, members, ClientConfig(epochs=1, batch_size=4))
            _trace_evaluation(probe, start, bufs, x, y)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _trace_evaluation(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor,
                      y: torch.Tensor) -> None:
    """One cohort evaluation of two clients, one with a cold start of every layer with
    running statistics (what personalized evaluation runs under ``engine.vectorize``)."""
    layers = tuple(n for n, m in model.named_modules()
                   if getattr(m, "running_mean", None) is not None)
    evaluate_cohort(model, [EvalMember(params, buffers, x, y),
                            EvalMember(params, buffers, x[:3], y[:3], x, layers)])


#: hook methods that act inside local training (per minibatch, or on the model's modes
#: before it): a cohort trains every client in one call, so they cannot run per client
_STEP_METHODS = ("before_train", "extra_loss", "after_step")


def step_hooks(hooks: Sequence[ClientHook]) -> list[str]:
    """Names of hooks that act inside local training (not vectorizable)."""
    return [type(h).__name__ for h in hooks
            if any(getattr(type(h), m, None) is not getattr(ClientHook, m, None)
                   for m in _STEP_METHODS if hasattr(ClientHook, m))]


def check_vectorize(scenario: Scenario, model: nn.Module) -> None:
    """Refuse ``engine.vectorize = true`` where a cohort could not equal the sequential path.

    Checks the engine, the model (one dry cohort step must trace under ``vmap``) and the
    client hooks the strategy asks for in its first train config (hooks that add a loss
    term or change the step, such as FedProx's proximal term, run per minibatch and are
    refused).
    """
    if not scenario.engine.vectorize:
        return
    if scenario.engine.kind != "inprocess":
        raise ScenarioError(
            f"engine.vectorize = true applies to the inprocess engine, not engine.kind = "
            f"{scenario.engine.kind!r}; set engine.vectorize = false or engine.kind = 'inprocess'"
        )
    data = build_federated_data(scenario)
    problem = trace_problem(model, data.input_shape, data.num_classes)
    if problem:
        raise ScenarioError(
            f"engine.vectorize = true cannot train model.arch = {scenario.model.arch!r} "
            f"with model.norm = {scenario.model.norm!r} as a vmap cohort ({problem}); "
            "set engine.vectorize = false"
        )
    for rnd, config in enumerate(_train_configs(scenario, model), start=1):
        names = step_hooks(hooks_for(HookContext(0, config, RecordDict())))
        if names:
            raise ScenarioError(
                f"engine.vectorize = true cannot run the client hook(s) {', '.join(names)} "
                f"that server.strategy = {scenario.server.strategy!r} asks for in round {rnd} "
                "(they act inside local training: on every minibatch's loss or step, or on "
                "the model before it); set engine.vectorize = false"
            )


class _NodeList:
    """The minimum of a Grid that Flower's sampling needs, for a dry ``configure_train``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _train_configs(scenario: Scenario, model: nn.Module) -> list[ConfigRecord]:
    """The train config the strategy sends in each round, from a throwaway strategy.

    Strategies that switch client behaviour by round (FixBN after its warm-up) are caught
    before training; one that switched on aggregation results would be caught when its
    cohort runs (every message of that cohort then fails, naming the hook).
    """
    from flwr.app import ArrayRecord

    import_strategy(scenario.server.strategy)  # registers the strategy's client hooks
    saved = random.getstate()
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # no "configure_train: Sampled ..." lines for a dry run
    set_task_identity(1)  # messages need a sender identity, as in the in-process grid
    configs = []
    try:
        strategy = make_strategy(scenario, model)
        nodes = _NodeList(scenario.num_participating)
        for rnd in range(1, scenario.server.rounds + 1):
            msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), nodes))
            configs.append(msgs[0].content.config_records.get("config", ConfigRecord())
                           if msgs else ConfigRecord())
    finally:
        random.setstate(saved)
        flwr_log.setLevel(level)
    return configs


# --------------------------------------------------------------------------- training


@dataclass
class CohortMember:
    """One client's inputs to a cohort: start state, data and its batch sequence."""

    params: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    batches: list[torch.Tensor]  # index tensors, exactly those the sequential path draws
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. BN running stats
    # the client's saved arrays (see ``saved_arrays``), laid over params/buffers when the
    # cohort is stacked: one numpy row write each instead of a tensor per client and array
    saved: dict[str, np.ndarray] = field(default_factory=dict)


def _stack(dicts: list[dict[str, torch.Tensor]], saved: list[dict[str, np.ndarray]],
           device: torch.device) -> dict[str, torch.Tensor]:
    """One stacked tensor per name, row ``i`` from ``dicts[i]`` or, where it has the name,
    from ``saved[i]`` (converted as :func:`overlay` converts)."""
    out = {}
    for n, ref in dicts[0].items():
        over = [s.get(n) for s in saved]
        np_dtype = _NUMPY_DTYPES.get(ref.dtype)
        if np_dtype is None or all(o is None for o in over):
            rows = [d[n] if o is None else overlay_one(o, ref) for d, o in zip(dicts, over)]
            out[n] = torch.stack(rows).to(device)
            continue
        stacked = np.empty((len(dicts), *ref.shape), dtype=np_dtype)
        for i, (d, o) in enumerate(zip(dicts, over)):
            if o is None:
                stacked[i] = d[n].detach().cpu().numpy()
            else:
                stacked[i] = (np.rint(o) if not ref.dtype.is_floating_point else o).reshape(
                    ref.shape)
        out[n] = torch.from_numpy(stacked).to(device)
    return out


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32}


def train_cohort(model: nn.Module, members: Sequence[CohortMember], cfg: ClientConfig,
                 as_numpy: bool = False
                 ) -> tuple[list[dict[str, torch.Tensor | np.ndarray]], list[TrainResult]]:
    """Local SGD for every member at once; returns final states and results, in order.

    At step ``t`` the members that still have a batch train together: in one call with
    masked padding when no layer mixes samples, else grouped by batch size, so every
    client's forward pass sees exactly its own batch: batch statistics (BN, hybrid) are the
    client's own, and running statistics are per-client buffers updated in place inside
    ``vmap``. The update is ``torch.optim.SGD`` (momentum,
    weight decay, no dampening or Nesterov) on stacked parameters, so each member's result
    equals ``train_local`` on its own within float tolerance. Returned states hold the
    parameters and the buffers (``as_numpy``: as numpy views on the CPU, ready to encode).
    """
    k_all = len(members)
    if k_all == 0:
        return [], []
    device = members[0].x.device
    order = sorted(range(k_all), key=lambda i: -len(members[i].batches))  # active = a prefix
    mem = [members[i] for i in order]
    saved = [m.saved for m in mem]
    params = _stack([m.params for m in mem], saved, device)
    buffers = _stack([m.buffers for m in mem], saved, device)
    n_max = max(1, max(len(m.x) for m in mem))
    xs = torch.zeros((k_all, n_max, *mem[0].x.shape[1:]), dtype=mem[0].x.dtype, device=device)
    ys = torch.zeros((k_all, n_max), dtype=torch.long, device=device)
    for i, m in enumerate(mem):
        xs[i, : len(m.x)] = m.x
        ys[i, : len(m.y)] = m.y
    run = _CohortRun(model, mem, params, buffers, xs, ys, cfg, device,
                     pad=not shares_batch_statistics(model))
    model.train()
    with warnings.catch_warnings():  # vmap's "no batching rule for lerp_" notice (hybrid)
        warnings.filterwarnings("ignore", message="There is a performance drop")
        run.sgd_steps()
    finals: list[dict[str, torch.Tensor | np.ndarray]] = [{}] * k_all
    results: list[TrainResult] = [TrainResult(float("nan"), float("nan"), 0, 0)] * k_all
    loss_cpu, correct_cpu = run.loss_sum.cpu(), run.correct.cpu()
    stacks = (*params.items(), *buffers.items())
    if as_numpy:  # row views of one CPU array per name (a[i, ...]: 0-d stays an array)
        arrays = {n: t.detach().cpu().numpy() for n, t in stacks}
        rows = {n: [a[i, ...] for i in range(k_all)] for n, a in arrays.items()}
    else:
        rows = {n: t.unbind(0) for n, t in stacks}  # views, one call per name
    for i, m in enumerate(mem):
        finals[order[i]] = {n: r[i] for n, r in rows.items()}
        if run.seen[i]:
            results[order[i]] = TrainResult(loss_cpu[i].item() / run.seen[i],
                                            correct_cpu[i].item() / run.seen[i], len(m.x),
                                            run.steps[i])
    return finals, results


def shares_batch_statistics(model: nn.Module) -> bool:
    """Whether any layer of ``model`` mixes the samples of a batch (BN, hybrid): then a
    client's forward pass must see exactly its own batch, with no padding beside it."""
    return any(getattr(m, "batch_statistics", False)
               or isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _per_client_grads(per_client):
    """``per_client(params, ...) -> (per-client losses, aux)`` as a step function returning
    ``(gradients, aux)``: ordinary autograd of the losses' sum. Each client's parameters
    reach only its own loss, so these are the per-client gradients; with ``vmap`` the only
    transform, the norm and pooling layers fold the clients into one native call
    (fedsim.models.batched), and there is no ``torch.func.grad`` level to dispatch through
    (~12% of a small-CNN cohort) or to import ``torch._dynamo`` for (~3 s, once)."""
    def step(params, *rest):
        leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
        with torch.enable_grad():
            losses, aux = per_client(leaves, *rest)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), aux
    return step


class _CohortRun:
    """One cohort's SGD steps, in place on its stacked parameters, buffers and momentum.

    ``pad``: no layer mixes samples, so at each step every active member's batch is padded
    to the step's largest with masked copies of its first sample (weight 0 in the loss):
    one ``vmap`` call per step. Otherwise members train in groups of equal batch size.
    """

    def __init__(self, model: nn.Module, mem: Sequence[CohortMember],
                 params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 xs: torch.Tensor, ys: torch.Tensor, cfg: ClientConfig, device: torch.device,
                 pad: bool) -> None:
        self.mem, self.params, self.buffers, self.xs, self.ys = mem, params, buffers, xs, ys
        self.cfg, self.device, self.pad = cfg, device, pad
        self.mom: dict[str, torch.Tensor] = {}
        self.steps = [len(m.batches) for m in mem]
        self.loss_sum = torch.zeros(len(mem), dtype=torch.float64, device=device)
        self.correct = torch.zeros(len(mem), dtype=torch.int64, device=device)
        self.seen = [0] * len(mem)

        def loss_fn(p, b, xb, yb):
            logits = functional_call(model, (p, b), (xb,))
            loss = F.cross_entropy(logits, yb)
            return loss, (loss.detach(), (logits.argmax(1) == yb).sum())

        def masked_loss_fn(p, b, xb, yb, wb):  # the mean over the samples with weight 1
            logits = functional_call(model, (p, b), (xb,))
            loss = (F.cross_entropy(logits, yb, reduction="none") * wb).sum() / wb.sum()
            return loss, (loss.detach(), ((logits.argmax(1) == yb) & (wb > 0)).sum())

        self.step_fn = _per_client_grads(vmap(loss_fn))
        self.masked_step_fn = _per_client_grads(vmap(masked_loss_fn))

    def sgd_steps(self) -> None:
        for t in range(max(self.steps)):
            active = sum(s > t for s in self.steps)  # members 0..active-1 still have a batch
            sizes = [len(self.mem[i].batches[t]) for i in range(active)]
            if len(set(sizes)) == 1:
                self._step(t, list(range(active)), sizes[0])
            elif self.pad:
                self._padded_step(t, active, sizes)
            else:
                by_size: dict[int, list[int]] = {}
                for i, size in enumerate(sizes):
                    by_size.setdefault(size, []).append(i)
                for size, group in by_size.items():
                    self._step(t, group, size)

    def _step(self, t: int, group: list[int], size: int) -> None:
        """Members ``group`` (all with batches of ``size``) take step ``t``."""
        whole = group[-1] == len(group) - 1  # a prefix: the stacks are sliced, not gathered
        sel = slice(0, len(group)) if whole else torch.tensor(group, device=self.device)
        idx = torch.stack([self.mem[i].batches[t] for i in group]).to(self.device)
        rows = torch.as_tensor(group, device=self.device)[:, None]
        p_g = {n: self.params[n][sel] for n in self.params}
        b_g = {n: self.buffers[n][sel] for n in self.buffers}
        grads, (loss, hits) = self.step_fn(p_g, b_g, self.xs[rows, idx], self.ys[rows, idx])
        with torch.no_grad():
            self.loss_sum[sel] += loss.double() * size
            if not whole:  # gathered copies: write the updated statistics back
                for n in self.buffers:
                    self.buffers[n][sel] = b_g[n]
        self._update(t, sel, p_g, grads, hits, group, [size] * len(group))

    def _padded_step(self, t: int, active: int, sizes: list[int]) -> None:
        """Members ``0..active-1`` take step ``t`` in one call, batches padded to the largest."""
        width = max(sizes)
        idx = torch.zeros((active, width), dtype=torch.long)
        weight = torch.zeros((active, width), dtype=self.xs.dtype)
        for i, size in enumerate(sizes):
            batch = self.mem[i].batches[t]
            idx[i, :size] = batch
            idx[i, size:] = batch[0]
            weight[i, :size] = 1
        idx, weight = idx.to(self.device), weight.to(self.device)
        sel = slice(0, active)
        rows = torch.arange(active, device=self.device)[:, None]
        p_g = {n: self.params[n][sel] for n in self.params}
        b_g = {n: self.buffers[n][sel] for n in self.buffers}
        grads, (loss, hits) = self.masked_step_fn(p_g, b_g, self.xs[rows, idx],
                                                  self.ys[rows, idx], weight)
        with torch.no_grad():
            self.loss_sum[sel] += loss.double() * torch.tensor(sizes, dtype=torch.float64,
                                                               device=self.device)
        self._update(t, sel, p_g, grads, hits, list(range(active)), sizes)

    def _update(self, t: int, sel, p_g: dict[str, torch.Tensor],
                grads: dict[str, torch.Tensor], hits: torch.Tensor, group: list[int],
                sizes: list[int]) -> None:
        """``torch.optim.SGD``'s step (momentum, weight decay, no dampening or Nesterov)."""
        cfg = self.cfg
        with torch.no_grad():
            self.correct[sel] += hits
            for i, size in zip(group, sizes):
                self.seen[i] += size
            for n, d_p in grads.items():
                if cfg.weight_decay:
                    d_p = d_p.add(p_g[n], alpha=cfg.weight_decay)
                if cfg.momentum:
                    if n not in self.mom:
                        self.mom[n] = torch.zeros_like(self.params[n])
                    # torch.optim.SGD: the first buffer is the gradient itself
                    buf = d_p.clone() if t == 0 else self.mom[n][sel].mul(cfg.momentum).add(d_p)
                    self.mom[n][sel] = buf
                    d_p = buf
                self.params[n][sel] = p_g[n].add(d_p, alpha=-cfg.lr)


# --------------------------------------------------------------------------- the grid's side


def swaps_arrays_only(hooks: Sequence[ClientHook]) -> bool:
    """True when every hook is a plain :class:`LocalArraysHook` (FedBN, SiloBN): it only swaps
    the client's saved arrays in and out, so a cohort applies it to the start state and the
    trained arrays directly instead of loading each client's model (same values)."""
    return all(isinstance(h, LocalArraysHook)
               and type(h).on_receive is LocalArraysHook.on_receive
               and type(h).on_reply is LocalArraysHook.on_reply for h in hooks)


class CohortTrainer:
    """The in-process grid's ``cohort_trainer``: train messages in, one reply per message.

    Mirrors ``fedsim.client.app.handle_train`` per client (global arrays, hooks' ``on_receive``
    and ``on_reply``, the same metrics and ``client`` record); a client whose own preparation
    or reply fails gets an error reply, the others are unaffected.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def __call__(self, msgs: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
        scenario = self.scenario
        rt = client_runtime(scenario)
        model = rt.model
        drop = uses_batch_statistics(scenario.model.norm)
        replies: list[Message | None] = [None] * len(msgs)
        prepared: list[tuple[int, int, list[ClientHook], CohortMember]] = []
        global_arrays = GlobalArrays(model)
        for i, (msg, ctx) in enumerate(zip(msgs, contexts)):
            try:
                cid = rt.client_id(ctx)
                config = get_record(msg.content, "config", ConfigRecord) or ConfigRecord()
                record = require_record(msg.content, "arrays", ArrayRecord)
                import_strategy(scenario.server.strategy)
                hooks = hooks_for(HookContext(cid, config, ctx.state, message=msg.content,
                                              client=scenario.client, seed=scenario.seed))
                bad = step_hooks(hooks)
                if bad:
                    raise ScenarioError(f"engine.vectorize cannot run client hook(s) {bad}")
                saved: dict[str, np.ndarray] = {}
                if not hooks or swaps_arrays_only(hooks):
                    start, bufs = global_arrays(record)
                    for hook in hooks:  # the client's saved arrays, laid over the global ones
                        rec = get_record(hook.ctx.state, hook.state_key, ArrayRecord)
                        if rec is not None:  # when the cohort is stacked
                            saved.update(saved_arrays(rec, start, bufs))
                else:
                    load_record(model, record)
                    for hook in hooks:
                        hook.on_receive(model)
                    start = {n: p.detach().clone() for n, p in model.named_parameters()}
                    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
                x, y = rt.data.client_train(cid)
                rnd = int(config.get("server-round", 0))
                gen = torch_generator(scenario.seed, "client-train", rnd, cid)
                plan = plan_batches(len(x), scenario.client, gen, drop)
                member = CohortMember(start, x.to(rt.device), y.to(rt.device), plan, bufs,
                                      saved)
                prepared.append((i, cid, hooks, member))
            except Exception as exc:
                replies[i] = _error(msg, exc)
        finals, results = train_cohort(model, [p[3] for p in prepared], scenario.client,
                                       as_numpy=True)
        keys = list(model.state_dict())  # reply arrays in state_dict order, as handle_train
        local_keys: dict[type, list[str]] = {}  # per hook class, where keys_from_model_only
        for (i, cid, hooks, _), final, result in zip(prepared, finals, results):
            try:
                if hooks and not swaps_arrays_only(hooks):  # hooks see the trained model
                    with torch.no_grad():
                        for name, t in (*model.named_parameters(), *model.named_buffers()):
                            t.copy_(torch.from_numpy(final[name]))
                    arrays = model.state_dict()
                    for hook in hooks:
                        arrays = hook.on_reply(model, arrays)
                else:  # numpy views: LocalArraysHook.on_reply encodes them as it would tensors
                    arrays = {k: final[k] for k in keys}
                    for hook in hooks:  # saves its arrays, drops them from the upload
                        cls = type(hook)
                        if not cls.keys_from_model_only:
                            arrays = hook.on_reply(model, arrays)
                            continue
                        if cls not in local_keys:
                            local_keys[cls] = hook.local_keys(model)
                        arrays = hook.keep_local(arrays, local_keys[cls])
                replies[i] = _train_reply(msgs[i], cid, arrays, result,
                                          upload_bytes(arrays, hooks))
            except Exception as exc:
                replies[i] = _error(msgs[i], exc)
        return replies  # type: ignore[return-value]


def _train_reply(msg: Message, cid: int, arrays: dict[str, torch.Tensor],
                 result: TrainResult, nbytes: int) -> Message:
    metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss,
                            "train_accuracy": result.accuracy})
    content = RecordDict({
        "arrays": state_to_record(arrays),
        "metrics": metrics,
        "client": ConfigRecord({"client-id": cid, "steps": result.steps,
                                "upload-bytes": nbytes}),
    })
    return Message(content, reply_to=msg)


def _error(msg: Message, exc: Exception) -> Message:
    from flwr.app import Error

    reason = f"client node {msg.metadata.dst_node_id} raised {type(exc).__name__}: {exc}"
    return Message(Error(code=CLIENT_EXCEPTION, reason=reason), reply_to=msg)

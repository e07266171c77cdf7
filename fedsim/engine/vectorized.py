"""Vectorized cohorts: many clients' local SGD at once with ``torch.func``.

The cohort backend of the client computation (:mod:`fedsim.client.step`), whose sequential
backend is :func:`fedsim.client.train.train_local`: the same loss, hook terms, gradient
transforms and SGD update, run on per-client parameter stacks. With ``engine.vectorize =
true`` the in-process grid hands the train messages of a round to :class:`CohortTrainer` in
cohorts of ``engine.cohort_size``. Each client still gets its own message decoding and reply
(:mod:`fedsim.client.messages`), its own ``Context.state`` and its own hooks, which act on
arrays (``on_receive``/``on_reply``), on the template model's modes (``before_train``: clients
with the same modes train together) and on the step (per-client state stacked over the
cohort; a cap on the steps). Only the local SGD steps run together: the model is called
functionally (``functional_call``) on the stacks under ``vmap``, and autograd of the
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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Context, Message
from torch import nn
from torch.func import functional_call, vmap

from fedsim.client.bn_moments import statistics_keys
from fedsim.client.hooks import sets_modes
from fedsim.client.messages import (
    ClientRequest,
    decode,
    error_reply,
    train_reply,
    wants_bn_moments,
)
from fedsim.client.runtime import ClientRuntime
from fedsim.client.step import (
    SGD,
    HookTerms,
    Trained,
    apply_modes,
    as_tensor_like,
    cross_entropy,
    hits,
    hook_loss,
    select_state,
    set_modes,
    stack_states,
    transform_grads,
)
from fedsim.client.train import TrainResult, plan_batches
from fedsim.config import ClientConfig
from fedsim.context import RunContext
from fedsim.data.federated import FederatedData
from fedsim.data.windows import stack_padded
from fedsim.engine.cohort_arrays import GlobalArrays, client_start
from fedsim.engine.cohort_moments import cohort_exact_statistics
from fedsim.engine.vectorized_eval import EvalMember, evaluate_cohort
from fedsim.errors import ScenarioError
from fedsim.models.batched import fold_for_cohort
from fedsim.models.bn_statistics import bn_layers
from fedsim.models.norm import (
    has_running_statistics,
    model_uses_batch_statistics,
)
from fedsim.rng import torch_generator


def trace_problem(model: nn.Module, data: FederatedData) -> str | None:
    """Why ``model`` cannot run as a vmap cohort (one dry step of two clients and one
    evaluation on inputs like ``data``'s), or None.

    A model whose forward pass uses something ``vmap`` cannot batch (``.item()``, data-
    dependent Python control flow) fails here, before training, instead of mid-run.
    """
    probe = fold_for_cohort(model)  # the layers a cohort runs
    g = torch.Generator().manual_seed(0)
    x = data.example_inputs(4, g)
    y = torch.randint(0, data.num_classes, (4,), generator=g)
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
    layers = tuple(n for n, m in model.named_modules() if has_running_statistics(m))
    evaluate_cohort(model, [EvalMember(params, buffers, x, y),
                            EvalMember(params, buffers, x[:3], y[:3], x, layers)])


def trace_key(run: RunContext) -> tuple:
    """What the dry cohort step of :func:`trace_problem` depends on: the model settings, the
    dataset and its input shape and classes (the model is built from exactly these; its
    weights, the partition, the learning rate and the seed do not change whether it
    traces)."""
    return (run.scenario.model, run.scenario.data.name, tuple(run.data.input_shape),
            run.data.num_classes)


def check_vectorize(run: RunContext, model: nn.Module,
                    traced: dict[tuple, str | None] | None = None) -> None:
    """Refuse ``engine.vectorize = true`` where a cohort cannot run, before training.

    Checks the engine and the model: one dry cohort step must trace under ``vmap`` (a model
    that calls ``.item()`` or branches on data cannot). Every client hook runs in a cohort
    (its terms are part of the step), so hooks are not checked; DP-SGD is refused with the
    other ``[client.dp]`` checks (:func:`fedsim.validate.check_client_dp`). ``model`` is
    one of ``run``'s, whose data gives the input shape. ``traced`` (a sweep's preflight of
    many cells) keeps each outcome by :func:`trace_key`, so cells that differ only in seed,
    partition or learning rate trace once.
    """
    scenario = run.scenario
    if not scenario.engine.vectorize:
        return
    if scenario.engine.kind not in ("inprocess", "ray"):
        raise ScenarioError(
            f"engine.vectorize = true applies to the inprocess and ray engines, not "
            f"engine.kind = {scenario.engine.kind!r}; set engine.vectorize = false or "
            "engine.kind = 'inprocess'"
        )
    key = trace_key(run)
    if traced is not None and key in traced:
        problem = traced[key]
    else:
        problem = trace_problem(model, run.data)
        if traced is not None:
            traced[key] = problem
    if problem:
        raise ScenarioError(
            f"engine.vectorize = true cannot train model.arch = {scenario.model.arch!r} "
            f"with model.norm = {scenario.model.norm!r} as a vmap cohort ({problem}); "
            "set engine.vectorize = false"
        )


# --------------------------------------------------------------------------- training


@dataclass
class CohortMember:
    """One client's inputs to a cohort: start state, data, its batch sequence and the terms
    its hooks add to the step (:class:`fedsim.client.step.HookTerms`; members of one
    ``train_cohort`` call share the terms' ``key``)."""

    params: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    batches: list[torch.Tensor]  # index tensors, exactly those the sequential path draws
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. BN running stats
    # arrays the client's hooks laid over params/buffers (ClientArrays.overrides), written
    # into the stacks when the cohort is stacked: one numpy row write each instead of a
    # tensor per client and array
    saved: dict[str, np.ndarray | torch.Tensor] = field(default_factory=dict)
    terms: HookTerms | None = None


def _stack(dicts: list[dict[str, torch.Tensor]], saved: list[dict[str, np.ndarray]],
           device: torch.device) -> dict[str, torch.Tensor]:
    """One stacked tensor per name, row ``i`` from ``dicts[i]`` or, where it has the name,
    from ``saved[i]`` (converted as :func:`fedsim.client.step.as_tensor_like` converts).

    Built on ``device``: rows shared by every member (a cohort's clients start from one
    received global tensor) are expanded there, and only the overridden rows are stacked
    on the host and copied, in one transfer per name.
    """
    out = {}
    where: dict[tuple[int, ...], torch.Tensor] = {}  # overridden rows -> their index tensor
    for n, ref in dicts[0].items():
        over = [s.get(n) for s in saved]
        np_dtype = _NUMPY_DTYPES.get(ref.dtype)
        if np_dtype is None or all(o is None for o in over):
            rows = [d[n] if o is None else as_tensor_like(o, ref) for d, o in zip(dicts, over)]
            out[n] = torch.stack(rows).to(device)
            continue
        rows_over = tuple(i for i, o in enumerate(over) if o is not None)
        stacked = np.empty((len(rows_over), *ref.shape), dtype=np_dtype)
        for j, i in enumerate(rows_over):
            o = over[i]
            if isinstance(o, torch.Tensor):
                o = o.detach().cpu().numpy()
            stacked[j] = (np.rint(o) if not ref.dtype.is_floating_point else o).reshape(
                ref.shape)
        written = torch.from_numpy(stacked).to(device)
        if len(rows_over) == len(dicts):
            out[n] = written
            continue
        if all(d[n] is ref for d, o in zip(dicts, over) if o is None):
            base = ref.detach().to(device).expand(len(dicts), *ref.shape).clone()
        else:
            base = torch.stack([d[n].detach().to(device, ref.dtype) for d in dicts])
        if rows_over not in where:
            where[rows_over] = torch.tensor(rows_over, dtype=torch.long).to(device)
        base[where[rows_over]] = written
        out[n] = base
    return out


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32}


def train_cohort(model: nn.Module, members: Sequence[CohortMember], cfg: ClientConfig,
                 as_numpy: bool = False, modes: tuple[bool, ...] | None = None
                 ) -> tuple[list[dict[str, torch.Tensor | np.ndarray]], list[TrainResult]]:
    """Local SGD for every member at once; returns final states and results, in order.

    The cohort backend of :mod:`fedsim.client.step`: the same loss, hook terms, gradient
    transforms and :class:`~fedsim.client.step.SGD` update as ``train_local``, on stacked
    parameters. At step ``t`` the members that still have a batch train together: in one
    call with masked padding when no layer mixes samples, else grouped by batch size, so
    every client's forward pass sees exactly its own batch: batch statistics (BN, hybrid)
    are the client's own, and running statistics are per-client buffers updated in place
    inside ``vmap``. Each member's result equals ``train_local`` on its own within float
    tolerance. ``modes``: the modules' train/eval modes (:func:`fedsim.client.step.mode_key`;
    default all training). Returned states hold the parameters and the buffers
    (``as_numpy``: as numpy views on the CPU, ready to encode).
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
    xs, ys = _padded_data(mem, device)
    run = _CohortRun(model, mem, params, buffers, xs, ys, cfg, device,
                     pad=not shares_batch_statistics(model))
    if modes is None:
        model.train()
    else:
        apply_modes(model, modes)
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


def _padded_data(mem: Sequence[CohortMember], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' data as zero-padded stacks ``(k, n_max, ...)`` and ``(k, n_max)``, built
    on the device from the members' (device) tensors in a few calls, however many members:
    one concatenation per stack and one scatter through a row index made with numpy and
    copied once (a copy per member costs a kernel launch each on an accelerator). Token
    windows stay views (:func:`fedsim.data.windows.stack_padded`): a cohort of text
    clients holds their texts once, not ``seq_len`` copies of them."""
    lengths = np.array([len(m.x) for m in mem], dtype=np.int64)
    k, n_max = len(mem), max(1, int(lengths.max()))
    ys = torch.zeros((k, n_max), dtype=torch.long, device=device)
    # token windows (views of each client's text): stacked as texts, still one view
    xs = stack_padded([m.x for m in mem], n_max, device) if lengths.all() else None
    if xs is not None:
        for i, m in enumerate(mem):
            ys[i, : len(m.y)] = m.y
        return xs, ys
    xs = torch.zeros((k, n_max, *mem[0].x.shape[1:]), dtype=mem[0].x.dtype, device=device)
    if not lengths.any():
        return xs, ys
    # row i * n_max + j of the flattened stacks takes member i's sample j
    starts = np.repeat(np.arange(k, dtype=np.int64) * n_max - np.cumsum(lengths) + lengths,
                       lengths)
    rows = torch.from_numpy(starts + np.arange(int(lengths.sum()), dtype=np.int64)).to(device)
    flat_x = torch.cat([m.x for m in mem]).to(xs.dtype)
    xs.view(k * n_max, *xs.shape[2:]).index_copy_(0, rows, flat_x)
    ys.view(k * n_max).index_copy_(0, rows, torch.cat([m.y for m in mem]).long())
    return xs, ys


def shares_batch_statistics(model: nn.Module) -> bool:
    """Whether any layer of ``model`` mixes the samples of a batch (BN, hybrid): then a
    client's forward pass must see exactly its own batch, with no padding beside it."""
    return model_uses_batch_statistics(model)


def _per_client_grads(per_client):
    """``per_client(params, ...) -> (per-client losses, aux)`` as a step function returning
    ``(gradients, aux)``: ordinary autograd of the losses' sum. Each client's parameters
    reach only its own loss, so these are the per-client gradients; with ``vmap`` the only
    transform, the norm and pooling layers fold the clients into one native call
    (fedsim.models.batched), and there is no ``torch.func.grad`` level to dispatch through
    or to import ``torch._dynamo`` for."""
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
    one ``vmap`` call per step. Otherwise members train in groups of equal batch size. The
    members' hook terms (one client's hooks, every client's stacked step state) join the
    loss inside ``vmap`` and transform the per-client gradients.
    """

    def __init__(self, model: nn.Module, mem: Sequence[CohortMember],
                 params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 xs: torch.Tensor, ys: torch.Tensor, cfg: ClientConfig, device: torch.device,
                 pad: bool) -> None:
        self.mem, self.params, self.buffers, self.xs, self.ys = mem, params, buffers, xs, ys
        self.device, self.pad = device, pad
        self.sgd = SGD.of(cfg)
        self.mom: dict[str, torch.Tensor] = {}
        self.steps = [len(m.batches) for m in mem]
        # the padding mask's dtype: the parameters' (inputs may be integer token ids)
        self.loss_dtype = next((p.dtype for p in params.values() if p.is_floating_point()),
                               torch.get_default_dtype())
        self.loss_sum = torch.zeros(len(mem), dtype=torch.float64, device=device)
        self.correct = torch.zeros(len(mem), dtype=torch.int64, device=device)
        self.seen = [0] * len(mem)
        terms = mem[0].terms
        hooks = terms.active_hooks if terms else []
        self.hooks = hooks
        self.states = ([stack_states([m.terms.active_states[j] for m in mem])
                        for j in range(len(hooks))] if hooks else [])

        def loss_fn(p, b, xb, yb, states, wb=None):
            logits = functional_call(model, (p, b), (xb,))
            loss = cross_entropy(logits, yb, wb)
            full = loss
            if hooks:
                extra = hook_loss(hooks, p, states)
                if extra is not None:
                    full = full + extra
            return full, (loss.detach(), hits(logits, yb, wb))

        self.step_fn = _per_client_grads(vmap(loss_fn))
        self.transform = vmap(lambda g, st: transform_grads(hooks, g, st)) if hooks else None

    def _plan(self) -> None:
        """Every member's batch sequence as device tensors, made once per cohort: ``plan[t,
        i, :size]`` is member ``i``'s batch ``t`` (padded with its first sample), ``sizes[t,
        i]`` its size (0 once it has no batch left), and the index of every group of
        members that is not a prefix of the cohort. One host-to-device copy each; the steps
        slice them."""
        mem = self.mem
        steps = max(self.steps)
        self.step_sizes = [[len(m.batches[t]) for m in mem[: sum(s > t for s in self.steps)]]
                           for t in range(steps)]
        width = max((max(sz) for sz in self.step_sizes), default=0)
        plan = np.zeros((steps, len(mem), width), dtype=np.int64)  # numpy: cheap row writes
        sizes = np.zeros((steps, len(mem)), dtype=np.int64)
        for i, m in enumerate(mem):
            for t, batch in enumerate(m.batches):
                b = batch.cpu().numpy()
                plan[t, i, : len(b)] = b
                plan[t, i, len(b):] = b[0]
                sizes[t, i] = len(b)
        self.groups: list[list[tuple[list[int], int, object]]] = []  # per step: group, size, sel
        offsets: list[tuple[int, int]] = []
        flat: list[int] = []
        for sz in self.step_sizes:
            by_size: dict[int, list[int]] = {}
            if len(set(sz)) == 1 or self.pad:
                by_size[sz[0]] = list(range(len(sz)))
            else:
                for i, size in enumerate(sz):
                    by_size.setdefault(size, []).append(i)
            step = []
            for size, group in by_size.items():
                if group[-1] == len(group) - 1:  # a prefix: the stacks are sliced
                    step.append((group, size, slice(0, len(group))))
                else:
                    step.append((group, size, len(offsets)))
                    offsets.append((len(flat), len(flat) + len(group)))
                    flat.extend(group)
            self.groups.append(step)
        self.plan = torch.from_numpy(plan).to(self.device)
        self.sizes = torch.from_numpy(sizes).to(self.device)
        self.positions = torch.arange(len(mem), device=self.device)
        chosen = torch.tensor(flat, dtype=torch.long).to(self.device)
        for t, step in enumerate(self.groups):
            self.groups[t] = [(g, size, sel if isinstance(sel, slice)
                               else chosen[offsets[sel][0]:offsets[sel][1]])
                              for g, size, sel in step]

    def sgd_steps(self) -> None:
        self._plan()
        for t, step in enumerate(self.groups):
            sizes = self.step_sizes[t]
            if self.pad and len(set(sizes)) > 1:
                self._padded_step(t, len(sizes), sizes)
                continue
            for group, size, sel in step:
                self._step(t, group, size, sel)

    def _step(self, t: int, group: list[int], size: int, sel) -> None:
        """Members ``group`` (all with batches of ``size``) take step ``t``; ``sel`` selects
        them from the stacks (a slice for a prefix, else their index on the device)."""
        whole = isinstance(sel, slice)
        rows = (self.positions[sel] if whole else sel)[:, None]
        idx = self.plan[t, sel, :size]
        p_g = {n: self.params[n][sel] for n in self.params}
        b_g = {n: self.buffers[n][sel] for n in self.buffers}
        states = [select_state(st, sel) for st in self.states]
        grads, (loss, hit) = self.step_fn(p_g, b_g, self.xs[rows, idx], self.ys[rows, idx],
                                          states)
        with torch.no_grad():
            self.loss_sum[sel] += loss.double() * size
            if not whole:  # gathered copies: write the updated statistics back
                for n in self.buffers:
                    self.buffers[n][sel] = b_g[n]
        self._update(t, sel, p_g, grads, states, hit, group, [size] * len(group))

    def _padded_step(self, t: int, active: int, sizes: list[int]) -> None:
        """Members ``0..active-1`` take step ``t`` in one call, batches padded to the largest
        (the padding has weight 0 in the loss)."""
        width = max(sizes)
        sel = slice(0, active)
        idx = self.plan[t, sel, :width]
        size = self.sizes[t, sel]
        weight = (torch.arange(width, device=self.device) < size[:, None]).to(self.loss_dtype)
        rows = self.positions[sel][:, None]
        p_g = {n: self.params[n][sel] for n in self.params}
        b_g = {n: self.buffers[n][sel] for n in self.buffers}
        states = [select_state(st, sel) for st in self.states]
        grads, (loss, hit) = self.step_fn(p_g, b_g, self.xs[rows, idx], self.ys[rows, idx],
                                          states, weight)
        with torch.no_grad():
            self.loss_sum[sel] += loss.double() * size.double()
        self._update(t, sel, p_g, grads, states, hit, list(range(active)), sizes)

    def _update(self, t: int, sel, p_g: dict[str, torch.Tensor],
                grads: dict[str, torch.Tensor], states: list, hit: torch.Tensor,
                group: list[int], sizes: list[int]) -> None:
        """The hooks' gradient transforms, then the step's SGD update on the stacks."""
        with torch.no_grad():
            self.correct[sel] += hit
            for i, size in zip(group, sizes):
                self.seen[i] += size
            if self.transform is not None:
                grads = self.transform(grads, states)
            # torch.optim.SGD: the first momentum buffer is the gradient itself (t == 0)
            mom = {n: self.mom[n][sel] for n in self.mom} if t else {}
            new = self.sgd.update(p_g, grads, mom)
            for n, p in new.items():
                self.params[n][sel] = p
            for n, buf in mom.items():
                if n not in self.mom:
                    self.mom[n] = torch.zeros_like(self.params[n])
                self.mom[n][sel] = buf


# --------------------------------------------------------------------------- the grid's side




class CohortTrainer:
    """The in-process grid's ``cohort_trainer``: train messages in, one reply per message.

    Runs what ``fedsim.client.app.handle_train`` runs per client — the same decoding and
    replies (:mod:`fedsim.client.messages`), the hooks' ``on_receive``/``before_train``/
    ``after_train``/``on_reply`` on arrays and on the template model's modes, their terms
    inside the step — with the local steps of clients whose hooks agree on the modes and
    the terms in one cohort. A client whose preparation or reply fails (or whose hook
    raises, such as a simulated crash) gets an error reply; the others are unaffected.
    ``runtime`` is the run's client runtime, shared with the ClientApp (settings, data,
    each worker's folded cohort model).
    """

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime

    def __call__(self, msgs: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
        rt = self.runtime
        cfg = rt.settings
        model = rt.cohort_model
        drop = cfg.batch_statistics
        replies: list[Message | None] = [None] * len(msgs)
        prepared: list[tuple[int, ClientRequest, CohortMember]] = []
        groups: dict[tuple, list[int]] = {}  # (modes, terms, moments) -> indices into prepared
        global_arrays = GlobalArrays(model)
        all_train = current = set_modes(model, ())
        for i, (msg, ctx) in enumerate(zip(msgs, contexts)):
            cid = None
            try:
                cid = rt.client_id(ctx)
                req = decode(msg, ctx, cfg, cid)
                params, bufs = global_arrays(req.arrays)
                arrays = client_start(model, params, bufs, req.hooks,
                                      lambda cid=cid: rt.data.client_train(cid))
                if sets_modes(req.hooks):
                    modes = current = set_modes(model, req.hooks)
                elif req.hooks and current != all_train:  # leave the model as set_modes would
                    apply_modes(model, all_train)
                    modes = current = all_train
                else:  # model.train() and hooks that keep its modes: nothing to walk
                    modes = all_train
                terms = HookTerms(req.hooks, {n: arrays[n] for n in params})
                x, y = rt.client_train(cid)  # on the run's device, kept there for the run
                gen = torch_generator(cfg.seed, "client-train", req.server_round, cid)
                plan = plan_batches(len(x), cfg.client, gen, drop)
                if terms.max_steps is not None:
                    plan = plan[: terms.max_steps]
                member = CohortMember(params, x, y, plan, bufs,
                                      arrays.overrides, terms)
                groups.setdefault((modes, terms.key, wants_bn_moments(req)),
                                  []).append(len(prepared))
                prepared.append((i, req, member))
            except Exception as exc:
                replies[i] = error_reply(msg, exc, cid)
        keys = list(model.state_dict())  # reply arrays in state_dict order, as handle_train
        for (modes, _, moments), group in groups.items():
            finals, results = train_cohort(model, [prepared[j][2] for j in group],
                                           cfg.client, as_numpy=True, modes=modes)
            uploads = []  # (j, upload arrays, final arrays, result) of clients still fine
            for j, final, result in zip(group, finals, results):
                i, req, member = prepared[j]
                try:
                    trained = Trained(len(member.batches), cfg.client.lr)
                    for hook in req.hooks:
                        hook.after_train(model, trained)
                    if req.hooks:  # hooks edit tensors; without them the rows go as they are
                        arrays = {k: torch.from_numpy(final[k]) for k in keys}
                        for hook in req.hooks:
                            arrays = hook.on_reply(model, arrays)
                    else:
                        arrays = {k: final[k] for k in keys}
                    uploads.append((j, arrays, final, result))
                except Exception as exc:
                    replies[i] = error_reply(msgs[i], exc, req.client_id)
            counts = self._exact_moments(model, uploads, prepared, msgs, replies) \
                if moments else {}
            for j, arrays, _, result in uploads:
                i, req, _ = prepared[j]
                if replies[i] is None:
                    try:
                        replies[i] = train_reply(req, arrays, result, None, counts.get(j))
                    except Exception as exc:
                        replies[i] = error_reply(msgs[i], exc, req.client_id)
        model.train()
        return replies  # type: ignore[return-value]

    @staticmethod
    def _exact_moments(model: nn.Module, uploads: list, prepared: list, msgs: Sequence[Message],
                       replies: list) -> dict[int, dict[str, int]]:
        """``server.bn_statistics = "pooled"``: in each upload, the running statistics it
        still holds after the hooks replaced by exact moments under the client's trained
        arrays (:func:`fedsim.engine.cohort_moments.cohort_exact_statistics`), as
        ``handle_train`` does one client at a time; returns the counts by upload index."""
        if not uploads:
            return {}
        layers = bn_layers(model, prepared[uploads[0][0]][2].x)
        by_layers: dict[tuple[str, ...], list] = {}
        for upload in uploads:
            names = tuple(n for n, _ in layers
                          if all(k in upload[1] for k in statistics_keys(n)))
            by_layers.setdefault(names, []).append(upload)
        modules = dict(layers)
        out: dict[int, dict[str, int]] = {}
        for names, members in by_layers.items():
            if not names:
                out.update({j: {} for j, *_ in members})
                continue
            try:
                counts = cohort_exact_statistics(
                    model, [final for _, _, final, _ in members],
                    [prepared[j][2].x for j, *_ in members], [(n, modules[n]) for n in names])
            except Exception as exc:
                for j, *_ in members:
                    i, req, _ = prepared[j]
                    replies[i] = error_reply(msgs[i], exc, req.client_id)
                continue
            for (j, arrays, final, _), count in zip(members, counts):
                for n in names:
                    for k in statistics_keys(n):
                        arrays[k] = final[k]
                out[j] = count
        return out

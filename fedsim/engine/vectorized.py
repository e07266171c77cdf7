"""Vectorized cohorts: many clients' rounds at once, the cohort backend of the one pipeline.

With ``engine.vectorize = true`` the in-process grid (and each Ray cohort actor) hands the
train messages of a round to :class:`CohortTrainer` in cohorts of ``engine.cohort_size``.
Each client goes through the same pipeline as one client at a time
(:mod:`fedsim.client.pipeline`): its own message decoding, start arrays, hooks, batch plan
and gradient rule, ``Context.state`` and reply. Only the step loop
(:func:`fedsim.models.local_sgd.local_steps`) runs for the cohort together, on
:class:`CohortBackend`: the model is called functionally (``functional_call``) on stacked
per-client parameters under ``vmap``, and autograd of the clients' summed losses (each
client's parameters reach only its own loss) computes every client's gradient in one call.
Hooks act on arrays (``on_receive``/``on_reply``), on the template model's modes
(``before_train``: clients with the same modes train together) and on the step
(per-client state stacked over the cohort; a cap on the steps).

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

DP-SGD (``[client.dp]``) runs in cohorts too: each step's Poisson batches are padded to the
largest (weight 0), per-sample gradients nest inside the cohort (``vmap`` over clients of
``vmap(grad)`` over samples), and :class:`fedsim.models.dp_sgd.DPSGD` clips, sums and noises
them per client, each client's noise from its own generator, as when it trains alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Context, Message
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.client.bn_moments import statistics_keys
from fedsim.client.hooks import sets_modes
from fedsim.client.messages import error_reply, wants_bn_moments
from fedsim.client.pipeline import ClientRound, prepare, reply, upload
from fedsim.client.runtime import ClientRuntime
from fedsim.client.step import GlobalArrays, as_tensor_like
from fedsim.config import ClientConfig
from fedsim.context import RunContext
from fedsim.data.federated import FederatedData
from fedsim.data.windows import stack_padded
from fedsim.engine.cohort_moments import cohort_exact_statistics
from fedsim.engine.vectorized_eval import EvalMember, evaluate_cohort
from fedsim.errors import ScenarioError
from fedsim.models.batched import fold_for_cohort
from fedsim.models.bn_statistics import bn_layers
from fedsim.models.dp_sgd import DPSGD, PoissonBatches
from fedsim.models.local_sgd import (
    BATCH_MEAN,
    BatchPlan,
    FixedBatches,
    GradientRule,
    Step,
    local_steps,
    per_sample_loss,
)
from fedsim.models.norm import has_running_statistics, model_uses_batch_statistics
from fedsim.models.sgd_step import (
    SGD,
    HookTerms,
    Tensors,
    Trained,
    TrainResult,
    apply_modes,
    cross_entropy,
    hits,
    hook_loss,
    select_state,
    set_modes,
    stack_states,
    transform_grads,
)

__all__ = ["CohortBackend", "CohortMember", "CohortTrainer", "check_vectorize",
           "train_cohort", "trace_key", "trace_problem"]


def trace_problem(model: nn.Module, data: FederatedData, dp: bool = False) -> str | None:
    """Why ``model`` cannot run as a vmap cohort (one dry step of two clients and one
    evaluation on inputs like ``data``'s; ``dp``: also one DP-SGD step, per-sample
    gradients nested in the cohort), or None.

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
    cfg = ClientConfig(epochs=1, batch_size=4)
    try:
        with torch.random.fork_rng(devices=[]):
            train_cohort(probe, members, cfg)
            if dp:
                dp_members = [CohortMember(start, x, y, PoissonBatches(4, 0.5, 2, g, 1.0), bufs),
                              CohortMember(start, x, y, PoissonBatches(4, 0.5, 1, g, 1.0), bufs)]
                train_cohort(probe, dp_members, cfg, rule=DPSGD(1.0))
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
    traces; under ``[client.dp]`` a DP-SGD step is traced too)."""
    return (run.scenario.model, run.scenario.data.name, tuple(run.data.input_shape),
            run.data.num_classes, run.scenario.client.dp.enabled)


def check_vectorize(run: RunContext, model: nn.Module,
                    traced: dict[tuple, str | None] | None = None) -> None:
    """Refuse ``engine.vectorize = true`` where a cohort cannot run, before training.

    Checks the engine and the model: one dry cohort step must trace under ``vmap`` (a model
    that calls ``.item()`` or branches on data cannot), and under ``[client.dp]`` one
    DP-SGD step with per-sample gradients nested in the cohort. Every client hook runs in a
    cohort (its terms are part of the step), so hooks are not checked. ``model`` is one of
    ``run``'s, whose data gives the input shape. ``traced`` (a sweep's preflight of many
    cells) keeps each outcome by :func:`trace_key`, so cells that differ only in seed,
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
        problem = (trace_problem(model, run.data, dp=True) if scenario.client.dp.enabled
                   else trace_problem(model, run.data))
        if traced is not None:
            traced[key] = problem
    if problem:
        what = " with [client.dp] (DP-SGD)" if scenario.client.dp.enabled else ""
        raise ScenarioError(
            f"engine.vectorize = true cannot train model.arch = {scenario.model.arch!r} "
            f"with model.norm = {scenario.model.norm!r}{what} as a vmap cohort ({problem}); "
            "set engine.vectorize = false"
        )


# --------------------------------------------------------------------------- the backend


@dataclass
class CohortMember:
    """One client's inputs to a cohort: start state, data, its batch plan and the terms
    its hooks add to the step (:class:`fedsim.models.sgd_step.HookTerms`; members of one
    ``train_cohort`` call share the terms' ``key``)."""

    params: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    batches: list[torch.Tensor] | BatchPlan  # index tensors (what the sequential path draws)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. BN running stats
    # arrays the client's hooks laid over params/buffers (ClientArrays.overrides), written
    # into the stacks when the cohort is stacked: one numpy row write each instead of a
    # tensor per client and array
    saved: dict[str, np.ndarray | torch.Tensor] = field(default_factory=dict)
    terms: HookTerms | None = None

    @property
    def plan(self) -> BatchPlan:
        b = self.batches
        return FixedBatches(b) if isinstance(b, list) else b


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
            if all(d[n] is ref for d in dicts) and all(o is None for o in over):
                out[n] = ref.detach().to(device).expand(len(dicts), *ref.shape).clone()
                continue
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


class CohortBackend:
    """The step loop's cohort backend: the members' parameters, buffers and momentum
    stacked along dim 0 and updated in place (see the module docstring).

    ``members`` are sorted by step count, so the members that still have a step are a
    prefix. ``pad``: no layer mixes samples, so at each step every active member's batch
    is padded to the step's largest with masked copies of its first sample (weight 0 in the
    loss): one ``vmap`` call per step. Otherwise members train in groups of equal batch
    size. The members' hook terms (one client's hooks, every client's stacked step state)
    join the loss inside ``vmap`` and transform the per-client gradients.
    """

    def __init__(self, model: nn.Module, members: Sequence[CohortMember], cfg: ClientConfig,
                 device: torch.device, pad: bool) -> None:
        self.model, self.mem, self.device, self.pad = model, members, device, pad
        saved = [m.saved for m in members]
        self.params = _stack([m.params for m in members], saved, device)
        self.buffers = _stack([m.buffers for m in members], saved, device)
        self.xs, self.ys = _padded_data(members, device)
        self.plans = [m.plan for m in members]
        self.sgd = SGD.of(cfg)
        self.mom: dict[str, torch.Tensor] = {}
        self.steps_of = [p.steps for p in self.plans]
        # the padding mask's dtype: the parameters' (inputs may be integer token ids)
        self.loss_dtype = next((p.dtype for p in self.params.values()
                                if p.is_floating_point()), torch.get_default_dtype())
        self.loss_sum = torch.zeros(len(members), dtype=torch.float64, device=device)
        self.correct = torch.zeros(len(members), dtype=torch.int64, device=device)
        self.seen = [0] * len(members)
        self.positions = torch.arange(len(members), device=device)
        terms = members[0].terms
        hooks = terms.active_hooks if terms else []
        self.hooks = hooks
        self.states = ([stack_states([m.terms.active_states[j] for m in members])
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
        self.transform_fn = (vmap(lambda g, st: transform_grads(hooks, g, st)) if hooks
                             else None)
        self.sample_fn = vmap(vmap(grad(per_sample_loss(model), has_aux=True),
                                   in_dims=(None, None, 0, 0)))

    def run(self, rule: GradientRule) -> None:
        """The step loop over this cohort (:func:`fedsim.models.local_sgd.local_steps`)."""
        with warnings.catch_warnings():  # vmap's "no batching rule for lerp_" notice (hybrid)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            local_steps(self, rule)

    # -- the schedule
    def steps(self) -> Iterator[Step]:
        if all(isinstance(p, FixedBatches) for p in self.plans):
            yield from self._fixed_steps()
        else:
            yield from self._drawn_steps()

    def _fixed_steps(self) -> Iterator[Step]:
        """Steps of batches drawn before the round: every member's batch sequence as device
        tensors, made once per cohort (``plan[t, i, :size]`` is member ``i``'s batch ``t``,
        padded with its first sample; one host-to-device copy each; the steps slice
        them), then per step one padded call, or one call per group of equal batch size
        (a prefix of the cohort is sliced, another group gathered by its index)."""
        plans: list[FixedBatches] = self.plans  # type: ignore[assignment]
        steps = max(self.steps_of, default=0)
        if steps == 0:
            return
        step_sizes = [[len(p.batches[t]) for p in plans[: sum(s > t for s in self.steps_of)]]
                      for t in range(steps)]
        width = max(max(sz) for sz in step_sizes)
        plan = np.zeros((steps, len(plans), width), dtype=np.int64)  # numpy: cheap row writes
        sizes = np.zeros((steps, len(plans)), dtype=np.int64)
        for i, p in enumerate(plans):
            for t, batch in enumerate(p.batches):
                b = batch.cpu().numpy()
                plan[t, i, : len(b)] = b
                plan[t, i, len(b):] = b[0]
                sizes[t, i] = len(b)
        groups: list[list[tuple[list[int], int, object]]] = []  # per step: group, size, sel
        offsets: list[tuple[int, int]] = []
        flat: list[int] = []
        for sz in step_sizes:
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
            groups.append(step)
        plan_t = torch.from_numpy(plan).to(self.device)
        sizes_t = torch.from_numpy(sizes).to(self.device)
        chosen = torch.tensor(flat, dtype=torch.long).to(self.device)
        for t, step in enumerate(groups):
            sz = step_sizes[t]
            if self.pad and len(set(sz)) > 1:  # one call, batches padded to the largest
                active, width_t = len(sz), max(sz)
                sel = slice(0, active)
                weight = (torch.arange(width_t, device=self.device)
                          < sizes_t[t, sel][:, None]).to(self.loss_dtype)
                yield Step(t, range(active), plan_t[t, sel, :width_t], sz, weight, sel,
                           {"size": sizes_t[t, sel]})
                continue
            for group, size, sel in step:
                if not isinstance(sel, slice):
                    sel = chosen[offsets[sel][0]:offsets[sel][1]]
                yield Step(t, group, plan_t[t, sel, :size], [size] * len(group), None, sel)

    def _drawn_steps(self) -> Iterator[Step]:
        """Steps of batches drawn as the round goes (DP-SGD's Poisson batches, each from its
        member's generator, step by step): the step's batches padded to the largest."""
        for t in range(max(self.steps_of, default=0)):
            active = sum(s > t for s in self.steps_of)
            drawn = [self.plans[i].batch(t) for i in range(active)]
            sizes = [len(b) for b in drawn]
            width = max(sizes)
            idx = torch.zeros((active, width), dtype=torch.long)
            for i, b in enumerate(drawn):
                idx[i, : len(b)] = b
            weight = (torch.arange(width) < torch.tensor(sizes)[:, None]).to(self.loss_dtype)
            yield Step(t, range(active), idx.to(self.device), sizes,
                       weight.to(self.device), slice(0, active))

    # -- gradients
    def _group(self, step: Step) -> tuple[dict, dict, list, torch.Tensor]:
        """The step's members' parameters, buffers and states, and their data rows."""
        sel = step.sel
        p_g = {n: self.params[n][sel] for n in self.params}
        b_g = {n: self.buffers[n][sel] for n in self.buffers}
        states = [select_state(st, sel) for st in self.states]
        rows = (self.positions[sel] if isinstance(sel, slice) else sel)[:, None]
        step.cache.update(params=p_g, states=states)
        return p_g, b_g, states, rows

    def _seen(self, step: Step) -> None:
        for i, size in zip(step.members, step.sizes):
            self.seen[i] += size

    def mean_grads(self, step: Step) -> Tensors:
        p_g, b_g, states, rows = self._group(step)
        padding = () if step.weight is None else (step.weight,)
        grads, (loss, hit) = self.step_fn(p_g, b_g, self.xs[rows, step.idx],
                                          self.ys[rows, step.idx], states, *padding)
        sel = step.sel
        with torch.no_grad():
            size = step.cache.get("size")
            self.loss_sum[sel] += loss.double() * (step.sizes[0] if size is None
                                                   else size.double())
            self.correct[sel] += hit
            if not isinstance(sel, slice):  # gathered copies: write the statistics back
                for n in self.buffers:
                    self.buffers[n][sel] = b_g[n]
        self._seen(step)
        return grads

    def sample_grads(self, step: Step) -> tuple[Tensors, torch.Tensor | None]:
        p_g, b_g, _, rows = self._group(step)
        p_g = {n: t.detach() for n, t in p_g.items()}
        yb = self.ys[rows, step.idx]
        grads, (losses, logits) = self.sample_fn(p_g, b_g, self.xs[rows, step.idx], yb)
        w = step.weight
        with torch.no_grad():
            self.loss_sum[step.sel] += (losses.double() * w).sum(1)
            self.correct[step.sel] += ((logits.argmax(-1) == yb) & (w > 0)).sum(1)
        self._seen(step)
        return grads, w

    def term_grads(self, step: Step) -> Tensors | None:
        if not self.hooks:
            return None
        found = []

        def term(p, st):
            extra = hook_loss(self.hooks, p, st)
            found.append(extra is not None)
            return extra if extra is not None else p[next(iter(p))].sum() * 0

        leaves = {n: t.detach().requires_grad_() for n, t in step.cache["params"].items()}
        with torch.enable_grad():
            total = vmap(term)(leaves, step.cache["states"]).sum()
            if not any(found):
                return None
            got = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        return {n: g for n, g in zip(leaves, got) if g is not None}

    def unstack(self, grads: Tensors) -> Tensors:
        return grads

    def transform(self, step: Step, grads: Tensors) -> Tensors:
        if self.transform_fn is None:
            return grads
        with torch.no_grad():
            return self.transform_fn(grads, step.cache["states"])

    def update(self, step: Step, grads: Tensors) -> None:
        """The step's SGD update on the stacks (each member's own momentum)."""
        sel, t = step.sel, step.t
        with torch.no_grad():
            # torch.optim.SGD: the first momentum buffer is the gradient itself (t == 0)
            mom = {n: self.mom[n][sel] for n in self.mom} if t else {}
            new = self.sgd.update(step.cache["params"], grads, mom)
            for n, p in new.items():
                self.params[n][sel] = p
            for n, buf in mom.items():
                if n not in self.mom:
                    self.mom[n] = torch.zeros_like(self.params[n])
                self.mom[n][sel] = buf

    def step_plans(self, step: Step) -> list[BatchPlan]:
        return [self.plans[i] for i in step.members]

    def like(self) -> Tensors:
        return {n: t[0] for n, t in self.params.items()}

    # -- after the steps
    def finals(self, as_numpy: bool) -> list[dict[str, torch.Tensor | np.ndarray]]:
        """Each member's arrays after the steps (parameters and buffers), row views of the
        stacks (``as_numpy``: of one CPU array per name, ready to encode)."""
        stacks = (*self.params.items(), *self.buffers.items())
        k = len(self.mem)
        if as_numpy:  # row views of one CPU array per name (a[i, ...]: 0-d stays an array)
            arrays = {n: t.detach().cpu().numpy() for n, t in stacks}
            rows = {n: [a[i, ...] for i in range(k)] for n, a in arrays.items()}
        else:
            rows = {n: t.unbind(0) for n, t in stacks}  # views, one call per name
        return [{n: r[i] for n, r in rows.items()} for i in range(k)]

    def results(self, rule: GradientRule) -> list[TrainResult]:
        loss, right = self.loss_sum.cpu().tolist(), self.correct.cpu().tolist()
        return [rule.result(loss[i], right[i], self.seen[i], len(m.x), self.steps_of[i])
                for i, m in enumerate(self.mem)]


def train_cohort(model: nn.Module, members: Sequence[CohortMember], cfg: ClientConfig,
                 as_numpy: bool = False, modes: tuple[bool, ...] | None = None,
                 rule: GradientRule = BATCH_MEAN
                 ) -> tuple[list[dict[str, torch.Tensor | np.ndarray]], list[TrainResult]]:
    """The step loop for every member at once (:class:`CohortBackend`); returns final
    states and results, in members' order.

    The same loss, hook terms, gradient transforms, gradient rule and
    :class:`~fedsim.models.sgd_step.SGD` update as one client at a time, on stacked
    parameters. Each member's result equals its one-client run within float tolerance.
    ``modes``: the modules' train/eval modes (:func:`fedsim.models.sgd_step.mode_key`;
    default all training). Returned states hold the parameters and the buffers
    (``as_numpy``: as numpy views on the CPU, ready to encode).
    """
    k_all = len(members)
    if k_all == 0:
        return [], []
    device = members[0].x.device
    order = sorted(range(k_all), key=lambda i: -members[i].plan.steps)  # active = a prefix
    backend = CohortBackend(model, [members[i] for i in order], cfg, device,
                            pad=not shares_batch_statistics(model))
    if modes is None:
        model.train()
    else:
        apply_modes(model, modes)
    backend.run(rule)
    finals: list[dict[str, torch.Tensor | np.ndarray]] = [{}] * k_all
    results: list[TrainResult] = [TrainResult(float("nan"), float("nan"), 0, 0)] * k_all
    for i, (final, result) in enumerate(zip(backend.finals(as_numpy), backend.results(rule))):
        finals[order[i]] = final
        results[order[i]] = result
    return finals, results


# --------------------------------------------------------------------------- the grid's side


class CohortTrainer:
    """The in-process grid's ``cohort_trainer``: train messages in, one reply per message.

    Every client goes through the pipeline one client at a time goes through
    (:mod:`fedsim.client.pipeline`: :func:`~fedsim.client.pipeline.prepare`,
    :func:`~fedsim.client.pipeline.upload`, :func:`~fedsim.client.pipeline.reply`); the step
    loops of clients whose hooks agree on the modes and the terms run as one cohort
    (:func:`train_cohort`). A client whose preparation or reply fails (or whose hook
    raises, such as a simulated crash) gets an error reply; the others are unaffected.
    ``runtime`` is the run's client runtime, shared with the ClientApp (settings, data,
    each worker's folded cohort model).
    """

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime

    def __call__(self, msgs: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
        rt = self.runtime
        settings = rt.settings
        model = rt.cohort_model
        replies: list[Message | None] = [None] * len(msgs)
        prepared: list[tuple[int, ClientRound]] = []
        groups: dict[tuple, list[int]] = {}  # (modes, terms, rule, moments) -> into prepared
        global_arrays = GlobalArrays(model)
        all_train = current = set_modes(model, ())
        self._prefetch(contexts)
        for i, (msg, ctx) in enumerate(zip(msgs, contexts)):
            cid = None
            try:
                cid = rt.client_id(ctx)
                cr = prepare(rt, msg, ctx, model, global_arrays)
                if sets_modes(cr.hooks):
                    modes = current = set_modes(model, cr.hooks)
                elif cr.hooks and current != all_train:  # leave the model as set_modes would
                    apply_modes(model, all_train)
                    modes = current = all_train
                else:  # model.train() and hooks that keep its modes: nothing to walk
                    modes = all_train
                key = (modes, cr.terms.key, type(cr.rule), wants_bn_moments(cr.req))
                groups.setdefault(key, []).append(len(prepared))
                prepared.append((i, cr))
            except Exception as exc:
                replies[i] = error_reply(msg, exc, cid)
        keys = list(model.state_dict())  # reply arrays in state_dict order, as one at a time
        lr = settings.client.lr
        for (modes, _, _, moments), group in groups.items():
            rounds = [prepared[j][1] for j in group]
            members = [CohortMember(cr.params, cr.x, cr.y, cr.plan, cr.buffers,
                                    cr.start.overrides, cr.terms) for cr in rounds]
            finals, results = train_cohort(model, members, settings.client, as_numpy=True,
                                           modes=modes, rule=rounds[0].rule)
            uploads = []  # (j, upload arrays, final arrays, result) of clients still fine
            for j, final, result in zip(group, finals, results):
                i, cr = prepared[j]
                try:
                    done = Trained(result.steps, lr)
                    for hook in cr.hooks:
                        hook.after_train(model, done)
                    if cr.hooks:  # hooks edit tensors; without them the rows go as they are
                        trained = {k: torch.from_numpy(final[k]) for k in keys}
                    else:
                        trained = {k: final[k] for k in keys}
                    uploads.append((j, upload(cr, model, trained), final, result))
                except Exception as exc:
                    replies[i] = error_reply(msgs[i], exc, cr.req.client_id)
            counts = self._exact_moments(model, uploads, prepared, msgs, replies) \
                if moments else {}
            for j, arrays, _, result in uploads:
                i, cr = prepared[j]
                if replies[i] is None:
                    try:
                        replies[i] = reply(cr, arrays, result, settings, counts.get(j))
                    except Exception as exc:
                        replies[i] = error_reply(msgs[i], exc, cr.req.client_id)
        model.train()
        return replies  # type: ignore[return-value]

    def _prefetch(self, contexts: Sequence[Context]) -> None:
        """The cohort's clients' data built together where the data allows it
        (``data.generator = 2``); a context without a client id fails in its preparation."""
        cids = []
        for ctx in contexts:
            try:
                cids.append(self.runtime.client_id(ctx))
            except Exception:  # noqa: BLE001 - reported by prepare, with the client's reply
                continue
        self.runtime.data.prefetch(cids)  # ids of the run's participating clients

    @staticmethod
    def _exact_moments(model: nn.Module, uploads: list, prepared: list, msgs: Sequence[Message],
                       replies: list) -> dict[int, dict[str, int]]:
        """``server.bn_statistics = "pooled"``: in each upload, the running statistics it
        still holds after the hooks replaced by exact moments under the client's trained
        arrays (:func:`fedsim.engine.cohort_moments.cohort_exact_statistics`), as one
        client at a time does; returns the counts by upload index."""
        if not uploads:
            return {}
        layers = bn_layers(model, prepared[uploads[0][0]][1].x)
        by_layers: dict[tuple[str, ...], list] = {}
        for upload_ in uploads:
            names = tuple(n for n, _ in layers
                          if all(k in upload_[1] for k in statistics_keys(n)))
            by_layers.setdefault(names, []).append(upload_)
        modules = dict(layers)
        out: dict[int, dict[str, int]] = {}
        for names, members in by_layers.items():
            if not names:
                out.update({j: {} for j, *_ in members})
                continue
            try:
                counts = cohort_exact_statistics(
                    model, [final for _, _, final, _ in members],
                    [prepared[j][1].x for j, *_ in members], [(n, modules[n]) for n in names])
            except Exception as exc:
                for j, *_ in members:
                    i, cr = prepared[j]
                    replies[i] = error_reply(msgs[i], exc, cr.req.client_id)
                continue
            for (j, arrays, final, _), count in zip(members, counts):
                for n in names:
                    for k in statistics_keys(n):
                        arrays[k] = final[k]
                out[j] = count
        return out

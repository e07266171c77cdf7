"""Client hooks: client-side behaviour a strategy asks for through its train config.

A strategy names the hooks it needs in the ``client-hooks`` config entry (comma-separated;
:func:`request_hooks` adds to it); the ClientApp looks each up here. A hook may also declare
a config key that switches it on by itself (``activated_by``), so Flower's unmodified FedProx
— which only sends ``proximal-mu`` — gets a real proximal term on the client.

Hooks keep per-client state in ``HookContext.state`` (Flower's ``Context.state``, which lives
as long as the client node), so a client that is not sampled for many rounds finds its state
again. A hook that must upload something besides the model (SCAFFOLD's control-variate delta)
adds it to the reply's arrays under :data:`EXTRA_PREFIX` (Flower replies carry exactly one
ArrayRecord); the server strategy splits it off with :func:`split_extra` before averaging.

Hooks are terms of the one client computation (:mod:`fedsim.client.step`): array-level
methods (``on_receive``/``on_reply``), module modes (``before_train``), per-client step state
with pure loss terms and gradient transforms, and a cap on the local steps. Both backends —
one client at a time and a ``vmap`` cohort — run every hook through these methods alone, so
no backend knows a hook by its class.

Compressors (``client.compress``: ``qsgd``, ``topk``; :mod:`fedsim.client.compress`) are hooks
the client's own settings switch on, run last, and report their arrays' encoded sizes
(:meth:`ClientHook.encoded_sizes`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.arrays import state_to_record
from fedsim.client.step import ClientArrays, as_tensor_like
from fedsim.config import ClientConfig
from fedsim.models.norm import norm_keys as norm_keys  # re-exported: strategies import
from fedsim.models.norm import norm_layers as norm_layers  # these three from here
from fedsim.models.norm import norm_statistics_keys as norm_statistics_keys
from fedsim.models.norm import statistics_layers as _statistics_layers
from fedsim.models.sgd_step import Trained
from fedsim.records import get_record
from fedsim.registry import Registry

#: prefix of reply arrays that are not model arrays: ``hook/<hook name>/<array name>``
EXTRA_PREFIX = "hook/"

MODES = ("train", "evaluate")

#: methods of the earlier hook API → what replaces them (a hook defining one is refused)
LEGACY_HOOK_METHODS = {
    "extra_loss": "return the term from loss_term(self, params, state) instead, with the "
                  "per-client tensors it reads from step_state(self, start)",
    "after_step": "count steps in after_train(self, model, trained) (trained.steps, "
                  "trained.lr), or cap them with max_steps(self)",
    "keys_from_model_only": "remove it; every hook's on_reply runs per client on both backends",
}


@dataclass
class HookContext:
    """What a hook may read or change for one client message.

    ``message`` is the whole content the server sent (records besides ``arrays`` and
    ``config``, e.g. SCAFFOLD's server control variate); ``mode`` says whether the message
    trains or evaluates; ``local_train`` returns the client's local training data (used, for
    example, to estimate normalization statistics of a client that has never trained).
    ``client`` and ``seed`` are the scenario's ``[client]`` settings and seed, where the
    caller trains a client (they switch on the ``client.compress`` hook, which runs last).
    """

    client_id: int
    config: ConfigRecord  # the config the strategy sent
    state: RecordDict  # the client's persistent state (Flower Context.state or the store)
    message: RecordDict = field(default_factory=RecordDict)
    mode: str = "train"
    local_train: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    client: ClientConfig | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"HookContext.mode must be one of {MODES}, got {self.mode!r}")


class ClientHook:
    """Base class: every method is optional; defaults do nothing.

    A hook is written once and runs on both backends (one client at a time, or a ``vmap``
    cohort; :mod:`fedsim.client.step`), so it acts on arrays and on terms of the local step,
    never on a particular model instance's values. Call order for a train message:

    - ``on_receive(model, arrays)``: edit the arrays the client starts from (``arrays``: a
      :class:`~fedsim.client.step.ClientArrays`; ``model`` gives the structure, module types
      and names, not this client's values);
    - ``before_train(model)``: change modules' train/eval modes only (e.g. frozen BN
      statistics); clients whose hooks leave the same modes train together;
    - ``step_state(start)`` once, with the client's start parameters (not modified later):
      per-client tensors the step terms read (a cohort stacks them), or None;
      ``max_steps()``: a cap on the number of local steps, or None;
    - per local step ``loss_term(params, state)`` (added to the loss) and
      ``grad_transform(grads, state)``: pure functions of their arguments (a cohort calls
      one client's methods on every client's stacked state under ``vmap``);
    - ``after_train(model, trained)`` once after the steps (before any ``on_reply``);
    - ``on_reply(model, arrays)``: edit the arrays the client uploads (tensors by name).

    An evaluate message calls ``on_receive`` only, with ``ctx.mode == "evaluate"``.
    """

    #: a train-config key whose presence activates this hook without naming it
    activated_by: ClassVar[str | None] = None

    def __init__(self, ctx: HookContext) -> None:
        self.ctx = ctx

    def __init_subclass__(cls, **kwargs) -> None:
        """Refuse a hook written for the earlier, model-mutating API when it is defined,
        with what to write instead (it would otherwise be silently skipped or fail mid-run)."""
        super().__init_subclass__(**kwargs)
        for old, new in LEGACY_HOOK_METHODS.items():
            if old in vars(cls):
                raise TypeError(f"client hook {cls.__qualname__} defines {old}, which fedsim "
                                f"no longer calls: {new} (see README, 'Write your own "
                                "strategy')")
        receive_fn = vars(cls).get("on_receive")
        if callable(receive_fn) and receive_fn.__code__.co_argcount == 2:
            raise TypeError(f"client hook {cls.__qualname__} defines on_receive(self, model): "
                            "it is now on_receive(self, model, arrays) and edits the arrays the "
                            "client starts from (arrays[name] = tensor), not the model (see "
                            "README, 'Write your own strategy')")

    def on_receive(self, model: nn.Module, arrays: ClientArrays) -> None:
        """Called with the received arrays, before local training or evaluation."""

    def before_train(self, model: nn.Module) -> None:
        """Called after ``model.train()``, before the first step: set modules' modes."""

    def step_state(self, start: Mapping[str, torch.Tensor]) -> object | None:
        """Per-client tensors (a tensor, or a dict/tuple of them) for the step terms."""
        return None

    def max_steps(self) -> int | None:
        """At most this many local steps (e.g. a simulated crash), or None."""
        return None

    def loss_term(self, params: Mapping[str, torch.Tensor], state) -> torch.Tensor | None:
        """A term added to each minibatch's loss (e.g. FedProx's proximal term)."""
        return None

    def grad_transform(self, grads: dict[str, torch.Tensor], state
                       ) -> dict[str, torch.Tensor]:
        """Each step's gradients, transformed (e.g. SCAFFOLD's control-variate correction)."""
        return grads

    def after_train(self, model: nn.Module, trained: Trained) -> None:
        """Called once after the local steps (e.g. to raise a simulated crash)."""

    def on_reply(
        self, model: nn.Module, arrays: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Edit the arrays the client uploads (e.g. drop local layers); returns them."""
        return arrays

    def encoded_sizes(self) -> dict[str, int]:
        """Bytes on the wire of the reply arrays this hook encoded (compression), by name;
        every other array counts its raw size (:func:`fedsim.client.compress.raw_bytes`)."""
        return {}


CLIENT_HOOKS: Registry[type[ClientHook]] = Registry("client hook")


def request_hooks(config: ConfigRecord, *names: str) -> ConfigRecord:
    """Add hook ``names`` to the config's ``client-hooks`` entry (a server-side helper)."""
    have = [n.strip() for n in str(config.get("client-hooks", "")).split(",") if n.strip()]
    have += [n for n in names if n not in have]
    if have:
        config["client-hooks"] = ",".join(have)
    return config


def hooks_for(ctx: HookContext) -> list[ClientHook]:
    """Instantiate the hooks the config asks for, explicitly or through an activating key,
    then the compressor ``ctx.client.compress`` names (last: it encodes the final upload)."""
    names = [n.strip() for n in str(ctx.config.get("client-hooks", "")).split(",") if n.strip()]
    for name in CLIENT_HOOKS:
        cls = CLIENT_HOOKS.get(name)
        if cls.activated_by and cls.activated_by in ctx.config and name not in names:
            names.append(name)
    if ctx.client is not None and ctx.client.compress != "none":  # registered by fedsim.plugins
        names = [n for n in names if n != ctx.client.compress] + [ctx.client.compress]
    return [CLIENT_HOOKS.get(n, key="client-hooks")(ctx) for n in names]


def sets_modes(hooks: Sequence[ClientHook]) -> bool:
    """Whether any of ``hooks`` overrides ``before_train`` (a mode change); without one,
    :func:`fedsim.client.step.set_modes` leaves ``model.train()``'s modes, which a cohort
    knows without walking the model per client."""
    return any(type(h).before_train is not ClientHook.before_train for h in hooks)


def receive(model: nn.Module, hooks: Sequence[ClientHook],
            local_train: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
            ) -> ClientArrays:
    """The hooks' ``on_receive`` applied to ``model`` itself (the sequential backend): they
    see its current arrays, then :func:`apply_received`."""
    arrays = ClientArrays(model.state_dict())
    for hook in hooks:
        hook.on_receive(model, arrays)
    apply_received(model, arrays, local_train)
    return arrays


def apply_received(model: nn.Module, arrays: ClientArrays,
                   local_train: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> None:
    """Copy ``arrays``' overrides into ``model`` and re-estimate the statistics they ask for
    on ``local_train()``'s inputs (a cold start)."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in arrays.overrides.items():
            state[key].copy_(as_tensor_like(value, state[key]))
    if arrays.estimates:
        if local_train is None:
            raise ValueError("re-estimating normalization statistics (a client evaluated "
                             "before it ever trained) needs its local training data: "
                             "HookContext.local_train")
        x = local_train()[0].to(next(iter(state.values())).device)
        for layers in arrays.estimates:
            estimate_statistics(model, x, [model.get_submodule(n) for n in layers])


# --------------------------------------------------------------------------- extras


def extra_key(hook: str, name: str) -> str:
    """The reply-array key under which hook ``hook`` uploads its array ``name``."""
    return f"{EXTRA_PREFIX}{hook}/{name}"


def split_extra(record: ArrayRecord) -> tuple[ArrayRecord, dict[str, dict[str, Array]]]:
    """Split a reply's arrays into model arrays and ``{hook: {name: Array}}`` extras."""
    model, extras = ArrayRecord(), {}
    for key, value in record.items():
        if key.startswith(EXTRA_PREFIX):
            hook, _, name = key[len(EXTRA_PREFIX):].partition("/")
            extras.setdefault(hook, {})[name] = value
        else:
            model[key] = value
    return model, extras


# --------------------------------------------------------------------------- norm layers
# Which layers are norm layers, and which of their keys are statistics, is answered in
# fedsim.models.norm (norm_layers, norm_keys, norm_statistics_keys, imported above).


def statistics_parts(n: int, chunk: int = 256) -> int:
    """Into how many near-equal chunks :func:`estimate_statistics` splits ``n`` samples."""
    parts = max(1, -(-n // chunk))
    if n // parts < 2:  # BN after a linear layer needs two samples per batch
        parts = max(1, n // 2)
    return parts


@torch.no_grad()
def estimate_statistics(model: nn.Module, x: torch.Tensor, layers: list[nn.Module],
                        chunk: int = 256) -> None:
    """Replace ``layers``' running mean/var by their average over ``x`` (no gradient steps).

    The AdaBN recipe (Li et al. 2016): forward the data in train mode with momentum 1/(k+1)
    for the k-th chunk, so the running statistics become the mean of the chunks' batch
    statistics; other layers and all parameters are untouched.
    """
    if not layers or len(x) == 0:
        return
    saved = [(m, m.momentum, m.training) for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.train()
    try:
        for k, xb in enumerate(torch.tensor_split(x, statistics_parts(len(x), chunk))):
            for m in layers:
                m.momentum = 1.0 / (k + 1)
            model(xb)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)


# --------------------------------------------------------------------------- built-in hooks


@CLIENT_HOOKS.register("proximal")
class ProximalHook(ClientHook):
    """FedProx (Li et al., MLSys 2020): add (mu/2)·||w − w_global||² to the local loss.

    The anchor ``w_global`` is the client's start (the received parameters), so the term is
    a pure function of the parameters and the step state ``(anchor, mu)``."""

    activated_by = "proximal-mu"

    def step_state(self, start: Mapping[str, torch.Tensor]) -> object | None:
        mu = float(self.ctx.config.get("proximal-mu", 0.0))
        if mu == 0.0:
            return None
        ref = next(iter(start.values()))
        return {"anchor": dict(start), "mu": torch.tensor(mu, dtype=ref.dtype, device=ref.device)}

    def loss_term(self, params: Mapping[str, torch.Tensor], state) -> torch.Tensor | None:
        anchor = state["anchor"]
        sq = sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())
        return 0.5 * state["mu"] * sq


class LocalArraysHook(ClientHook, abc.ABC):
    """Keeps some of the model's arrays on the client across rounds (base of FedBN, SiloBN).

    ``on_receive`` lays the client's saved arrays over the global ones; ``on_reply`` saves
    them in the client state and removes them from the upload, so the server never sees
    them and aggregates the rest. A client with nothing saved yet (never trained) trains
    from the global arrays; when it is *evaluated* it uses the global arrays with the
    running statistics of its local normalization layers re-estimated on its local train
    data (:func:`estimate_statistics`, no gradient steps; the backend runs it).
    """

    #: key of the saved arrays in the client state
    state_key: ClassVar[str] = "local-arrays"

    @abc.abstractmethod
    def local_keys(self, model: nn.Module) -> list[str]:
        """Which state-dict keys stay on the client."""

    def on_receive(self, model: nn.Module, arrays: ClientArrays) -> None:
        saved = get_record(self.ctx.state, self.state_key, ArrayRecord)
        if saved is not None:
            arrays.load(saved)
        elif self.ctx.mode == "evaluate":
            arrays.estimate_statistics(self.statistics_layer_names(model))

    def statistics_layers(self, model: nn.Module) -> list[nn.Module]:
        """The local normalization layers with running statistics (what a cold start
        re-estimates)."""
        return _statistics_layers(model, self.local_keys(model))

    def statistics_layer_names(self, model: nn.Module) -> tuple[str, ...]:
        """Module names of :meth:`statistics_layers` (what a cold start asks to re-estimate)."""
        layers = {id(m) for m in self.statistics_layers(model)}
        return tuple(n for n, m in model.named_modules() if id(m) in layers)

    def on_reply(self, model: nn.Module, arrays: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        return self.keep_local(arrays, self.local_keys(model))

    def keep_local(self, arrays: dict[str, torch.Tensor], keys: list[str]
                   ) -> dict[str, torch.Tensor]:
        """Save ``keys`` of ``arrays`` in the client state; return the others (the upload)."""
        self.ctx.state[self.state_key] = state_to_record(arrays, keys)
        local = set(keys)
        return {k: v for k, v in arrays.items() if k not in local}


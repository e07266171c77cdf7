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

Compressors (``client.compress``: ``qsgd``, ``topk``; :mod:`fedsim.client.compress`) are hooks
the client's own settings switch on, run last, and report their arrays' encoded sizes
(:meth:`ClientHook.encoded_sizes`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from fedsim.arrays import load_record, state_to_record
from fedsim.config import ClientConfig
from fedsim.models.norm import NORM_LAYER_TYPES
from fedsim.records import get_record
from fedsim.registry import Registry

#: prefix of reply arrays that are not model arrays: ``hook/<hook name>/<array name>``
EXTRA_PREFIX = "hook/"

#: module types treated as normalization layers: fedsim's own plus torch's (by type, never name)
NORM_TYPES: tuple[type[nn.Module], ...] = (*NORM_LAYER_TYPES, _NormBase, nn.GroupNorm,
                                           nn.LayerNorm)

MODES = ("train", "evaluate")


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

    Call order for a train message: ``on_receive`` (global arrays loaded) → ``before_train``
    (model in train mode) → per minibatch ``extra_loss`` and ``after_step`` → ``on_reply``.
    An evaluate message calls ``on_receive`` only, with ``ctx.mode == "evaluate"``.
    """

    #: a train-config key whose presence activates this hook without naming it
    activated_by: ClassVar[str | None] = None

    def __init__(self, ctx: HookContext) -> None:
        self.ctx = ctx

    def on_receive(self, model: nn.Module) -> None:
        """Called after the global arrays are loaded, before local training or evaluation."""

    def before_train(self, model: nn.Module) -> None:
        """Called after ``model.train()``, before the first step (e.g. freeze BN statistics)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each minibatch's loss (e.g. FedProx's proximal term)."""
        return None

    def after_step(self, model: nn.Module, lr: float) -> None:
        """Called after each optimizer step (e.g. to count SCAFFOLD's local steps)."""

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


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named normalization layers of ``model``, selected by module type (:data:`NORM_TYPES`)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def _qualified(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every normalization layer: affine parameters and buffers (FedBN)."""
    return [_qualified(name, k) for name, m in norm_layers(model)
            for k in m.state_dict(keep_vars=True)]  # keep_vars: keys only, no detach


def norm_statistics_keys(model: nn.Module) -> list[str]:
    """State-dict keys of normalization buffers: running mean/var and the batch counter."""
    return [
        _qualified(name, k)
        for name, m in norm_layers(model)
        for k, b in m.named_buffers(recurse=False)
        if b is not None
    ]


def _statistics_layers(model: nn.Module, keys: Iterable[str]) -> list[nn.Module]:
    wanted = set(keys)
    return [
        m
        for name, m in norm_layers(model)
        if any(_qualified(name, k) in wanted for k, _ in m.named_buffers(recurse=False))
        and getattr(m, "running_mean", None) is not None
    ]


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
    """FedProx (Li et al., MLSys 2020): add (mu/2)·||w − w_global||² to the local loss."""

    activated_by = "proximal-mu"

    def on_receive(self, model: nn.Module) -> None:
        self.mu = float(self.ctx.config.get("proximal-mu", 0.0))
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.mu == 0.0:
            return None
        sq = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))
        return 0.5 * self.mu * sq


class LocalArraysHook(ClientHook, abc.ABC):
    """Keeps some of the model's arrays on the client across rounds (base of FedBN, SiloBN).

    ``on_receive`` restores the client's saved arrays over the global ones; ``on_reply``
    saves them in the client state and removes them from the upload, so the server never
    sees them and aggregates the rest. A client with nothing saved yet (never trained)
    trains from the global arrays; when it is *evaluated* it uses the global arrays with the
    running statistics of its local normalization layers re-estimated on its local train
    data (:func:`estimate_statistics`, no gradient steps).
    """

    #: key of the saved arrays in the client state
    state_key: ClassVar[str] = "local-arrays"
    #: True when ``local_keys`` depends on the model alone (not on the client or round):
    #: a vectorized cohort then asks once for all its clients
    keys_from_model_only: ClassVar[bool] = False

    @abc.abstractmethod
    def local_keys(self, model: nn.Module) -> list[str]:
        """Which state-dict keys stay on the client."""

    def on_receive(self, model: nn.Module) -> None:
        saved = get_record(self.ctx.state, self.state_key, ArrayRecord)
        if saved is not None:
            load_record(model, saved)
        elif self.ctx.mode == "evaluate":
            self.cold_start(model)

    def statistics_layers(self, model: nn.Module) -> list[nn.Module]:
        """The local normalization layers with running statistics (what a cold start
        re-estimates)."""
        return _statistics_layers(model, self.local_keys(model))

    def cold_start(self, model: nn.Module) -> None:
        """Local arrays of a client evaluated before it ever trained (see class docstring)."""
        layers = self.statistics_layers(model)
        if not layers:
            return
        if self.ctx.local_train is None:
            raise ValueError(f"{type(self).__name__}: evaluating client {self.ctx.client_id} "
                             "without saved local arrays needs HookContext.local_train")
        x, _ = self.ctx.local_train()
        device = next(model.parameters()).device
        estimate_statistics(model, x.to(device), layers)

    def on_reply(self, model: nn.Module, arrays: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        return self.keep_local(arrays, self.local_keys(model))

    def keep_local(self, arrays: dict[str, torch.Tensor], keys: list[str]
                   ) -> dict[str, torch.Tensor]:
        """Save ``keys`` of ``arrays`` in the client state; return the others (the upload)."""
        self.ctx.state[self.state_key] = state_to_record(arrays, keys)
        local = set(keys)
        return {k: v for k, v in arrays.items() if k not in local}


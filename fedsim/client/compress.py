"""What leaves a client, in bytes, and compression of it (``client.compress``).

A compressor is a client hook that runs last in ``on_reply``. It encodes the *update* of each
float parameter the server sent, ``delta = w_trained - w_received``, and the reply carries
``w_received + decode(encode(delta))`` (float32): the arrays the server would reconstruct from
the encoding. Strategies aggregate replies unchanged, and everything that reads replies (the
client-update membership attack, aggregation, DP clipping) sees exactly what was uploaded.

Compressed: float arrays that are model *parameters* (``model.named_parameters()``) and were in
the received arrays. Uploaded as they are: buffers (BatchNorm running statistics, the integer
``num_batches_tracked``), hook extras (``hook/...``, e.g. SCAFFOLD's control variate) and
arrays the server did not send.

Bytes (recorded per round in ``rounds.jsonl`` ``communication``): the payload of the arrays,
``itemsize * numel`` for an array sent as it is and the encoded size below for a compressed
one; the ``.npy`` header (128 bytes per array) and the message framing are not counted.

- ``qsgd``: ``ceil(numel * (bits + 1) / 8) + 4`` bytes per tensor (a sign bit and a
  ``bits``-bit level per coordinate, one float32 norm);
- ``topk``: ``k * 8`` bytes per tensor, ``k = ceil(ratio * numel)`` (a float32 value and an
  int32 index per kept entry).
"""

from __future__ import annotations

import abc
import functools
import math

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import from_array, state_to_record
from fedsim.client.hooks import CLIENT_HOOKS, ClientHook
from fedsim.records import get_record
from fedsim.rng import torch_generator

#: client-state key of top-k's error-feedback residuals (an ArrayRecord, float32)
RESIDUAL_KEY = "compress-residual"


def raw_bytes(value: torch.Tensor | np.ndarray) -> int:
    """Payload of an array sent as it is: ``itemsize * numel``."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.numel()
    return int(value.itemsize) * int(value.size)


def qsgd_bytes(numel: int, bits: int) -> int:
    """Encoded size of one QSGD tensor: sign + ``bits``-bit level per coordinate, float32 norm."""
    return math.ceil(numel * (bits + 1) / 8) + 4


def topk_count(numel: int, ratio: float) -> int:
    """Entries top-k keeps of a tensor: ``ceil(ratio * numel)``, at least 1."""
    return max(1, min(numel, math.ceil(ratio * numel)))


def topk_bytes(k: int) -> int:
    """Encoded size of one top-k tensor: a float32 value and an int32 index per entry."""
    return 8 * k


def qsgd_quantize(v: torch.Tensor, bits: int, gen: torch.Generator) -> torch.Tensor:
    """QSGD's unbiased stochastic quantization of ``v`` (Alistarh et al., NeurIPS 2017).

    With ``s = 2**bits - 1`` levels, ``q_i = ||v|| * sign(v_i) * xi_i / s`` where
    ``xi_i = floor(s|v_i|/||v||) + Bernoulli(frac)``, so ``E[q] = v`` and
    ``Var[q_i] <= ||v||**2 / (4 s**2)``. ``||v||`` is rounded to float32 (what is sent);
    the result is float32 on ``v``'s device; draws come from ``gen`` (CPU).
    """
    s = 2**bits - 1
    flat = v.detach().reshape(-1).to("cpu", torch.float64)
    norm = float(torch.linalg.vector_norm(flat).to(torch.float32))
    if norm == 0.0:
        return torch.zeros_like(v, dtype=torch.float32)
    scaled = flat.abs() * (s / norm)
    low = torch.floor(scaled)
    up = torch.rand(flat.shape, generator=gen, dtype=torch.float64) < (scaled - low)
    xi = torch.clamp(low + up.to(torch.float64), max=s)  # float32 rounding of the norm
    q = torch.sign(flat).to(torch.float32) * xi.to(torch.float32) * np.float32(norm / s)
    return q.reshape(v.shape).to(v.device)


def topk_sparsify(u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sent``, ``residual``): the ``k`` largest-magnitude entries of ``u`` and the rest,
    with ``sent + residual == u`` exactly (disjoint supports)."""
    flat = u.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    sent = torch.where(mask, flat, torch.zeros_like(flat))
    residual = torch.where(mask, torch.zeros_like(flat), flat)
    return sent.reshape(u.shape), residual.reshape(u.shape)


class CompressHook(ClientHook, abc.ABC):
    """Base of the compressors: replaces each compressible upload by its decoded update on
    top of the received array and records its encoded size (see the module docstring)."""

    def on_reply(self, model: nn.Module, arrays: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        received = get_record(self.ctx.message, "arrays", ArrayRecord) or ArrayRecord()
        params = {name for name, _ in model.named_parameters()}
        self.sizes: dict[str, int] = {}
        out = dict(arrays)
        for key, value in arrays.items():
            if key not in params or key not in received or not value.dtype.is_floating_point:
                continue
            ref = torch.from_numpy(from_array(received[key])).to(torch.float32)
            new = torch.as_tensor(value).detach().to("cpu", torch.float32)
            decoded, self.sizes[key] = self.encode(key, new.reshape(ref.shape) - ref)
            out[key] = (ref + decoded).reshape(new.shape)
        self.finish()
        return out

    @abc.abstractmethod
    def encode(self, key: str, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(decoded update, encoded bytes) of one tensor's update."""

    def finish(self) -> None:
        """Called after every array is encoded (e.g. to save state)."""

    def encoded_sizes(self) -> dict[str, int]:
        return dict(getattr(self, "sizes", {}))

    @property
    def settings(self):
        if self.ctx.client is None:
            raise ValueError(f"{type(self).__name__} needs HookContext.client (the [client] "
                             "settings)")
        return self.ctx.client


@CLIENT_HOOKS.register("qsgd")
class QSGDHook(CompressHook):
    """``client.compress = "qsgd"``: each update tensor stochastically quantized to
    ``client.compress_bits`` bits (:func:`qsgd_quantize`), randomness derived from
    (seed, "compress", round, client)."""

    def on_reply(self, model, arrays):
        rnd = int(self.ctx.config.get("server-round", 0))
        self.gen = torch_generator(self.ctx.seed, "compress", rnd, self.ctx.client_id)
        return super().on_reply(model, arrays)

    def encode(self, key, delta):
        bits = self.settings.compress_bits
        return qsgd_quantize(delta, bits, self.gen), qsgd_bytes(delta.numel(), bits)


@CLIENT_HOOKS.register("topk")
class TopKHook(CompressHook):
    """``client.compress = "topk"``: per tensor, the ``ceil(ratio * numel)`` largest-magnitude
    entries of update + residual are sent; the rest is the client's new residual, kept in its
    state (error feedback: Stich et al., NeurIPS 2018; Karimireddy et al., ICML 2019)."""

    def encode(self, key, delta):
        if not hasattr(self, "residual"):
            saved = get_record(self.ctx.state, RESIDUAL_KEY, ArrayRecord)
            self.residual = ({k: torch.from_numpy(from_array(v)) for k, v in saved.items()}
                             if saved is not None else {})
        old = self.residual.get(key)
        u = delta + old.reshape(delta.shape) if old is not None else delta
        k = topk_count(u.numel(), self.settings.compress_ratio)
        sent, self.residual[key] = topk_sparsify(u, k)
        return sent, topk_bytes(k)

    def finish(self):
        if hasattr(self, "residual"):
            self.ctx.state[RESIDUAL_KEY] = state_to_record(self.residual)


#: client.compress -> the decoded upload of one update tensor at a client's first upload (no
#: error-feedback residual yet), for attacks that simulate what a client sends
DECODED_UPDATE: dict[str, object] = {
    "none": lambda delta, cfg, gen: delta,
    "qsgd": lambda delta, cfg, gen: qsgd_quantize(delta, cfg.compress_bits, gen),
    "topk": lambda delta, cfg, gen: topk_sparsify(
        delta, topk_count(delta.numel(), cfg.compress_ratio))[0],
}


def as_uploaded(deltas: list[torch.Tensor], cfg, seed: int, rnd: int, cid: int
                ) -> list[torch.Tensor]:
    """What client ``cid`` uploads in round ``rnd`` for the parameter updates ``deltas``
    (``w_trained - w_received``, in parameter order) under ``cfg.compress`` (a
    :class:`~fedsim.config.ClientConfig`): the same compressor and derived randomness as its
    hook, at its first upload (top-k without a residual)."""
    gen = torch_generator(seed, "compress", rnd, cid)
    decode = DECODED_UPDATE[cfg.compress]
    return [decode(d.detach().to("cpu", torch.float32), cfg, gen).to(d.device, d.dtype)
            for d in deltas]


def upload_bytes(arrays: dict[str, torch.Tensor | np.ndarray], hooks: list[ClientHook]) -> int:
    """Bytes a reply's arrays take on the wire: encoded sizes where a hook encoded an array,
    else ``itemsize * numel``."""
    encoded: dict[str, int] = {}
    for hook in hooks:
        encoded.update(hook.encoded_sizes())
    return sum(encoded[k] if k in encoded else raw_bytes(v) for k, v in arrays.items())


def record_bytes(record: ArrayRecord) -> int:
    """Raw payload of an ArrayRecord: ``itemsize * numel`` summed over its arrays."""
    total = 0
    for array in record.values():  # math.prod: numpy's prod of a short tuple costs ~20 µs
        total += _itemsize(array.dtype) * math.prod(array.shape)
    return total


@functools.lru_cache(maxsize=64)
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize

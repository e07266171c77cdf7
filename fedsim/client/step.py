"""What one client starts from: the received arrays with what its hooks lay over them.

:class:`ClientArrays` is the one place a client's start arrays are assembled, whether the
backend then loads them into one module (the sequential backend) or into a cohort's stacks
(:mod:`fedsim.engine.vectorized`), so array-level hooks (``on_receive``) run the same way on
both. What a local step computes lives below the client layer, torch only
(:mod:`fedsim.models.sgd_step`, :mod:`fedsim.models.local_sgd`); ``Trained``, which hooks'
``after_train`` receives, is re-exported here for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import load_record, peek_array
from fedsim.models.sgd_step import Trained as Trained  # re-exported: hooks' after_train


class ClientArrays(MutableMapping[str, torch.Tensor]):
    """The arrays one client starts from, by state-dict name: the received ones with what
    its hooks lay over them (``on_receive``).

    Reading gives tensors; writing records an override (a tensor or a numpy array, e.g. a
    view of a saved record's bytes, :meth:`load`) that the backend applies as
    :func:`fedsim.arrays.load_record` would (dtype and shape of the model's array, integers
    rounded): the sequential backend into its module, the cohort backend into its stacks
    without a per-client model load. :meth:`estimate_statistics` asks the backend to
    re-estimate some layers' running statistics on the client's local training data first
    (a cold start, :func:`fedsim.client.hooks.estimate_statistics`).
    """

    def __init__(self, base: Mapping[str, torch.Tensor]) -> None:
        self.base = base
        self.overrides: dict[str, torch.Tensor | np.ndarray] = {}
        self.estimates: list[tuple[str, ...]] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.overrides:
            return as_tensor_like(self.overrides[key], self.base[key])
        return self.base[key]

    def __setitem__(self, key: str, value: torch.Tensor | np.ndarray) -> None:
        if key not in self.base:
            raise KeyError(f"array {key!r} does not belong to this model")
        self.overrides[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("a client's start arrays cannot drop a model array")

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def load(self, record: ArrayRecord) -> None:
        """Lay ``record``'s arrays over these (read-only views of its bytes, no copy)."""
        for key, value in record.items():
            self[key] = peek_array(value)

    def estimate_statistics(self, layers: Sequence[str]) -> None:
        """Re-estimate the running statistics of modules ``layers`` (names) on the local
        training data after every hook's ``on_receive``."""
        if layers:
            self.estimates.append(tuple(layers))


def as_tensor_like(value: torch.Tensor | np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor of ``ref``'s dtype, shape and device (integers rounded), as
    :func:`fedsim.arrays.load_record` converts what it loads."""
    t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    if not ref.dtype.is_floating_point:
        t = torch.round(t.double())
    if t.shape != ref.shape:
        t = t.reshape(ref.shape)
    if t.dtype != ref.dtype or t.device != ref.device:  # (.to's argument parsing is
        t = t.to(device=ref.device, dtype=ref.dtype)  # the costly part: skip a no-op)
    return t


class GlobalArrays:
    """The received global arrays as detached (parameters, buffers) copies in ``model``'s
    layout (dtype, device), made once per ``ArrayRecord`` (a round's messages share one)
    and shared by every client that starts from them; nothing writes into them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._held: tuple | None = None  # (record, params, buffers)

    def __call__(self, record: ArrayRecord) -> tuple[dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor]]:
        if self._held is None or self._held[0] is not record:
            load_record(self.model, record)
            self._held = (record,
                          {n: p.detach().clone() for n, p in self.model.named_parameters()},
                          {n: b.detach().clone() for n, b in self.model.named_buffers()})
        return self._held[1], self._held[2]

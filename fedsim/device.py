"""Where a run's tensors live: its torch device (CUDA when present, CPU otherwise, unless
overridden), and the clients' data copied there once per run (:class:`DeviceSplits`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fedsim.data.windows import is_window_view, to_device, window_text
from fedsim.errors import ScenarioError

if TYPE_CHECKING:
    from fedsim.data.federated import FederatedData

Tensors = tuple[torch.Tensor, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; explicit CUDA must be available.

    On CUDA, cuDNN is asked for deterministic algorithms (no autotuning), so a seed gives
    the same run twice on the same GPU and ``--resume`` stays exact there.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError(
            f"engine.device = {name!r} but CUDA is not available here; use 'auto' or 'cpu'"
        )
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise ScenarioError(
            f"engine.device = {name!r} but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), numbered from 0; use 'cuda' or 'cuda:0' .. "
            f"'cuda:{torch.cuda.device_count() - 1}'")
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device


DEVICE_DATA_BYTES = 2 * 2**30  # client tensors a run keeps on an accelerator


class DeviceData:
    """Clients' (x, y) tensors copied to an accelerator once per run, not once per round.

    Client data is a deterministic function of ``(run, client id)``, so a device copy made
    in round 1 serves every later round. Bounded by ``max_bytes`` (least recently used
    clients leave first), so a federation too large for the device still runs, copying
    the clients that do not fit as before. On the CPU the host tensors are the device
    tensors: they are returned as they are and nothing is kept.
    """

    def __init__(self, device: torch.device, max_bytes: int = DEVICE_DATA_BYTES) -> None:
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, Tensors] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def shares_host(self) -> bool:
        """Whether host tensors already are device tensors (the CPU): nothing to copy."""
        return self.device.type == "cpu"

    def get(self, key: tuple, host: Callable[[], Tensors]) -> Tensors:
        """The device copy of ``host()`` kept under ``key``, made on first use."""
        if self.shares_host():
            return host()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        x, y = host()
        # copy=True: a new tensor even where .to() could return its input (a test's CPU
        # stand-in for an accelerator), so a cached copy is never the caller's host tensor;
        # token windows move as their text and stay views (fedsim.data.windows)
        value = (to_device(x, self.device), y.to(self.device, copy=True))
        size = _nbytes(value)
        if size > self.max_bytes:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= _nbytes(old)
        return value


def _nbytes(tensors: tuple[torch.Tensor, ...]) -> int:
    """Bytes the tensors hold (a window view: its text's, not ``N·T`` elements)."""
    return sum((window_text(t) if is_window_view(t) else t).numel() * t.element_size()
               for t in tensors)


class DeviceSplits:
    """A federation's splits on a run's device, each copied there at most once per run.

    What the client runtime, the server's evaluation, personalized evaluation and the
    privacy audit read, so a client's data reaches the device once however many parts of
    the run use it, in however many rounds (:class:`DeviceData`; on the CPU, the host
    tensors themselves). Same methods as :class:`fedsim.data.federated.FederatedData`'s
    for the data; treat the tensors as read-only, they are shared.
    """

    def __init__(self, data: FederatedData, device: torch.device,
                 max_bytes: int = DEVICE_DATA_BYTES) -> None:
        self.data = data
        self.device = torch.device(device)
        self.cache = DeviceData(self.device, max_bytes)

    def client_train(self, cid: int) -> Tensors:
        """Client ``cid``'s local training data on the device."""
        return self.cache.get(("train", cid), lambda: self.data.client_train(cid))

    def client_test(self, cid: int) -> Tensors:
        """Client ``cid``'s local test data on the device."""
        return self.cache.get(("test", cid), lambda: self.data.client_test(cid))

    def global_test(self) -> Tensors:
        """The global test set on the device."""
        return self.cache.get(("global-test",), self.data.global_test)

    def validation(self) -> Tensors | None:
        """The validation split on the device, or None when none is held out."""
        if not self.data.has_validation:
            return None
        return self.cache.get(("validation",), self.data.validation)

"""Who is a member, who is not, and a scratch model to ask: shared by the membership audits.

Members and non-members (:class:`MembershipPool`): for every participating client, ``k`` of
its local training samples (members) and ``k`` of its local *test* split (non-members: same
client, same distribution, never trained on), ``k = min(#train, #test)``, drawn with
``(seed, "privacy", "pool", client)``. A shadow federation (:class:`ShadowData`) trains each
client on its training samples outside the pool plus a random half of its own pool
(:func:`~fedsim.privacy.mia.shadow_split` per client), so every pool example is IN for half
of the shadows and shadow clients see as many samples as the real ones on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import load_record
from fedsim.data.federated import FederatedData
from fedsim.device import DeviceSplits
from fedsim.privacy.mia import per_example_outputs, shadow_split
from fedsim.rng import numpy_rng

MEMBERS_FROM = "participating clients' local training samples"
NONMEMBERS_FROM = "participating clients' local test splits"


@dataclass(frozen=True)
class MembershipPool:
    """Audited members (rows of ``client_train``) and non-members (rows of ``client_test``),
    equal in number per participating client, fixed by the seed."""

    clients: tuple[int, ...]
    members: dict[int, np.ndarray]
    nonmembers: dict[int, np.ndarray]

    @classmethod
    def build(cls, data: FederatedData, seed: int) -> MembershipPool:
        members, nonmembers = {}, {}
        for cid in data.participating:
            n_train, n_test = len(data.client_train(cid)[1]), len(data.client_test(cid)[1])
            k = min(n_train, n_test)
            rng = numpy_rng(seed, "privacy", "pool", cid)
            members[cid] = np.sort(rng.choice(n_train, size=k, replace=False))
            nonmembers[cid] = np.sort(rng.choice(n_test, size=k, replace=False))
        return cls(tuple(data.participating), members, nonmembers)

    def client_tensors(self, data: FederatedData | DeviceSplits, cid: int):
        """(x, y, is_member) of one client's pool: its members, then its non-members, on the
        device of ``data``'s tensors (a run's :class:`~fedsim.device.DeviceSplits`: taken
        from its device copies, no copy of the client's data per call)."""
        xtr, ytr = data.client_train(cid)
        xte, yte = data.client_test(cid)
        m = torch.as_tensor(self.members[cid], device=xtr.device)
        n = torch.as_tensor(self.nonmembers[cid], device=xte.device)
        x = torch.cat([xtr[m], xte[n]])
        y = torch.cat([ytr[m], yte[n]])
        return x, y, np.r_[np.ones(len(m), bool), np.zeros(len(n), bool)]

    def tensors(self, data: FederatedData | DeviceSplits):
        """(x, y, is_member) of the whole pool, clients in order (on ``data``'s device)."""
        parts = [self.client_tensors(data, cid) for cid in self.clients]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

    def shadow_masks(self, num_shadows: int, seed: int) -> dict[int, np.ndarray]:
        """Per client, the (shadows, pool size) IN mask: each example IN for half of them."""
        return {cid: shadow_split(2 * len(self.members[cid]), num_shadows,
                                  numpy_rng(seed, "privacy", "shadow-split", cid))
                for cid in self.clients}


class ShadowData:
    """The federation's data with each participating client training on chosen rows: its
    training samples outside the audit pool plus the pool samples a shadow marks IN.

    Everything else (client ids, local test splits, global test set) is the base data's.
    """

    def __init__(self, base: FederatedData, rows: dict[int, tuple[np.ndarray, np.ndarray]]):
        self.base = base
        self.rows = rows  # client -> (rows of client_train, rows of client_test)

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def client_train(self, cid: int):
        if cid not in self.rows:
            return self.base.client_train(cid)
        (xtr, ytr), (xte, yte) = self.base.client_train(cid), self.base.client_test(cid)
        tr, te = (torch.as_tensor(r, dtype=torch.long) for r in self.rows[cid])
        return torch.cat([xtr[tr], xte[te]]), torch.cat([ytr[tr], yte[te]])

    @classmethod
    def for_shadow(cls, base: FederatedData, pool: MembershipPool,
                   masks: dict[int, np.ndarray], shadow: int) -> ShadowData:
        rows = {}
        for cid in pool.clients:
            k = len(pool.members[cid])
            n_train = len(base.client_train(cid)[1])
            keep = np.setdiff1d(np.arange(n_train), pool.members[cid])
            mask = masks[cid][shadow]
            rows[cid] = (np.sort(np.r_[keep, pool.members[cid][mask[:k]]]),
                         pool.nonmembers[cid][mask[k:]])
        return cls(base, rows)


class Probe:
    """A scratch copy of the model for an audit's questions: the initial state with the
    arrays asked about loaded on top, so arrays a record lacks (e.g. layers a strategy keeps
    local) never linger from an earlier probe."""

    def __init__(self, model: nn.Module, initial: ArrayRecord) -> None:
        self.model = model
        self.initial = initial

    def load(self, *layers: ArrayRecord | dict[str, torch.Tensor]) -> nn.Module:
        load_record(self.model, self.initial)
        for arrays in layers:
            load_record(self.model, arrays)
        return self.model

    def outputs(self, arrays: ArrayRecord, x: torch.Tensor, y: torch.Tensor,
                base: ArrayRecord | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-example (losses, LiRA confidences) of ``(x, y)`` under ``arrays`` (on top of
        ``base``, when a record holds only some arrays, e.g. a client's upload)."""
        self.load(*([base] if base is not None else []), arrays)
        return per_example_outputs(self.model, x, y)

    def accuracy(self, arrays: ArrayRecord, x: torch.Tensor, y: torch.Tensor) -> float:
        model = self.load(arrays)
        with torch.no_grad():
            model.eval()
            return float((model(x).argmax(1) == y).float().mean())

"""One table answers "is it a norm layer, does it mix the batch, which keys are statistics":
a type registered once is seen by every caller (FedBN, SiloBN, FixBN, leakage, cohorts)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

import fedsim.models.norm as norm_module
from fedsim.client.hooks import HookContext
from fedsim.client.hooks import norm_keys as hooks_norm_keys
from fedsim.models.norm import (
    NORM_LAYER_TYPES,
    BatchNorm,
    GroupNorm,
    HybridNorm,
    InstanceNorm,
    LayerNorm,
    has_running_statistics,
    is_norm_layer,
    layer_uses_batch_statistics,
    model_uses_batch_statistics,
    norm_keys,
    norm_layers,
    norm_spec,
    norm_statistics_keys,
    register_norm_layer,
    statistics_buffers,
    statistics_layers,
)
from fedsim.privacy.leakage import has_running_stats, uploaded_arrays
from strategies.fedbn import FedBNHook
from strategies.fixbn import FixBNHook
from strategies.silobn import SiloBNHook


class RMSNorm(nn.Module):
    """Root-mean-square normalization over channels (Zhang & Sennrich 2019), no statistics."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + self.eps) * self.weight.view(
            shape)


class BatchRMSNorm(nn.Module):
    """RMS over the batch per channel, with a running mean square (a BN without centring)."""

    def __init__(self, num_channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.register_buffer("running_ms", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0))
        self.register_buffer("scratch", torch.zeros(1))  # a buffer that is no statistic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        if self.training:
            ms = x.square().mean(dims)
            with torch.no_grad():
                self.running_ms.lerp_(ms, self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            ms = self.running_ms
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * torch.rsqrt(ms.view(shape) + self.eps) * self.weight.view(shape)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), RMSNorm(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         BatchRMSNorm(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.fixture
def registered(monkeypatch):
    """RMSNorm and BatchRMSNorm registered (in a copy of the table, restored afterwards)."""
    monkeypatch.setattr(norm_module, "NORM_LAYERS", dict(norm_module.NORM_LAYERS))
    register_norm_layer(RMSNorm, batch_statistics=False)
    register_norm_layer(BatchRMSNorm, batch_statistics=True,
                        statistics=("running_ms", "num_batches_tracked"))


def test_unregistered_types_are_no_norm_layers():
    model = net()
    assert norm_layers(model) == [] and norm_keys(model) == []
    assert not has_running_stats(model[4]) and not model_uses_batch_statistics(model)


def test_one_registration_reaches_every_predicate(registered):
    model = net()
    assert [name for name, _ in norm_layers(model)] == ["1", "4"]
    assert is_norm_layer(model[1]) and not layer_uses_batch_statistics(model[1])
    assert layer_uses_batch_statistics(model[4]) and model_uses_batch_statistics(model)
    assert statistics_buffers(model[1]) == []
    assert statistics_buffers(model[4]) == ["running_ms", "num_batches_tracked"]
    assert statistics_layers(model, ["4.running_ms"]) == [model[4]]
    assert norm_statistics_keys(model) == ["4.running_ms", "4.num_batches_tracked"]
    # FedBN keeps every norm key local: parameters and buffers of both layers
    fedbn = FedBNHook(HookContext(0, ConfigRecord(), RecordDict()))
    local = ["1.weight", "4.weight", "4.running_ms", "4.num_batches_tracked", "4.scratch"]
    assert fedbn.local_keys(model) == local == hooks_norm_keys(model)
    # SiloBN keeps, and FixBN freezes, the statistics only
    silobn = SiloBNHook(HookContext(0, ConfigRecord(), RecordDict()))
    assert silobn.local_keys(model) == ["4.running_ms", "4.num_batches_tracked"]
    fixbn = FixBNHook(HookContext(0, ConfigRecord(), RecordDict()))
    upload = fixbn.on_reply(model, model.state_dict())
    assert set(model.state_dict()) - set(upload) == {"4.running_ms", "4.num_batches_tracked"}
    model.train()
    fixbn.before_train(model)
    assert not model[4].training and model[1].training  # normalises with frozen statistics
    # the leakage report sees running statistics in the registered layer only
    assert has_running_stats(model[4]) and not has_running_stats(model[1])
    kinds = {r["name"]: r["kind"] for r in uploaded_arrays(model)}
    assert kinds["4.num_batches_tracked"] == "num_batches_tracked"
    assert kinds["4.scratch"] == "other" and kinds["1.weight"] == "weight"


def test_registration_refuses_bad_entries():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_norm_layer(int, batch_statistics=False)
    with pytest.raises(TypeError, match="True or False"):
        register_norm_layer(RMSNorm, batch_statistics=1)
    with pytest.raises(ValueError, match="buffer names"):
        register_norm_layer(RMSNorm, batch_statistics=False, statistics=("running ms",))
    assert norm_spec(RMSNorm) is None  # nothing was registered


TORCH_NORMS = [
    (nn.BatchNorm1d(3), True, ["running_mean", "running_var", "num_batches_tracked"]),
    (nn.BatchNorm2d(3), True, ["running_mean", "running_var", "num_batches_tracked"]),
    (nn.BatchNorm3d(3), True, ["running_mean", "running_var", "num_batches_tracked"]),
    (nn.SyncBatchNorm(3), True, ["running_mean", "running_var", "num_batches_tracked"]),
    (nn.LazyBatchNorm2d(), True, ["running_mean", "running_var", "num_batches_tracked"]),
    (nn.BatchNorm2d(3, track_running_stats=False), True, []),
    (nn.InstanceNorm2d(3, affine=True), False, []),
    (nn.InstanceNorm1d(3, track_running_stats=True), False,
     ["running_mean", "running_var", "num_batches_tracked"]),
    (nn.GroupNorm(1, 3), False, []),
    (nn.LayerNorm(3), False, []),
    (BatchNorm(3), True, ["running_mean", "running_var", "num_batches_tracked"]),
    (HybridNorm(3), True, ["running_mean", "running_var", "num_batches_tracked"]),
    (GroupNorm(4, groups=2), False, []),
    (LayerNorm(3), False, []),
    (InstanceNorm(3), False, []),
]


@pytest.mark.parametrize(("layer", "mixes", "statistics"), TORCH_NORMS,
                         ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_torch_and_fedsim_norm_layers(layer, mixes, statistics):
    assert is_norm_layer(layer)
    assert layer_uses_batch_statistics(layer) is mixes
    assert statistics_buffers(layer) == statistics
    assert has_running_statistics(layer) is bool(statistics)
    assert has_running_stats(layer) is bool(statistics)  # leakage asks the same table


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 1, 1), nn.Linear(2, 2), nn.Identity(),
                                   nn.Dropout(), nn.LocalResponseNorm(2)])
def test_other_layers_are_not_norm_layers(layer):
    assert not is_norm_layer(layer) and not has_running_statistics(layer)


def test_fedsim_layer_types_are_in_the_table():
    assert all(norm_spec(t) is not None for t in NORM_LAYER_TYPES)


def test_a_norm_index_answers_as_the_walk_and_stays_with_its_model():
    """``index_norm_layers`` records the answers once (the cohort model's hooks ask per
    client); they equal the walk's, and a deep copy (another model) walks its own."""
    import copy

    from fedsim.models.norm import index_norm_layers

    model = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNorm(4), nn.ReLU(),
                          nn.Sequential(GroupNorm(4, groups=2), HybridNorm(4)), nn.Flatten())
    walked = (norm_layers(model), norm_keys(model), norm_statistics_keys(model))
    index = index_norm_layers(model)
    assert (norm_layers(model), norm_keys(model), norm_statistics_keys(model)) == walked
    assert list(index.keys) == walked[1] and [n for n, _ in index.layers] == ["1", "3.0", "3.1"]
    assert [m for _, m in norm_layers(model)] == [model[1], model[3][0], model[3][1]]
    norm_keys(model).clear()  # callers get their own lists
    assert norm_keys(model) == walked[1]
    twin = copy.deepcopy(model)
    twin[3] = nn.Identity()  # a copy may be restructured: it does not read the index
    assert norm_keys(twin) == [k for k in walked[1] if not k.startswith("3.")]
    assert [m for _, m in norm_layers(twin)] == [twin[1]]

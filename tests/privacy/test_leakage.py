"""What the client uploads, and the batch statistics its BatchNorm buffers give away."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.privacy.leakage import (
    has_running_stats,
    input_stats_from_bn,
    recover_batch_stats,
    uploaded_arrays,
)


class MixNorm(nn.Module):
    """A norm that is no _BatchNorm but keeps running statistics (like a BN/LN mix)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Counter(nn.Module):
    """Has a buffer, but no running statistics: its buffers are 'other'."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def local_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One client SGD step in train mode (updates BN running statistics once)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def batch(seed: int, shape: tuple[int, ...], classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = 2.0 + 3.0 * torch.randn(shape, generator=gen)  # far from BN's (0, 1) start
    return x, torch.randint(0, classes, (shape[0],), generator=gen)


# --- classification of uploaded arrays -------------------------------------------------


def test_uploaded_arrays_classify_by_owning_module():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        MixNorm(4),
        Counter(),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    rows = {r["name"]: r for r in uploaded_arrays(model)}
    kinds = {name: r["kind"] for name, r in rows.items()}
    assert kinds == {
        "0.weight": "weight",
        "0.bias": "bias",
        "1.weight": "weight",
        "1.bias": "bias",
        "1.running_mean": "running_mean",
        "1.running_var": "running_var",
        "1.num_batches_tracked": "num_batches_tracked",
        "2.weight": "weight",
        "2.bias": "bias",
        "3.alpha": "other",
        "3.running_mean": "running_mean",
        "3.running_var": "running_var",
        "3.num_batches_tracked": "num_batches_tracked",
        "4.num_batches_tracked": "other",
        "6.weight": "weight",
        "6.bias": "bias",
    }
    assert rows["1.running_mean"]["layer_type"] == "BatchNorm2d"
    assert rows["3.running_var"]["layer_type"] == "MixNorm"
    assert rows["0.weight"]["shape"] == (4, 1, 3, 3)
    assert has_running_stats(model[3]) and not has_running_stats(model[2])


def test_uploaded_arrays_respect_the_keys_sent_and_refuse_unknown_ones():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    fedbn_keys = ["0.weight", "0.bias"]  # FedBN keeps every BN entry local
    assert [r["name"] for r in uploaded_arrays(model, fedbn_keys)] == fedbn_keys
    with pytest.raises(KeyError, match="2.weight"):
        uploaded_arrays(model, ["2.weight"])


# --- BN statistics leak the batch ------------------------------------------------------


def test_bn_on_the_input_reveals_the_batch_mean_and_variance_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3))
    x, y = batch(0, (16, 5))
    local_step(model, x, y)
    leaked = input_stats_from_bn(model, model.state_dict())
    assert leaked is not None and leaked.applies_to == "input" and leaked.exact
    torch.testing.assert_close(leaked.mean, x.double().mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(leaked.var, x.double().var(0, unbiased=True), atol=1e-5, rtol=0)


def test_bn_after_the_first_conv_reveals_its_output_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    x, y = batch(1, (8, 3, 8, 8))
    with torch.no_grad():
        h = model[0](x).double()
    local_step(model, x, y)
    leaked = input_stats_from_bn(model, model.state_dict())
    assert leaked.applies_to == "output of 0 (Conv2d)"
    torch.testing.assert_close(leaked.mean, h.mean((0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(leaked.var, h.var((0, 2, 3), unbiased=True), atol=1e-5, rtol=0)


def test_a_federated_round_leaks_too_given_the_statistics_the_server_sent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4, momentum=0.3), nn.Linear(4, 3))
    for seed in (10, 11, 12):  # earlier rounds: the global stats are no longer (0, 1)
        local_step(model, *batch(seed, (32, 4)))
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch(2, (16, 4))
    local_step(model, x, y)
    leaked = input_stats_from_bn(model, model.state_dict(), prev_state=sent)
    assert leaked.num_batches == 1
    torch.testing.assert_close(leaked.mean, x.double().mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(leaked.var, x.double().var(0), atol=1e-5, rtol=0)


def test_cumulative_average_bn_is_inverted_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 3))
    local_step(model, *batch(20, (32, 4)))
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch(3, (16, 4))
    local_step(model, x, y)
    leaked = input_stats_from_bn(model, model.state_dict(), prev_state=sent)
    torch.testing.assert_close(leaked.mean, x.double().mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(leaked.var, x.double().var(0), atol=1e-5, rtol=0)


def test_several_batches_give_their_ema_weighted_average():
    torch.manual_seed(0)
    m = 0.1
    model = nn.Sequential(nn.BatchNorm1d(4, momentum=m), nn.Linear(4, 3))
    (x1, y1), (x2, y2) = batch(4, (16, 4)), batch(5, (16, 4))
    local_step(model, x1, y1)
    local_step(model, x2, y2)
    leaked = input_stats_from_bn(model, model.state_dict())
    assert leaked.num_batches == 2 and not leaked.exact
    w1, w2 = m * (1 - m), m  # EMA weights of batch 1 and batch 2
    expected = (w1 * x1.double().mean(0) + w2 * x2.double().mean(0)) / (w1 + w2)
    torch.testing.assert_close(leaked.mean, expected, atol=1e-5, rtol=0)


def test_recover_batch_stats_hand_case():
    # momentum 0.1, one batch from (0, 1): r_mean = 0.1·s_mean, r_var = 0.9 + 0.1·s_var.
    f64 = dict(dtype=torch.float64)
    mean, var = recover_batch_stats(torch.tensor([0.5], **f64), torch.tensor([1.2], **f64), 0.1)
    torch.testing.assert_close(mean, torch.tensor([5.0], **f64))
    torch.testing.assert_close(var, torch.tensor([3.0], **f64))
    with pytest.raises(ValueError):
        recover_batch_stats(torch.zeros(1), torch.ones(1), 0.1, num_batches=0)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.GroupNorm(1, 4), nn.Linear(4, 3)),  # no running statistics
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 3)),  # deep
    ],
    ids=["groupnorm", "deep-bn"],
)
def test_no_leak_without_a_first_bn(model):
    local_step(model, *batch(6, (8, 4)))
    assert input_stats_from_bn(model, model.state_dict()) is None


def test_no_leak_when_bn_statistics_stay_local_or_no_batch_ran():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    assert input_stats_from_bn(model, model.state_dict()) is None  # untrained: 0 batches
    local_step(model, *batch(7, (8, 4)))
    fedbn_upload = {k: v for k, v in model.state_dict().items() if not k.startswith("0.")}
    assert input_stats_from_bn(model, fedbn_upload) is None

"""Every (arch, norm) pair builds, runs forward/backward, and exposes its norm layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.models import (
    ARCHS,
    NORM_LAYER_TYPES,
    NORMS,
    build_model,
    hybrid_alphas,
    norm_modules,
)
from fedsim.models.norm import theta_for_alpha

SHAPES = [(1, 8), (1, 28), (3, 32)]  # (channels, image size): digits, MNIST, CIFAR-10
ARCH_NAMES = ["cnn", "resnet", "mlp"]  # image archs (text archs: tests/models/test_sequence.py)
NORM_NAMES = ["bn", "in", "gn", "ln", "rms", "none", "hybrid"]
NUM_NORM_LAYERS = {"cnn": 2, "resnet": 6, "mlp": 2}  # resnet: stem + 2 + 2 + shortcut


def _build(arch: str, norm: str, channels: int = 1, size: int = 8, **kw) -> nn.Module:
    return build_model(
        arch, norm, in_channels=channels, image_size=size, num_classes=10, width=16, **kw
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; two contend badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registries_hold_the_documented_names():
    assert sorted(ARCHS) == sorted(ARCH_NAMES + ["lstm", "transformer"])
    assert sorted(NORMS) == sorted(NORM_NAMES)


@pytest.mark.parametrize(("channels", "size"), SHAPES)
@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_forward_and_backward_in_train_mode(arch, norm, channels, size):
    torch.manual_seed(0)
    model = _build(arch, norm, channels, size).train()
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_eval_mode_takes_a_single_sample(arch, norm):
    model = _build(arch, norm).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_norm_modules_finds_every_norm_layer_and_nothing_else(arch, norm):
    found = norm_modules(_build(arch, norm))
    expected = 0 if norm == "none" else NUM_NORM_LAYERS[arch]
    assert len(found) == expected
    assert all(isinstance(m, NORM_LAYER_TYPES) for _, m in found)
    assert not any(isinstance(m, nn.Conv2d | nn.Linear) for _, m in found)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_settings_reach_the_norm_layers(arch):
    gn = norm_modules(_build(arch, "gn", groups=4))
    assert {m.num_groups for _, m in gn} == {4}
    alphas = hybrid_alphas(_build(arch, "hybrid", hybrid_init=theta_for_alpha(0.75)))
    assert len(alphas) == NUM_NORM_LAYERS[arch]
    assert all(a == pytest.approx(0.75) for a in alphas.values())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_init_is_fixed_by_the_seed(arch):
    torch.manual_seed(3)
    a = _build(arch, "bn").state_dict()
    torch.manual_seed(3)
    b = _build(arch, "bn").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_head_is_the_final_linear(arch):
    model = _build(arch, "gn")
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10


@pytest.mark.parametrize(("arch", "expected"), [("cnn", 21578), ("resnet", 77578), ("mlp", 3594)])
def test_parameter_counts_for_digits_at_width_32(arch, expected):
    model = build_model(arch, "bn", in_channels=1, image_size=8, num_classes=10, width=32)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(ScenarioError, match="model.arch") as info:
        _build("vgg", "bn")
    assert "cnn, lstm, mlp, resnet, transformer" in str(info.value)


def test_unknown_norm_lists_the_valid_ones():
    with pytest.raises(ScenarioError, match="model.norm") as info:
        _build("cnn", "batch")
    assert "bn, gn, hybrid, in, ln, none, rms" in str(info.value)


def test_cnn_learns_digits_quickly():
    """88 SGD steps on the embedded 8×8 digits reach > 90 % held-out accuracy (0.945 seen)."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = split[:1400], split[1400:]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    torch.manual_seed(0)
    model = build_model("cnn", "gn", in_channels=1, image_size=8, num_classes=10, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(perm), 32):
            batch = perm[i : i + 32]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.9



@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("size", [8, 28])
def test_cnn_pools_before_relu_with_the_values_and_gradients_of_relu_then_pool(norm, size):
    """The CNN's stages pool before their ReLU; the canonical order (ReLU, then pool) gives
    bit-identical outputs and gradients, so the reordering changes no result."""
    torch.manual_seed(0)
    model = _build("cnn", norm, size=size)
    layers = list(model.features)
    canonical = []
    for layer in layers:  # move each ReLU back in front of the pooling layer before it
        if isinstance(layer, nn.ReLU) and canonical and not isinstance(canonical[-1], nn.ReLU):
            canonical.insert(len(canonical) - 1, layer)
        else:
            canonical.append(layer)
    assert [type(m).__name__ for m in canonical[:4]] == [
        "Conv2d", type(layers[1]).__name__, "ReLU", type(layers[2]).__name__]
    reference = nn.Sequential(*canonical)
    x = torch.randn(6, 1, size, size)
    x[0, 0, :4, :4] = 0.0  # ties inside pooling windows (equal values, zeros after ReLU)
    out = model.head(model.features(x))
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref = model.head(reference(x))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)

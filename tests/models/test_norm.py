"""Every norm layer checked against its torch.nn reference, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.models import (
    NORM_LAYER_TYPES,
    NORMS,
    HybridNorm,
    hybrid_alphas,
    make_norm,
    norm_modules,
)
from fedsim.models.norm import group_count, theta_for_alpha, uses_batch_statistics

C = 6
CONV = (4, C, 3, 3)
VECTOR = (5, C)
KINDS = ["bn", "in", "gn", "ln", "rms", "none", "hybrid"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors run fastest on one thread; two contend badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 1
    upstream = torch.randn(shape, generator=g)  # a random loss direction for backward
    return x, upstream


def _randomize_affine(*layers: nn.Module) -> None:
    """Give every layer the same non-trivial affine parameters."""
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(C, generator=g) + 0.5
    bias = torch.randn(C, generator=g)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def _assert_same_step(ours: nn.Module, ref: nn.Module, x: torch.Tensor, up: torch.Tensor) -> None:
    """Outputs and gradients (input, weight, bias) of one forward/backward agree."""
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    (ya * up).sum().backward()
    (yb * up).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            getattr(ours, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-5
        )


REFERENCES = [
    ("bn", CONV, lambda: nn.BatchNorm2d(C)),
    ("bn", VECTOR, lambda: nn.BatchNorm1d(C)),
    ("in", CONV, lambda: nn.InstanceNorm2d(C, affine=True)),
    ("in", VECTOR, lambda: nn.LayerNorm(C)),  # documented: no spatial extent → per sample
    ("gn", CONV, lambda: nn.GroupNorm(3, C)),  # groups=3 divides 6
    ("gn", VECTOR, lambda: nn.GroupNorm(3, C)),
    ("ln", CONV, lambda: nn.GroupNorm(1, C)),
    ("ln", VECTOR, lambda: nn.LayerNorm(C)),
]


@pytest.mark.parametrize(("kind", "shape", "reference"), REFERENCES)
def test_matches_torch_reference_in_train_and_eval(kind, shape, reference):
    ours, ref = make_norm(kind, C, groups=3), reference()
    _randomize_affine(ours, ref)
    for step in range(3):  # several steps so BN running stats are compared after updates
        _assert_same_step(ours, ref, *_inputs(shape, seed=step))
    ours.eval()
    ref.eval()
    _assert_same_step(ours, ref, *_inputs(shape, seed=10))


@pytest.mark.parametrize("shape", [CONV, VECTOR])
def test_bn_running_stats_and_buffer_names_match_torch(shape):
    ours = make_norm("bn", C, momentum=0.3)
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(C, momentum=0.3)
    for step in range(3):
        x, _ = _inputs(shape, seed=step)
        ours(x)
        ref(x)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    assert int(ours.num_batches_tracked) == 3


def test_bn_accepts_a_torch_state_dict():
    ref = nn.BatchNorm2d(C)
    ref(_inputs(CONV)[0])
    ours = make_norm("bn", C)
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_bn_batch_of_one_trains_on_conv_features_but_not_on_vectors():
    bn = make_norm("bn", C)
    out = bn(torch.randn(1, C, 3, 3))  # statistics over H·W = 9 values per channel
    assert out.shape == (1, C, 3, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, C))  # torch's behaviour; the config layer refuses this set-up


@pytest.mark.parametrize(
    ("channels", "groups", "expected"),
    [(32, 8, 8), (12, 8, 6), (10, 8, 5), (7, 8, 7), (7, 4, 1), (64, 1, 1), (3, 8, 3)],
)
def test_group_count_is_the_largest_divisor_not_above_groups(channels, groups, expected):
    assert group_count(channels, groups) == expected
    assert make_norm("gn", channels, groups=groups).num_groups == expected


def test_gn_refuses_one_feature_per_group_on_vectors():
    layer = make_norm("gn", C, groups=C)
    assert layer(torch.randn(2, C, 3, 3)).shape == (2, C, 3, 3)  # conv: acts as instance norm
    with pytest.raises(ValueError, match="outputs a constant"):
        layer(torch.randn(4, C))


def test_gn_default_groups_is_8():
    assert make_norm("gn", 64).num_groups == 8


def test_hybrid_hand_computed_example():
    # x = [[0, 2], [4, 6]]: batch means per channel (2, 4), batch variances (4, 4);
    # layer means per sample (1, 5), layer variances (1, 1). At alpha = 0.5 every entry has
    # variance 2.5 and the means are [[1.5, 2.5], [3.5, 4.5]].
    layer = HybridNorm(2, theta_init=0.0, eps=0.0)
    x = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    expected = torch.tensor([[-3.0, -1.0], [1.0, 3.0]]) * 0.5 / math.sqrt(2.5)
    torch.testing.assert_close(layer(x), expected)
    # running stats: momentum 0.1 from (0, 1); unbiased batch variance 8
    torch.testing.assert_close(layer.running_mean, torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(layer.running_var, torch.tensor([1.7, 1.7]))
    assert int(layer.num_batches_tracked) == 1
    # eval: batch part from the running stats, layer part from the sample itself
    layer.eval()
    mean = 0.5 * torch.tensor([[0.2, 0.4]]) + 0.5 * torch.tensor([[1.0], [5.0]])
    var = 0.5 * 1.7 + 0.5 * 1.0
    torch.testing.assert_close(layer(x), (x - mean) / math.sqrt(var))


@pytest.mark.parametrize("shape", [CONV, VECTOR])
def test_hybrid_is_bn_at_alpha_one(shape):
    hybrid = make_norm("hybrid", C, theta_init=50.0)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(C)
    assert hybrid.alpha == 1.0
    _randomize_affine(hybrid, bn)
    for step in range(3):
        _assert_same_step(hybrid, bn, *_inputs(shape, seed=step))
    torch.testing.assert_close(hybrid.running_mean, bn.running_mean)
    torch.testing.assert_close(hybrid.running_var, bn.running_var)
    assert int(hybrid.num_batches_tracked) == int(bn.num_batches_tracked)
    hybrid.eval()
    bn.eval()
    _assert_same_step(hybrid, bn, *_inputs(shape, seed=10))


@pytest.mark.parametrize(
    ("shape", "reference"),
    [(CONV, lambda: nn.GroupNorm(1, C)), (VECTOR, lambda: nn.LayerNorm(C))],
)
def test_hybrid_is_ln_at_alpha_zero(shape, reference):
    hybrid, ln = make_norm("hybrid", C, theta_init=-50.0), reference()
    assert hybrid.alpha < 1e-20
    _randomize_affine(hybrid, ln)
    _assert_same_step(hybrid, ln, *_inputs(shape, seed=0))
    hybrid.eval()
    ln.eval()
    _assert_same_step(hybrid, ln, *_inputs(shape, seed=1))


@pytest.mark.parametrize("shape", [CONV, VECTOR])
def test_hybrid_gradient_reaches_theta(shape):
    hybrid = make_norm("hybrid", C)
    x, up = _inputs(shape)
    (hybrid(x) * up).sum().backward()
    assert hybrid.theta.grad is not None
    assert torch.isfinite(hybrid.theta.grad) and hybrid.theta.grad != 0


def test_hybrid_alpha_property_and_theta_for_alpha():
    assert make_norm("hybrid", C).alpha == 0.5
    layer = make_norm("hybrid", C, theta_init=theta_for_alpha(0.75))
    assert isinstance(layer.alpha, float)
    assert layer.alpha == pytest.approx(0.75)
    with pytest.raises(ValueError, match="alpha must be in"):
        theta_for_alpha(1.0)


def test_hybrid_vector_batch_of_one_raises_like_bn():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        make_norm("hybrid", C)(torch.randn(1, C))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [CONV, VECTOR])
def test_every_kind_takes_the_common_options_and_keeps_the_shape(kind, shape):
    wide = (shape[0], 16, *shape[2:])  # 16 channels: 8 groups of 2
    layer = make_norm(kind, 16, groups=8, theta_init=0.0, eps=1e-5, momentum=0.1)
    assert layer(torch.randn(wide)).shape == wide


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="grups"):
        make_norm("gn", C, grups=4)


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ScenarioError, match="model.norm") as info:
        make_norm("batchnorm", C)
    for kind in KINDS:
        assert repr(kind)[1:-1] in str(info.value)
    assert sorted(NORMS) == sorted(KINDS)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("bn", True), ("hybrid", True), ("in", False), ("gn", False), ("ln", False), ("rms", False),
     ("none", False)],
)
def test_uses_batch_statistics(kind, expected):
    assert uses_batch_statistics(kind) is expected


def test_uses_batch_statistics_unknown_kind():
    with pytest.raises(ScenarioError, match="choose one of"):
        uses_batch_statistics("xx")


@pytest.mark.parametrize("kind", KINDS)
def test_norm_modules_picks_exactly_the_norm_layers(kind):
    model = nn.Sequential(
        nn.Conv2d(1, C, 3),
        make_norm(kind, C),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(C, C),
        make_norm(kind, C),
    )
    found = norm_modules(model)
    if kind == "none":
        assert found == []
    else:
        assert [name for name, _ in found] == ["1", "5"]
        assert all(isinstance(m, NORM_LAYER_TYPES) for _, m in found)


def test_norm_layer_types_are_what_the_factory_builds():
    built = {type(make_norm(kind, C)) for kind in KINDS if kind != "none"}
    assert built == set(NORM_LAYER_TYPES)
    assert not issubclass(nn.Identity, NORM_LAYER_TYPES)


def test_hybrid_alphas_by_module_name():
    model = nn.Sequential(
        make_norm("hybrid", C, theta_init=theta_for_alpha(0.25)),
        make_norm("bn", C),
        make_norm("hybrid", C),
    )
    alphas = hybrid_alphas(model)
    assert list(alphas) == ["0", "2"]
    assert alphas["0"] == pytest.approx(0.25)
    assert alphas["2"] == 0.5
    assert hybrid_alphas(nn.Sequential(make_norm("bn", C))) == {}


@pytest.mark.parametrize("kind", ["bn", "in", "hybrid"])
def test_scalar_input_is_refused(kind):
    with pytest.raises(ValueError):
        make_norm(kind, C)(torch.randn(C))


@pytest.mark.parametrize("dims,keepdim", [([0, 2, 3], False), ([1, 2, 3], True), ([0], False)])
def test_hybrid_two_pass_statistics_equal_torch_var_mean(dims, keepdim):
    from fedsim.models.norm import _var_mean

    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(0)) * 3 + 100
    var, mean = _var_mean(x, dims, keepdim)
    ref_var, ref_mean = torch.var_mean(x, dim=dims, correction=0, keepdim=keepdim)
    assert var.shape == ref_var.shape and mean.shape == ref_mean.shape
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-5)

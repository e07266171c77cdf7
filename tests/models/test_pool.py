"""FastMaxPool2d gives nn.MaxPool2d's values and gradients bit for bit, everywhere we use it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.models.pool import FastMaxPool2d


def inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(shape, generator=g))  # many all-zero windows: ties
    x[0, 0, :2, :2] = 1.5  # a tie between non-zero values
    x.view(-1)[7] = float("nan")
    x.view(-1)[40] = float("inf")
    return x


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 5, 28, 28), (1, 1, 6, 10), (4, 3, 7, 9)])
def test_values_indices_and_gradients_equal_nn_maxpool2d(shape):
    x = inputs(shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = nn.MaxPool2d(2)(xa), FastMaxPool2d(2)(xb)
    assert torch.equal(ya, yb) or torch.equal(ya.nan_to_num(), yb.nan_to_num())
    assert torch.equal(ya.isnan(), yb.isnan())
    with torch.no_grad():  # evaluation's path (no autograd.Function)
        assert torch.equal(FastMaxPool2d(2)(x).nan_to_num(), ya.nan_to_num())
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1))
    (ga,), (gb,) = torch.autograd.grad(ya, xa, g), torch.autograd.grad(yb, xb, g)
    assert torch.equal(ga, gb)


def test_other_settings_run_nn_maxpool2d_itself():
    x = inputs((2, 3, 9, 9))
    for kwargs in ({"kernel_size": 3, "stride": 2}, {"kernel_size": 2, "padding": 1},
                   {"kernel_size": 2, "ceil_mode": True}, {"kernel_size": 2, "dilation": 2}):
        assert torch.equal(FastMaxPool2d(**kwargs)(x).nan_to_num(),
                           nn.MaxPool2d(**kwargs)(x).nan_to_num())
    y, idx = FastMaxPool2d(2, return_indices=True)(x)
    assert torch.equal(idx, F.max_pool2d(x, 2, return_indices=True)[1])
    assert FastMaxPool2d(2)(x[0]).shape == (3, 4, 4)  # 3-D (unbatched) input
    assert FastMaxPool2d(2).state_dict() == {} and repr(FastMaxPool2d(2)) == repr(
        nn.MaxPool2d(2)).replace("MaxPool2d", "FastMaxPool2d")


def net(pool):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), pool, nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3))


def test_per_client_grads_over_stacked_parameters_equal_nn_maxpool2d():
    """functional_call over stacked parameters, under vmap(grad(...)) (nn.MaxPool2d's own
    path) and the cohorts' autograd over vmap (the folded path), bit for bit."""
    ref, fast = net(nn.MaxPool2d(2)), net(FastMaxPool2d(2))
    params = {n: p.detach().unsqueeze(0).repeat(5, *[1] * p.dim()) for n, p in
              ref.named_parameters()}
    params = {n: p + 0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2))
              for n, p in params.items()}
    x = torch.randn(5, 4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (5, 4), generator=torch.Generator().manual_seed(4))

    def loss(model):
        return lambda p, xb, yb: F.cross_entropy(functional_call(model, p, (xb,)), yb)

    ga = vmap(grad(loss(ref)))(params, x, y)
    gb = vmap(grad(loss(fast)))(params, x, y)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    gc = torch.autograd.grad(vmap(loss(fast))(leaves, x, y).sum(), list(leaves.values()))
    for n, g in zip(leaves, gc):
        assert torch.equal(ga[n], gb[n]), n
        torch.testing.assert_close(g, ga[n], rtol=1e-5, atol=1e-7, msg=n)


def test_double_backward_equals_nn_maxpool2d():
    """Gradient inversion differentiates the parameter gradient w.r.t. the input."""
    out = []
    for pool in (nn.MaxPool2d(2), FastMaxPool2d(2)):
        model = net(pool)
        x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(5),
                        requires_grad=True)
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        match = sum((g ** 2).sum() for g in grads)
        out.append(torch.autograd.grad(match, x)[0])
    assert torch.equal(out[0], out[1])

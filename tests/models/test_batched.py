"""Folded vmap rules (norm layers, FastMaxPool2d) equal per-client torch.nn, clients looped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fedsim.models.batched as batched
import fedsim.models.norm as norm_module
from fedsim.models.batched import fold, under_vmap, unfold
from fedsim.models.norm import BatchNorm, GroupNorm, InstanceNorm, LayerNorm
from fedsim.models.pool import FastMaxPool2d

K = 4  # clients in the cohort


@pytest.fixture(autouse=True)
def _fold_small_tensors(monkeypatch):
    """Fold these tests' small activations too (the layers skip the fold below a size)."""
    monkeypatch.setattr(batched, "FOLD_MIN_NUMEL", 0)


def conv_net(norm, pool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), norm(6), nn.ReLU(), pool,
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


def vector_net(norm) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), norm(6), nn.ReLU(), nn.Linear(6, 3))


def stacked(model: nn.Module, seed: int = 2) -> tuple[dict, dict]:
    """K clients' parameters (perturbed) and buffers (perturbed running stats)."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach() + 0.1 * torch.randn((K, *p.shape), generator=g)
              for n, p in model.named_parameters()}
    buffers = {n: (b.detach() + 0.1 * torch.rand((K, *b.shape), generator=g)
                   if b.is_floating_point() else b.detach().repeat(K))
               for n, b in model.named_buffers()}
    return params, buffers


def data(shape: tuple[int, ...], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((K, *shape), generator=g) * 2 + 1, torch.randint(0, 3, (K, shape[0]),
                                                                        generator=g)


def loss_of(model):
    def loss(p, b, xb, yb):
        return F.cross_entropy(functional_call(model, (p, b), (xb,)), yb)
    return loss


def per_client(reference: nn.Module, params, buffers, x, y):
    """The reference: each client's gradients and updated buffers with torch.nn layers."""
    grads, bufs = [], []
    for i in range(K):
        state = {n: t[i].clone() for n, t in (*params.items(), *buffers.items())}
        reference.load_state_dict(state)
        reference.zero_grad()
        F.cross_entropy(reference(x[i]), y[i]).backward()
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
        bufs.append({n: b.clone() for n, b in reference.named_buffers()})
    return ({n: torch.stack([g[n] for g in grads]) for n in grads[0]},
            {n: torch.stack([b[n] for b in bufs]) for n in bufs[0]})


#: ours -> torch.nn reference, on conv features and on vector features (6 channels)
REFERENCES = {
    "bn": (BatchNorm, lambda c: nn.BatchNorm2d(c), lambda c: nn.BatchNorm1d(c)),
    "gn": (lambda c: GroupNorm(c, groups=3), lambda c: nn.GroupNorm(3, c),
           lambda c: nn.GroupNorm(3, c)),
    "ln": (LayerNorm, lambda c: nn.GroupNorm(1, c), lambda c: nn.LayerNorm(c)),
    "in": (InstanceNorm, lambda c: nn.InstanceNorm2d(c, affine=True), lambda c: nn.LayerNorm(c)),
}


@pytest.mark.parametrize("features", ["conv", "vector"])
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_vmap_grad_and_running_stats_equal_torch_nn_per_client(kind, features):
    ours_norm, conv_ref, vector_ref = REFERENCES[kind]
    if features == "conv":
        ours, ref = conv_net(ours_norm, FastMaxPool2d(2)), conv_net(conv_ref, nn.MaxPool2d(2))
        x, y = data((5, 2, 8, 8))
    else:
        ours, ref = vector_net(ours_norm), vector_net(vector_ref)
        x, y = data((5, 5))
    params, buffers = stacked(ours)
    ref_grads, ref_bufs = per_client(ref, params, buffers, x, y)
    bufs = {n: b.clone() for n, b in buffers.items()}
    grads = vmap(grad(loss_of(ours)))(params, bufs, x, y)
    assert set(grads) == set(ref_grads)
    # GN on vectors normalises groups of 2 features: ill-conditioned, so rounding shows at
    # ~5e-6 in the first layer's gradient (vmap's own rule is off by ~9e-6 there)
    atol = 1e-5 if features == "vector" else 1e-6
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=atol, msg=n)
    assert set(bufs) == set(ref_bufs)
    for n in ref_bufs:  # BN: running mean/var and num_batches_tracked, updated in place
        torch.testing.assert_close(bufs[n], ref_bufs[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_folded_rule_equals_functorchs_own_rule(monkeypatch, kind):
    """The fold is a faster route to what vmap's built-in norm rules compute."""
    model = conv_net(REFERENCES[kind][0], FastMaxPool2d(2))
    params, buffers = stacked(model)
    x, y = data((5, 2, 8, 8))
    folded_bufs = {n: b.clone() for n, b in buffers.items()}
    folded = vmap(grad(loss_of(model)))(params, folded_bufs, x, y)
    monkeypatch.setattr(norm_module, "fold_norm", lambda x: False)
    own_bufs = {n: b.clone() for n, b in buffers.items()}
    own = vmap(grad(loss_of(model)))(params, own_bufs, x, y)
    for n in own:
        torch.testing.assert_close(folded[n], own[n], rtol=1e-5, atol=1e-6, msg=n)
    for n in own_bufs:
        torch.testing.assert_close(folded_bufs[n], own_bufs[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_shared_input_with_per_client_parameters(kind):
    """vmap over parameters only (the same batch for every client) folds too."""
    model = conv_net(REFERENCES[kind][0], FastMaxPool2d(2))
    ref = conv_net(REFERENCES[kind][1], nn.MaxPool2d(2))
    params, buffers = stacked(model)
    x, y = data((5, 2, 8, 8))
    x, y = x[0], y[0]
    ref_grads, _ = per_client(ref, params, buffers, x.expand(K, *x.shape), y.expand(K, 5))
    grads = vmap(grad(loss_of(model)), in_dims=(0, 0, None, None))(params, dict(buffers), x, y)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_strided_running_buffers_are_written_back():
    """Buffers that are not contiguous stacks are updated in place all the same."""
    layer = BatchNorm(3)
    x = torch.randn(K, 6, 3, generator=torch.Generator().manual_seed(0))
    params = {n: p.detach().expand(K, *p.shape) for n, p in layer.named_parameters()}
    mean_t = torch.zeros(3, K)  # .t() is a (K, 3) view with strides (1, K)
    buffers = {"running_mean": mean_t.t(), "running_var": torch.ones(K, 3),
               "num_batches_tracked": torch.zeros(K, dtype=torch.long)}
    vmap(lambda p, b, xb: functional_call(layer, (p, b), (xb,)))(params, buffers, x)
    torch.testing.assert_close(mean_t.t(), 0.1 * x.mean(dim=1))
    assert buffers["num_batches_tracked"].tolist() == [1] * K


def test_unbatched_running_statistics_are_refused():
    """Training under vmap with one shared set of running buffers cannot update them per
    client; it fails naming the buffer instead of silently dropping the update."""
    layer = BatchNorm(3)
    x = torch.randn(K, 6, 3)
    with pytest.raises(RuntimeError, match="unbatched running_mean"):
        vmap(layer)(x)
    layer.eval()  # eval mode reads the buffers only
    torch.testing.assert_close(vmap(layer)(x), x / (1 + layer.eps) ** 0.5)


def test_vector_batch_of_one_is_refused_under_vmap_too():
    layer = BatchNorm(3)
    buffers = {n: b.expand(K, *b.shape).clone() for n, b in layer.named_buffers()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        vmap(lambda b, xb: functional_call(layer, b, (xb,)))(buffers, torch.randn(K, 1, 3))


@pytest.mark.parametrize("bdim", [0, 1, 2])
def test_maxpool_vmap_rule_on_any_vmapped_dimension(bdim):
    """Pooling and its gradient, bit for bit, wherever vmap's dimension sits."""
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(K, 3, 5, 8, 8, generator=g)).movedim(0, bdim)
    up = torch.randn(K, 3, 5, 4, 4, generator=g)

    def f(pool):
        return lambda xb, ub: (pool(xb) * ub).sum()

    ours = vmap(grad(f(FastMaxPool2d(2))), in_dims=(bdim, 0))(x, up)
    ref = vmap(grad(f(nn.MaxPool2d(2))), in_dims=(bdim, 0))(x, up)
    assert torch.equal(ours, ref)
    assert torch.equal(vmap(FastMaxPool2d(2), in_dims=bdim)(x),
                       vmap(nn.MaxPool2d(2), in_dims=bdim)(x))


def test_fold_and_unfold():
    t = torch.arange(2 * 3 * 4).reshape(2, 3, 4)  # vmapped dimension 0 (size 2)
    folded = fold(t, 0, 2, 1)  # into logical dim 1 of (3, 4): (3, 2·4), clients outer
    assert folded.shape == (3, 8)
    assert torch.equal(folded[:, :4], t[0]) and torch.equal(folded[:, 4:], t[1])
    assert torch.equal(unfold(folded, 2, 1).movedim(1, 0), t)
    assert torch.equal(fold(t[0], None, 2, 1), torch.cat([t[0], t[0]], dim=1))


def test_under_vmap_only_inside_vmap():
    seen = []

    def probe(x):
        seen.append(under_vmap())
        return x.sum()

    probe(torch.ones(2))
    grad(probe)(torch.ones(2))
    vmap(grad(probe))(torch.ones(3, 2))
    vmap(probe)(torch.ones(3, 2))
    grad(grad(lambda x: probe(x) * x.sum()))(torch.ones(()))
    vmap(grad(grad(lambda x: probe(x) ** 2)))(torch.ones(3))
    assert seen == [False, False, True, True, False, False]


def test_norm_layers_fold_only_large_activations(monkeypatch):
    """Below FOLD_MIN_NUMEL elements per client, vmap's own (C++) rule is cheaper."""
    calls = []
    monkeypatch.setattr(norm_module, "batch_norm_train",
                        lambda *a: calls.append(a[0].shape) or batched.batch_norm_train(*a))
    monkeypatch.setattr(batched, "FOLD_MIN_NUMEL", 6 * 8 * 8 * 2)
    layer = BatchNorm(6)
    for n in (1, 2):
        x = torch.randn(K, n, 6, 8, 8)
        buffers = {b: t.expand(K, *t.shape).clone() for b, t in layer.named_buffers()}
        vmap(lambda b, xb: functional_call(layer, b, (xb,)))(buffers, x)
    assert calls == [(2, 6, 8, 8)]


def test_folded_backward_ops_refuse_double_backward():
    """A cohort differentiates once; a second derivative through a folded rule is an error
    naming the fix, not a silently wrong number."""
    g = torch.Generator().manual_seed(0)
    grad_y = torch.randn(4, 3, generator=g, requires_grad=True)
    x = torch.randn(4, 3, generator=g)
    mean, invstd = x.mean(0), 1 / (x.var(0, correction=0) + 1e-5).sqrt()
    grad_x, _, _ = batched._BatchNormBackward.apply(grad_y, x, torch.ones(3), mean, invstd, 1e-5)
    with pytest.raises(RuntimeError, match="no double backward; run higher-order gradients"):
        grad_x.sum().backward()

"""Folding layers under vmap (``fold_for_cohort``'s norm layers and FastMaxPool2d) equal
per-client torch.nn, looped; so do the plain layers under vmap's own rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fedsim.compat as compat
import fedsim.models.batched as batched_module
from fedsim.models.batched import (
    FOLDED,
    FoldedBatchNorm,
    FoldedGroupNorm,
    FoldedInstanceNorm,
    FoldedLayerNorm,
    FoldedMaxPool2d,
    fold_for_cohort,
    folding_vmap,
)
from fedsim.models.nets import ARCHS, build_model, input_kind
from fedsim.models.norm import NORMS, BatchNorm, GroupNorm, InstanceNorm, LayerNorm
from fedsim.models.pool import FastMaxPool2d

K = 4  # clients in the cohort


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


def cohort_grads(model, in_dims=0):
    """Per-client gradients the way a cohort computes them: grad of the summed losses over
    vmap (vmap innermost, so the layers fold)."""
    return grad(lambda p, b, xb, yb: vmap(loss_of(model), in_dims=in_dims)(p, b, xb, yb).sum())


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


@pytest.mark.parametrize("layers", ["folded", "plain"])
@pytest.mark.parametrize("order", ["autograd(vmap)", "grad(vmap)", "vmap(grad)"])
@pytest.mark.parametrize("features", ["conv", "vector"])
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_cohort_grads_and_running_stats_equal_torch_nn_per_client(kind, features, order,
                                                                  layers):
    """A ``fold_for_cohort`` model under autograd over vmap (the cohorts' path) and
    grad(vmap) folds the clients; under vmap(grad), and the plain model everywhere, runs
    vmap's own rules. Every way equals torch.nn run client by client."""
    ours_norm, conv_ref, vector_ref = REFERENCES[kind]
    if features == "conv":
        ours, ref = conv_net(ours_norm, FastMaxPool2d(2)), conv_net(conv_ref, nn.MaxPool2d(2))
        x, y = data((5, 2, 8, 8))
    else:
        ours, ref = vector_net(ours_norm), vector_net(vector_ref)
        x, y = data((5, 5))
    if layers == "folded":
        ours = fold_for_cohort(ours)
    params, buffers = stacked(ours)
    ref_grads, ref_bufs = per_client(ref, params, buffers, x, y)
    exact_grads, exact_bufs = per_client(copy.deepcopy(ref).double(), _double(params),
                                         _double(buffers), x.double(), y)
    bufs = {n: b.clone() for n, b in buffers.items()}
    if order == "autograd(vmap)":
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        losses = vmap(loss_of(ours))(leaves, bufs, x, y)
        grads = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
    elif order == "grad(vmap)":
        grads = cohort_grads(ours)(params, bufs, x, y)
    else:
        grads = vmap(grad(loss_of(ours)))(params, bufs, x, y)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert_as_exact_as_torch_nn(grads[n], ref_grads[n], exact_grads[n], n)
    assert set(bufs) == set(ref_bufs)
    for n in ref_bufs:  # BN: running mean/var and num_batches_tracked, updated in place
        if not ref_bufs[n].is_floating_point():
            assert torch.equal(bufs[n], ref_bufs[n]), n
            continue
        assert_as_exact_as_torch_nn(bufs[n], ref_bufs[n], exact_bufs[n], n)


def _double(tensors: dict) -> dict:
    return {n: t.double() if t.is_floating_point() else t for n, t in tensors.items()}


def assert_as_exact_as_torch_nn(ours, ref32, exact, name: str) -> None:
    """``ours`` (float32) is as close to the float64 result as torch.nn's own float32
    computation is, up to a small factor: the bound is the reference's rounding error on
    this CPU's kernels plus a few float32 ulps of the values, so it holds wherever the
    kernels round differently (GN on vectors normalises groups of two features and is
    ill-conditioned there, which the reference's own error then reflects)."""
    eps = torch.finfo(torch.float32).eps
    ref_error = (ref32.double() - exact).abs().max().item()
    bound = 8 * ref_error + 16 * eps * exact.abs().max().item() + 1e-30
    error = (ours.double() - exact).abs().max().item()
    assert error <= bound, f"{name}: |ours - float64| = {error:.3g} > {bound:.3g} " \
                           f"(torch.nn float32 is off by {ref_error:.3g})"


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_folded_rule_equals_functorchs_own_rule(kind):
    """The fold is a faster route to what vmap's built-in norm rules compute."""
    model = conv_net(REFERENCES[kind][0], FastMaxPool2d(2))
    params, buffers = stacked(model)
    x, y = data((5, 2, 8, 8))
    folded_bufs = {n: b.clone() for n, b in buffers.items()}
    folded = cohort_grads(fold_for_cohort(model))(params, folded_bufs, x, y)
    own_bufs = {n: b.clone() for n, b in buffers.items()}
    own = cohort_grads(model)(params, own_bufs, x, y)
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
    grads = cohort_grads(fold_for_cohort(model), in_dims=(0, 0, None, None))(
        params, dict(buffers), x, y)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_strided_running_buffers_are_written_back():
    """Buffers that are not contiguous stacks are updated in place all the same."""
    layer = fold_for_cohort(BatchNorm(3))
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
    layer = fold_for_cohort(BatchNorm(3))
    x = torch.randn(K, 6, 3)
    with pytest.raises(RuntimeError, match="unbatched running_mean"):
        vmap(layer)(x)
    layer.eval()  # eval mode reads the buffers only
    torch.testing.assert_close(vmap(layer)(x), x / (1 + layer.eps) ** 0.5)


@pytest.mark.parametrize("fold", [True, False])
def test_vector_batch_of_one_is_refused_under_vmap_too(fold):
    layer = fold_for_cohort(BatchNorm(3)) if fold else BatchNorm(3)
    buffers = {n: b.expand(K, *b.shape).clone() for n, b in layer.named_buffers()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        vmap(lambda b, xb: functional_call(layer, b, (xb,)))(buffers, torch.randn(K, 1, 3))


@pytest.mark.parametrize("bdim", [0, 1, 2])
def test_maxpool_folds_on_any_vmapped_dimension(bdim):
    """Pooling and its gradient, bit for bit, wherever vmap's dimension sits."""
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(K, 3, 5, 8, 8, generator=g)).movedim(0, bdim)
    up = torch.randn(K, 3, 5, 4, 4, generator=g)

    def f(pool):
        return grad(lambda xb, ub: vmap(lambda a, b: (pool(a) * b).sum(),
                                        in_dims=(bdim, 0))(xb, ub).sum())

    folded = fold_for_cohort(FastMaxPool2d(2))
    assert torch.equal(f(folded)(x, up), f(nn.MaxPool2d(2))(x, up))
    assert torch.equal(f(FastMaxPool2d(2))(x, up), f(nn.MaxPool2d(2))(x, up))
    assert torch.equal(vmap(folded, in_dims=bdim)(x), vmap(nn.MaxPool2d(2), in_dims=bdim)(x))
    assert torch.equal(vmap(FastMaxPool2d(2), in_dims=bdim)(x),
                       vmap(nn.MaxPool2d(2), in_dims=bdim)(x))
    ours = vmap(grad(lambda a, b: (FastMaxPool2d(2)(a) * b).sum()), in_dims=(bdim, 0))(x, up)
    ref = vmap(grad(lambda a, b: (nn.MaxPool2d(2)(a) * b).sum()), in_dims=(bdim, 0))(x, up)
    assert torch.equal(ours, ref)  # vmap(grad): nn.MaxPool2d's own path


def test_folding_only_where_vmap_is_innermost():
    seen = []

    def probe(x):
        seen.append(folding_vmap() is not None)
        return x.sum()

    probe(torch.ones(2))
    grad(probe)(torch.ones(2))
    vmap(grad(probe))(torch.ones(3, 2))
    vmap(probe)(torch.ones(3, 2))
    grad(lambda x: vmap(probe)(x).sum())(torch.ones(3, 2))
    grad(grad(lambda x: probe(x) * x.sum()))(torch.ones(()))
    assert seen == [False, False, False, True, True, False]


def test_second_derivatives_through_folded_layers():
    """The folded layers are ordinary differentiable ops under grad: a Hessian-vector
    product through them equals the one through vmap's own rules."""
    model = conv_net(REFERENCES["bn"][0], FastMaxPool2d(2))
    params, buffers = stacked(model)
    x, y = data((5, 2, 8, 8))
    v = {n: torch.ones_like(p) for n, p in params.items()}

    def hvp(net, bufs):
        g = cohort_grads(net)
        return grad(lambda p, b: sum((g(p, b, x, y)[n] * v[n]).sum() for n in p))(params, bufs)

    folded = hvp(fold_for_cohort(model), {n: b.clone() for n, b in buffers.items()})
    own = hvp(model, {n: b.clone() for n, b in buffers.items()})
    for n in own:
        torch.testing.assert_close(folded[n], own[n], rtol=1e-4, atol=1e-5, msg=n)


# -- fold_for_cohort: the fast path chosen once, when the cohort's model is built ----------


def _every_layer_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), BatchNorm(6, eps=1e-3, momentum=0.3),
                         GroupNorm(6, groups=3, eps=1e-4), LayerNorm(6, eps=2e-5),
                         InstanceNorm(6, eps=3e-5), FastMaxPool2d(2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3))


def test_fold_for_cohort_swaps_layer_types_and_keeps_everything_else():
    model = _every_layer_net().eval()
    model[2].train()  # modes are per layer: kept as they are
    folded = fold_for_cohort(model)
    assert [type(m) for m in folded] == [nn.Conv2d, FoldedBatchNorm, FoldedGroupNorm,
                                         FoldedLayerNorm, FoldedInstanceNorm, FoldedMaxPool2d,
                                         nn.ReLU, nn.Flatten, nn.Linear]
    assert [type(m) for m in model][1:6] == [BatchNorm, GroupNorm, LayerNorm, InstanceNorm,
                                             FastMaxPool2d]  # the original is untouched
    for ours, theirs in zip(folded, model):
        assert isinstance(ours, type(theirs))  # norm predicates see the same layers
        assert ours.training == theirs.training
    assert (folded[1].eps, folded[1].momentum) == (1e-3, 0.3)
    assert (folded[2].num_groups, folded[2].eps, folded[3].eps, folded[4].eps) == (3, 1e-4,
                                                                                  2e-5, 3e-5)
    assert folded[5].kernel_size == 2
    ours, theirs = folded.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for name in theirs:  # equal values, no shared storage
        assert torch.equal(ours[name], theirs[name]), name
        assert ours[name].data_ptr() != theirs[name].data_ptr(), name
    assert [type(m) for m in fold_for_cohort(folded)] == [type(m) for m in folded]  # idempotent


def test_fold_for_cohort_leaves_subclasses_alone():
    """A subclass of a plain layer may compute something else: it is never folded."""

    class ScaledGroupNorm(GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    assert type(fold_for_cohort(nn.Sequential(ScaledGroupNorm(6, 3)))[0]) is ScaledGroupNorm


@pytest.mark.parametrize("arch", sorted(a for a in ARCHS if input_kind(a) == "image"))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_folded_nets_compute_what_the_plain_ones_do_outside_vmap(arch, norm):
    """Eager (no vmap), a folded fedsim net is the plain net: bitwise, train and eval."""
    model = build_model(arch, norm, in_channels=1, image_size=16, num_classes=10, width=8,
                        groups=2)
    folded = fold_for_cohort(model)
    assert sum(isinstance(m, tuple(FOLDED.values())) for m in folded.modules()) >= (
        norm in ("bn", "gn", "ln", "in"))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        model.train(train)
        folded.train(train)
        assert torch.equal(folded(x), model(x))
    for (n, a), (_, b) in zip(folded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n  # running statistics updated alike


def test_plain_layers_never_consult_functorch(monkeypatch):
    """The plain layers' forward does not ask which transforms are active; only the folding
    variants do (the fast path is chosen by building the model, not per call)."""
    def refuse():
        raise AssertionError("a plain layer consulted functorch")

    monkeypatch.setattr(batched_module, "folding_vmap", refuse)
    monkeypatch.setattr(compat, "folding_vmap", refuse)
    model = conv_net(REFERENCES["bn"][0], FastMaxPool2d(2))
    for kind in REFERENCES:
        model[1] = REFERENCES[kind][0](6)
        params, buffers = stacked(model)
        x, y = data((5, 2, 8, 8))
        cohort_grads(model)(params, buffers, x, y)  # plain layers under vmap: no probe
        model(x[0])
    with pytest.raises(AssertionError, match="consulted functorch"):
        cohort_grads(fold_for_cohort(model))(*stacked(model), *data((5, 2, 8, 8)))


def test_register_fold_refuses_variants_that_change_state():
    class Wider(GroupNorm):
        def __init__(self, num_channels: int) -> None:
            super().__init__(num_channels, groups=1)

    with pytest.raises(TypeError, match="forward only"):
        batched_module.register_fold(GroupNorm, Wider)
    with pytest.raises(TypeError, match="must subclass"):
        batched_module.register_fold(GroupNorm, FoldedLayerNorm)

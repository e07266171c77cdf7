"""Exact BN moments (fedsim.models.bn_statistics) against float64 references: the moments of
concatenated data, torch's own BatchNorm over the union as one batch, and a train-mode
forward for evaluation with batch statistics."""

import copy

import pytest
import torch
from torch import nn

from fedsim.client.train import eval_batches, evaluate, evaluate_many
from fedsim.models import build_model
from fedsim.models.bn_statistics import (
    accumulate,
    batch_statistics,
    biased,
    bn_layers,
    chunk_moments,
    exact_statistics,
    input_moments,
    pool_moments,
    segment_moments,
    unbiased,
)
from fedsim.models.sgd_step import eval_sums

F64 = 64 * torch.finfo(torch.float64).eps  # a few dozen roundings of float64 sums


def hand_made_clients():
    """Three clients of different sizes whose channels sit at different means and scales
    (label skew seen by a BN layer): the between-client spread is most of the variance."""
    g = torch.Generator().manual_seed(3)
    sizes, shifts, scales = (5, 17, 2), (-3.0, 0.5, 8.0), (0.5, 2.0, 0.1)
    return [(torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * s + m)
            for n, m, s in zip(sizes, shifts, scales)]


def union_moments(xs):
    """Per-channel count, mean, biased and unbiased variance of the concatenation."""
    u = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
    return u.shape[1], u.mean(1), u.var(1, unbiased=False), u.var(1, unbiased=True)


def test_pooled_client_moments_equal_the_moments_of_the_concatenated_data():
    """μ = Σ w_k μ_k, σ² = Σ w_k σ²_k + Σ w_k (μ_k − μ)² with w_k ∝ n_k is the statistics of
    the union, exactly (float64); the plain weighted average of the variances is not."""
    xs = hand_made_clients()
    parts = [chunk_moments(x.unsqueeze(0)) for x in xs]
    counts = torch.cat([p[0] for p in parts])
    means = torch.cat([p[1] for p in parts])
    variances = torch.cat([p[2] for p in parts])
    n, mean, var = pool_moments(counts, means, variances)
    total, ref_mean, ref_var, ref_unbiased = union_moments(xs)
    assert n.item() == total == (5 + 17 + 2) * 16
    torch.testing.assert_close(mean, ref_mean, rtol=F64, atol=F64)
    torch.testing.assert_close(var, ref_var, rtol=F64, atol=F64)
    torch.testing.assert_close(unbiased(n, var), ref_unbiased, rtol=F64, atol=F64)
    torch.testing.assert_close(biased(n, unbiased(n, var)), var, rtol=F64, atol=F64)
    averaged = (counts[:, None] * variances).sum(0) / counts.sum()
    assert (averaged < 0.5 * ref_var).all()  # what FedAvg's mean of variances misses


def test_masked_chunks_and_accumulated_chunks_equal_one_pass_over_each_client():
    """Clients stacked with zero padding: the mask leaves the padding out; chunks of the
    samples pooled one after another give the one-pass moments of each client; so do the
    clients concatenated, each sample tagged with its client."""
    xs = hand_made_clients()
    k, n_max = len(xs), max(len(x) for x in xs)
    stack = torch.zeros(k, n_max, 3, 4, 4, dtype=torch.float64)
    valid = torch.zeros(k, n_max, dtype=torch.bool)
    for i, x in enumerate(xs):
        stack[i, : len(x)] = x
        valid[i, : len(x)] = True
    acc = None
    for start in range(0, n_max, 3):
        acc = accumulate(acc, chunk_moments(stack[:, start:start + 3], valid[:, start:start + 3]))
    for i, x in enumerate(xs):
        n, mean, var_biased, _ = union_moments([x])
        assert acc[0][i].item() == n
        torch.testing.assert_close(acc[1][i], mean, rtol=F64, atol=F64)
        torch.testing.assert_close(acc[2][i], var_biased, rtol=F64, atol=F64)
    segments = torch.cat([torch.full((len(x),), i) for i, x in enumerate(xs)])
    seg = segment_moments(torch.cat(xs), segments, k)
    for a, b in zip(seg, accumulate(None, chunk_moments(stack, valid))):
        torch.testing.assert_close(a, b, rtol=F64, atol=F64)
    empty = chunk_moments(stack[:, :0], valid[:, :0])
    assert empty[0].tolist() == [0.0] * k and not empty[1].any() and not empty[2].any()


class TwiceBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.norm(self.norm(x))


def test_bn_layers_come_in_call_order_and_a_reused_layer_is_refused():
    """In a ResNet block the shortcut's BN is registered after norm2 but its input needs only
    the block's input: call order, not registration order, is what layer-by-layer needs."""
    torch.manual_seed(0)
    resnet = build_model("resnet", "bn", in_channels=1, image_size=8, num_classes=10, width=4)
    names = [n for n, _ in bn_layers(resnet, (1, 8, 8))]
    assert names == ["features.1", "features.4.norm1", "features.4.norm2", "features.5.norm1",
                     "features.5.norm2", "features.5.shortcut.1"]
    gn = build_model("cnn", "gn", in_channels=1, image_size=8, num_classes=10, width=4)
    assert bn_layers(gn, (1, 8, 8)) == []
    with pytest.raises(ValueError, match="called more than once"):
        bn_layers(TwiceBN(), (1, 4, 4))


def torch_reference(model: nn.Module, x: torch.Tensor, names: list[str]) -> nn.Module:
    """A centralized pass with torch's own BatchNorm: layer by layer in call order, only
    that layer in train mode with momentum 1 over all of ``x`` as one batch (its running
    statistics become the batch's mean and unbiased variance), every other in eval mode."""
    ref = copy.deepcopy(model).eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name in names:
            layer = modules[name]
            layer.train()
            saved, layer.momentum = layer.momentum, 1.0
            ref(x)
            layer.momentum = saved
            layer.eval()
    return ref


@pytest.mark.parametrize("arch,norm", [("cnn", "bn"), ("resnet", "bn"), ("mlp", "bn"),
                                       ("cnn", "hybrid")])
def test_exact_statistics_equal_torch_batchnorm_over_all_the_data_as_one_batch(arch, norm):
    """float64: exact_statistics (chunks of 7 samples, two-pass moments pooled) gives every
    BN layer the running statistics torch's BatchNorm stores for the whole data as one
    batch, each layer seeing the earlier layers' new statistics; hybrid layers keep BN's
    running statistics of the same input."""
    torch.manual_seed(1)
    model = build_model(arch, norm, in_channels=1, image_size=8, num_classes=10,
                        width=4).double()
    x = torch.randn(30, 1, 8, 8, dtype=torch.float64) * 2 + 0.5
    layers = bn_layers(model, (1, 8, 8))
    names = [n for n, _ in layers]
    reference = torch_reference(model, x, names)
    counts = exact_statistics(model, x, layers, batch_size=7)
    for name, layer in layers:
        ref = dict(reference.named_modules())[name]
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert counts[name] == 30 if arch == "mlp" else counts[name] % 30 == 0
    assert model.training  # modes are restored


def test_input_moments_of_a_bn_on_the_input_are_the_data_moments():
    layer = nn.BatchNorm2d(3).double()
    model = nn.Sequential(layer, nn.Flatten())
    x = torch.cat(hand_made_clients())
    n, mean, var = input_moments(model, layer, x, batch_size=5)
    total, ref_mean, ref_var, _ = union_moments([x])
    assert n.item() == total
    torch.testing.assert_close(mean, ref_mean, rtol=F64, atol=F64)
    torch.testing.assert_close(var, ref_var, rtol=F64, atol=F64)


@pytest.mark.parametrize("arch,norm", [("cnn", "bn"), ("resnet", "hybrid")])
def test_batch_statistics_evaluation_is_a_train_mode_forward_that_leaves_buffers(arch, norm):
    """model.bn_eval = "batch": each test batch is normalised with its own statistics — the
    logits a train-mode forward gives — and no buffer changes; per split in evaluate_many."""
    torch.manual_seed(2)
    model = build_model(arch, norm, in_channels=1, image_size=8, num_classes=10, width=4)
    with torch.no_grad():  # running statistics far from the data's: the two modes differ
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(0.2)
    x, y = torch.randn(2500, 1, 8, 8), torch.randint(0, 10, (2500,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, acc, n = evaluate(model, x, y, bn_eval="batch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.stop - p.start for p in eval_batches(2500)] == [834, 833, 833]
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        logits = torch.cat([ref(x[p]) for p in eval_batches(2500)])
    ref_loss, ref_hits = eval_sums(logits, y)
    assert n == 2500 and acc == ref_hits.item() / n and loss == ref_loss.item() / n
    with torch.no_grad(), batch_statistics(model):
        assert torch.equal(model(x[:834]), logits[:834])
    running = evaluate(model, x, y)
    assert running[0] != pytest.approx(loss, rel=1e-3)
    splits = [(x[:7], y[:7]), (x[7:600], y[7:600])]
    assert evaluate_many(model, splits, bn_eval="batch") == [
        evaluate(model, sx, sy, bn_eval="batch") for sx, sy in splits]
    with batch_statistics(model):
        assert not model.training and any(m.training for m in model.modules())
    assert not model.training  # evaluate left it in eval mode, as before

"""The sequence models and their norm variants against torch.nn references in float64;
RMSNorm against its definition; causality; the cohort folds of the LSTM and attention."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import fedsim.models.batched as batched_module
from fedsim.models import build_model, make_norm
from fedsim.models.batched import FoldedCausalAttention, FoldedLSTMLayer, fold_for_cohort
from fedsim.models.norm import RMSNorm, is_norm_layer, norm_keys
from fedsim.models.sequence import CausalAttention, CharLSTM, CharTransformer, per_token

B, T, C = 3, 5, 8


def features(seed: int = 0, shape=(B, T, C)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5


def affine(layer: nn.Module) -> nn.Module:
    """Random affine parameters, so the references must match them too."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def test_layernorm_per_token_is_nn_layernorm():
    x = features()
    ours = affine(make_norm("ln", C).double())
    ref = nn.LayerNorm(C).double()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(per_token(ours, x), ref(x), rtol=0, atol=1e-12)


def test_batchnorm_per_token_is_batchnorm1d_over_batch_and_time():
    """BN over B·T per channel: nn.BatchNorm1d on (B, C, T), outputs and running buffers."""
    x = features()
    ours = affine(make_norm("bn", C).double()).train()
    ref = nn.BatchNorm1d(C).double().train()
    ref.load_state_dict(ours.state_dict())
    got = per_token(ours, x)
    want = ref(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=1e-12)
    ours.eval(), ref.eval()
    torch.testing.assert_close(per_token(ours, x), ref(x.transpose(1, 2)).transpose(1, 2),
                               rtol=0, atol=1e-12)


def test_groupnorm_per_token_is_nn_groupnorm_over_each_tokens_channels():
    x = features()
    ours = affine(make_norm("gn", C, groups=4).double())
    ref = nn.GroupNorm(4, C).double()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(per_token(ours, x), ref(x.reshape(B * T, C)).reshape(B, T, C),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(B * T, C), (2, C, 3, 4)])
def test_rmsnorm_is_its_definition(shape):
    """y = x / sqrt(mean(x²) + eps) · w, the mean over every feature of a sample (per token
    on vectors; over (C, H, W) on conv features, as fedsim's LayerNorm)."""
    x = features(shape=shape)
    layer = affine(RMSNorm(C, eps=1e-5).double())
    dims = tuple(range(1, x.dim()))
    w = layer.weight.view(1, C, *([1] * (x.dim() - 2)))
    want = x / torch.sqrt((x * x).mean(dim=dims, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)
    assert set(layer.state_dict()) == {"weight"} and is_norm_layer(layer)
    if x.dim() == 2:  # and torch's own on vectors
        ref = nn.RMSNorm(C, eps=1e-5).double()
        ref.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-12)


def test_image_archs_take_rmsnorm():
    model = build_model("cnn", "rms", num_classes=10, in_channels=1, image_size=8, width=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert sum(isinstance(m, RMSNorm) for m in model.modules()) == 2
    assert all(k.endswith(".weight") for k in norm_keys(model))


NORMS = ["ln", "rms", "bn", "gn", "none", "hybrid", "in"]


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("norm", NORMS)
def test_sequence_models_give_next_character_logits(arch, norm):
    models = []
    for _ in range(2):  # the same seed, the same model
        torch.manual_seed(0)
        models.append(build_model(arch, norm, num_classes=80, vocab_size=80, seq_len=12,
                                  width=16, layers=2))
    model, again = models
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    x = torch.randint(0, 80, (4, 12))
    assert model(x).shape == (4, 80)
    with pytest.raises(ValueError, match="integer character ids"):
        model(torch.randn(4, 12))


def test_lstm_with_no_norm_is_leafs_stacked_lstm():
    """CharLSTM without norm layers: nn.LSTM(num_layers=2) on the embedding, last step."""
    torch.manual_seed(0)
    model = build_model("lstm", "none", num_classes=80, vocab_size=80, seq_len=T, width=C,
                        layers=2).double()
    assert isinstance(model, CharLSTM)
    ref = nn.LSTM(8, C, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for layer, lstm in enumerate(model.lstms):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{layer}").copy_(getattr(lstm, f"{name}_l0"))
    x = torch.randint(0, 80, (B, T))
    want = model.head(ref(model.embed(x))[0][:, -1])
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)


def test_transformer_is_causal_with_per_token_norms():
    """With per-token norms, changing the last character changes no earlier position's
    features; BN's training statistics over batch and time do leak it backwards."""
    def hidden(norm: str, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model("transformer", norm, num_classes=80, vocab_size=80, seq_len=T,
                            width=16, layers=2).double().train()
        assert isinstance(model, CharTransformer)
        h = model.embed(x) + model.position
        for block in model.blocks:
            h = block(h)
        return h

    x = torch.randint(0, 80, (B, T))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 80
    for norm in ("ln", "rms", "gn"):
        torch.testing.assert_close(hidden(norm, x)[:, :-1], hidden(norm, y)[:, :-1],
                                   rtol=0, atol=1e-12)
    assert not torch.allclose(hidden("bn", x)[:, :-1], hidden("bn", y)[:, :-1])


@pytest.mark.parametrize("path", ["fused per client", "unrolled"])
def test_folded_lstm_under_vmap_is_nn_lstm_per_client(path, monkeypatch):
    """Under a cohort's vmap each client's weights go through the fused kernel; under other
    transforms (here: folding switched off) the recurrence runs in ordinary ops."""
    if path == "unrolled":
        monkeypatch.setattr(batched_module, "folding_vmap", lambda: None)
    torch.manual_seed(0)
    layer = FoldedLSTMLayer(6, 10).double()
    k = 3
    params = {n: p.detach() + 0.1 * torch.randn(k, *p.shape, dtype=torch.float64)
              for n, p in layer.named_parameters()}
    x = torch.randn(k, B, T, 6, dtype=torch.float64)
    got = vmap(lambda p, xb: functional_call(layer, p, (xb,)))(params, x)
    for i in range(k):
        want = functional_call(layer, {n: p[i] for n, p in params.items()}, (x[i],))
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)


def test_folded_attention_under_vmap_is_attention_per_client():
    q, kk, v = (torch.randn(4, 2, 2, T, 8, dtype=torch.float64) for _ in range(3))
    got = vmap(FoldedCausalAttention())(q, kk, v)
    for i in range(4):
        torch.testing.assert_close(got[i], CausalAttention()(q[i], kk[i], v[i]),
                                   rtol=0, atol=1e-12)


def test_the_cohort_copy_folds_the_recurrence_and_the_attention():
    for arch, kind in (("lstm", FoldedLSTMLayer), ("transformer", FoldedCausalAttention)):
        model = build_model(arch, "ln", num_classes=80, vocab_size=80, seq_len=T, width=16)
        assert any(type(m) is kind for m in fold_for_cohort(model).modules())


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("norm", ["bn", "ln", "hybrid"])
def test_folded_sequence_nets_are_the_plain_ones_outside_vmap(arch, norm):
    """Eager (no vmap), the cohort copy is the plain net: bitwise, train and eval."""
    torch.manual_seed(0)
    model = build_model(arch, norm, num_classes=80, vocab_size=80, seq_len=T, width=16)
    folded = fold_for_cohort(model)
    x = torch.randint(0, 80, (4, T), generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        model.train(train)
        folded.train(train)
        assert torch.equal(folded(x), model(x))
    for (n, a), (_, b) in zip(folded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n

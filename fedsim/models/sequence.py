"""Next-character models on token windows, every norm layer from ``make_norm``.

Both take ``(B, T)`` int64 character ids and return ``(B, V)`` logits for the character
after the window (LEAF's Shakespeare task, Caldas et al. 2018), from the last position.

Norm layers are the image models' channels-first layers, applied per token: the ``(B, T,
C)`` features are read as ``B·T`` vectors of ``C`` features (:func:`per_token`). So ``ln``
is the transformer's LayerNorm over each token's features, ``rms`` RMSNorm (Zhang &
Sennrich 2019), ``gn`` GroupNorm over channel groups of each token, ``in`` LayerNorm again
(as on the MLP's vectors), and ``bn`` BatchNorm over batch *and* time, PowerNorm's baseline
(Shen et al., ICML 2020), which in training mixes a window's later tokens into the
statistics that normalise its earlier ones; ``hybrid`` mixes the two statistics.

- ``lstm``: LEAF's baseline (an 8-dim embedding, two LSTM layers of 256 units, a linear
  head), ``model.width`` units per layer (narrower by default) and ``model.layers`` layers,
  with a norm layer on every LSTM layer's output.
- ``transformer``: a pre-norm causal transformer (Radford et al. 2019's block layout):
  token and learned position embeddings, ``model.layers`` blocks of causal self-attention
  and a 4x MLP (GELU) each behind a norm layer on its residual branch, a final norm layer
  and a linear head; ``model.width`` features, heads of 16.

In a vectorized cohort (``engine.vectorize``) the LSTM and the attention kernel have no
``vmap`` batching rule (a plain ``vmap`` of ``nn.LSTM`` fails); their folding variants
(:mod:`fedsim.models.batched`) run the same computation on the cohort's stacked tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.models.nets import ARCHS
from fedsim.models.norm import group_count

NormLayer = Callable[[int], nn.Module]

#: LEAF's embedding size for the LSTM
LSTM_EMBEDDING = 8
#: features per attention head
HEAD_DIM = 16


def per_token(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm`` (a channels-first layer) on each token of ``(B, T, C)`` features: the
    tokens are ``B·T`` vectors of ``C`` features."""
    b, t, c = x.shape
    return norm(x.reshape(b * t, c)).reshape(b, t, c)


def _check_tokens(x: Tensor, vocab_size: int, seq_len: int, arch: str) -> None:
    if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{arch} takes (B, T) integer character ids, got "
                         f"{tuple(x.shape)} {x.dtype}")
    if x.shape[1] > seq_len:
        raise ValueError(f"{arch} was built for windows of at most {seq_len} characters, "
                         f"got {x.shape[1]}")


class LSTMLayer(nn.LSTM):
    """One batch-first LSTM layer (``nn.LSTM(input, hidden, batch_first=True)``)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


@ARCHS.register("lstm")
class CharLSTM(nn.Module):
    """LEAF's character LSTM with a norm layer on each LSTM layer's output."""

    input_kind = "tokens"

    def __init__(self, *, vocab_size: int, seq_len: int, num_classes: int, width: int,
                 layers: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.embed = nn.Embedding(vocab_size, LSTM_EMBEDDING)
        sizes = [LSTM_EMBEDDING] + [width] * layers
        self.lstms = nn.ModuleList(LSTMLayer(a, b) for a, b in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(norm_layer(width) for _ in range(layers))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.vocab_size, self.seq_len, "lstm")
        h = self.embed(x)
        for lstm, norm in zip(self.lstms, self.norms):
            h = per_token(norm, lstm(h))
        return self.head(h[:, -1])


class CausalAttention(nn.Module):
    """Scaled dot-product attention of ``(B, H, T, D)`` queries, keys and values with a
    causal mask (``F.scaled_dot_product_attention(..., is_causal=True)``); no parameters."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = norm_layer(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attention = CausalAttention()
        self.proj = nn.Linear(width, width)
        self.norm2 = norm_layer(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (self.qkv(per_token(self.norm1, x))
                   .view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4))
        attended = self.attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attended)
        return x + self.mlp(per_token(self.norm2, x))


@ARCHS.register("transformer")
class CharTransformer(nn.Module):
    """A small pre-norm causal transformer for next-character prediction."""

    input_kind = "tokens"

    def __init__(self, *, vocab_size: int, seq_len: int, num_classes: int, width: int,
                 layers: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        heads = group_count(width, max(1, width // HEAD_DIM))
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's embedding scale
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, norm_layer) for _ in range(layers))
        self.norm = norm_layer(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.vocab_size, self.seq_len, "transformer")
        h = self.embed(x) + self.position[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(per_token(self.norm, h)[:, -1])


__all__ = ["HEAD_DIM", "LSTM_EMBEDDING", "Block", "CausalAttention", "CharLSTM",
           "CharTransformer", "LSTMLayer", "per_token"]

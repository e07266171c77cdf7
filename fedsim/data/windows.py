"""Token windows as views: the samples of a text are its ``seq_len``-long windows, stored once.

A text of ``L`` token ids has ``L - T`` next-token samples: window ``i`` is
``text[i:i + T]``, its target ``text[i + T]``. Copied out, the windows would take ``T``
times the text's memory (80x for LEAF's Shakespeare), so a client's inputs are a strided
view of its text instead: shape ``(L - T, T)``, strides ``(1, 1)``. Indexing a batch out of
it (``x[idx]``) copies only that batch.

Whoever moves or stacks data keeps the view a view: :func:`to_device` moves the text and
rebuilds the view, :func:`stack_padded` stacks several clients' texts and returns one
``(K, n, T)`` view. Everything else treats the view as an ordinary ``(N, T)`` tensor.
"""

from __future__ import annotations

import torch


def windows(text: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a 1-d token tensor: every window of ``seq_len`` tokens (a view of
    ``text``, shape ``(len(text) - seq_len, seq_len)``) and the token after each (a view)."""
    if text.dim() != 1:
        raise ValueError(f"error: windows() takes a 1-d tensor of token ids, got shape "
                         f"{tuple(text.shape)}")
    if seq_len < 1:
        raise ValueError(f"error: windows() needs seq_len >= 1, got {seq_len}")
    text = text.contiguous()
    n = max(0, len(text) - seq_len)
    x = text.as_strided((n, seq_len), (1, 1), text.storage_offset())
    return x, text[seq_len:seq_len + n]


def is_window_view(x: torch.Tensor) -> bool:
    """Whether ``x`` is a :func:`windows` view: 2-d, not empty, with strides ``(1, 1)``, so
    its rows are consecutive windows of one run of tokens (and share their memory)."""
    return x.dim() == 2 and x.numel() > 0 and x.stride() == (1, 1)


def window_text(x: torch.Tensor) -> torch.Tensor:
    """The run of tokens a :func:`windows` view covers (a 1-d view of ``N + T - 1``
    tokens)."""
    n, t = x.shape
    return x.as_strided((n + t - 1,), (1,), x.storage_offset())


def to_device(x: torch.Tensor, device: torch.device, copy: bool = True) -> torch.Tensor:
    """``x`` on ``device``; a window view moves as its text and stays a view there (not
    ``T`` times the memory, as ``x.to(device)`` would make it)."""
    if is_window_view(x):
        text = window_text(x).to(device, copy=copy)
        return text.as_strided(tuple(x.shape), (1, 1), text.storage_offset())
    return x.to(device, copy=copy)


def stack_padded(xs: list[torch.Tensor], n_max: int, device: torch.device
                 ) -> torch.Tensor | None:
    """``(K, n_max, T)`` holding each of ``xs``' windows at rows ``[0, len)``, as one view
    of the stacked, zero-padded texts (the rows after a client's windows are padding: its
    last characters, then zeros; batches never index them); None unless every tensor of
    ``xs`` is a window view with the same ``T``."""
    if not xs or not all(is_window_view(x) for x in xs) or len({x.shape[1] for x in xs}) > 1:
        return None
    t = xs[0].shape[1]
    width = n_max + t - 1
    texts = torch.zeros((len(xs), width), dtype=xs[0].dtype, device=device)
    for i, x in enumerate(xs):
        text = window_text(x)
        texts[i, : len(text)] = text.to(device)
    return texts.as_strided((len(xs), n_max, t), (width, 1, 1))


__all__ = ["is_window_view", "stack_padded", "to_device", "window_text", "windows"]

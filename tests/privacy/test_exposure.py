"""Canary exposure (Carlini et al. 2019) against a hand computation, the sampled estimate
and its skew-normal extrapolation."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from fedsim.data.shakespeare import VOCAB, encode
from fedsim.privacy.exposure import (
    all_log_perplexities,
    exposure,
    fitted_exposure,
    log_perplexities,
    rank_of,
    sampled_exposure,
)

DIGITS = encode("0123456789").astype(np.int64)
SPACE = VOCAB.index(" ")
CONTEXT = encode("\nn ").astype(np.int64)


class LastCharacter(nn.Module):
    """Next-character logits that depend on the last character only: after a space, "3" is
    4x as likely as any other digit; after "3", "7" is; after anything else the ten digits
    are equally likely. Non-digits never come (logit -inf), so the sums are exact."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.full((80, 80), -math.inf, dtype=torch.float64)
        table[:, DIGITS] = 0.0
        table[SPACE, DIGITS[3]] = math.log(4)
        table[DIGITS[3], DIGITS[7]] = math.log(4)
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, -1]]


def hand_px(secret: str) -> float:
    """Px in bits by hand: -log2 of each digit's probability (4/13 or 1/13 after a space or
    "3", 1/10 otherwise)."""
    bits, last = 0.0, " "
    for d in secret:
        if last in " 3":
            favoured = "3" if last == " " else "7"
            bits += math.log2(13 / 4) if d == favoured else math.log2(13)
        else:
            bits += math.log2(10)
        last = d
    return bits


@pytest.mark.parametrize("seq_len", [3, 8])  # the window cuts the context, or pads it
def test_every_candidates_log_perplexity_and_exposure_by_hand(seq_len):
    px = all_log_perplexities(LastCharacter(), CONTEXT, DIGITS, 2, seq_len, SPACE)
    assert px.shape == (100,)
    want = np.array([hand_px(f"{i:02d}") for i in range(100)])
    np.testing.assert_allclose(px, want, rtol=0, atol=1e-12)
    # "37" is the likeliest: rank 1, exposure log2 100; "35" is beaten by "37" only; "12" by
    # "37" and the nine other "3x"
    assert rank_of(px[37], px) == 1 and exposure(px[37], px) == pytest.approx(math.log2(100))
    assert exposure(px[35], px) == pytest.approx(math.log2(100) - 1)
    assert rank_of(px[12], px) == 11
    assert exposure(px[12], px) == pytest.approx(math.log2(100) - math.log2(11))
    some = np.array([[3, 7], [1, 2], [0, 0]])
    np.testing.assert_allclose(
        log_perplexities(LastCharacter(), CONTEXT, DIGITS, some, seq_len, SPACE),
        px[[37, 12, 0]], rtol=0, atol=1e-12)


def test_three_digits_walk_the_tree_in_numeric_order():
    px = all_log_perplexities(LastCharacter(), CONTEXT, DIGITS, 3, 6, SPACE)
    np.testing.assert_allclose(px, [hand_px(f"{i:03d}") for i in range(1000)],
                               rtol=0, atol=1e-12)


def test_sampled_exposure_estimates_the_rank_from_the_sample():
    # 2 of 4 sampled candidates are less perplexing than the canary: rank 1 + 0.5 * 100
    got = sampled_exposure(5.0, np.array([1.0, 2.0, 6.0, 7.0]), 101)
    assert got == pytest.approx(math.log2(101) - math.log2(51))
    assert sampled_exposure(0.5, np.array([1.0, 2.0]), 1000) == pytest.approx(math.log2(1000))


def test_fitted_exposure_is_the_tail_of_a_skew_normal_fit():
    sample = np.random.default_rng(0).normal(20.0, 2.0, size=20_000)
    got = fitted_exposure(14.0, sample, 10**9)  # three standard deviations below
    assert got == pytest.approx(-math.log2(stats.norm.cdf(-3.0)), abs=0.3)
    assert fitted_exposure(40.0, sample, 10**9) == pytest.approx(0.0, abs=1e-6)
    assert fitted_exposure(-1e3, sample, 1000) == pytest.approx(math.log2(1000))

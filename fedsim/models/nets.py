"""Small image classifiers whose every norm layer comes from ``make_norm``, and the model
factory of every arch (the sequence models live in :mod:`fedsim.models.sequence`).

Sized for 8×8 digits, 28×28 (Fashion-)MNIST and 32×32 CIFAR-10 on a CPU. Each arch takes a
``norm_layer`` (channels → module) and never looks at which norm it is; the final
``nn.Linear`` is ``model.head`` in every arch, for strategies that keep the classifier local.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn

from fedsim.models.norm import NORMS, make_norm
from fedsim.models.pool import FastMaxPool2d
from fedsim.registry import Registry

NormLayer = Callable[[int], nn.Module]

ARCHS: Registry[Callable[..., nn.Module]] = Registry("arch")


def build_model(
    arch: str,
    norm: str,
    *,
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 8,
    vocab_size: int = 0,
    seq_len: int = 0,
    width: int = 32,
    groups: int = 8,
    hybrid_init: float = 0.0,
    layers: int = 2,
) -> nn.Module:
    """Build ``arch`` with ``norm`` layers.

    Image archs (:func:`input_kind` ``"image"``) take ``in_channels``×``image_size``²
    inputs; token archs (``"tokens"``, :mod:`fedsim.models.sequence`) take windows of
    ``seq_len`` ids below ``vocab_size`` and have ``layers`` layers. ``groups`` goes to
    GroupNorm, ``hybrid_init`` is HybridNorm's initial ``theta``; each norm kind ignores the
    settings it does not use. Weights use PyTorch's default initialization (the sequence
    models' embeddings their own), so ``torch.manual_seed`` before the call fixes them.
    """
    ctor = ARCHS.get(arch, key="model.arch")
    NORMS.get(norm, key="model.norm")  # fail on a bad name even before any layer is built
    norm_layer = functools.partial(make_norm, norm, groups=groups, theta_init=hybrid_init)
    if input_kind(arch) == "tokens":
        if vocab_size < 1 or seq_len < 1:
            raise ValueError(f"model.arch = {arch!r} reads token windows: build_model needs "
                             f"vocab_size >= 1 and seq_len >= 1, got {vocab_size}, {seq_len}")
        return ctor(vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes,
                    width=width, layers=layers, norm_layer=norm_layer)
    return ctor(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        width=width,
        norm_layer=norm_layer,
    )


def input_kind(arch: str) -> str:
    """What ``arch`` reads: ``"image"`` (float ``(N, C, H, W)``; a user's arch without an
    ``input_kind`` attribute too) or ``"tokens"`` (int64 ``(N, T)`` ids)."""
    return getattr(ARCHS.get(arch, key="model.arch"), "input_kind", "image")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def _stem_pool(image_size: int) -> nn.Module:
    """Halve 28×28 / 32×32 inputs right after the first layer; keep 8×8 at full resolution."""
    return FastMaxPool2d(2) if image_size >= 16 else nn.Identity()


@ARCHS.register("cnn")
class ConvNet(nn.Module):
    """Two conv–norm–ReLU stages with max pooling, a 2×2 average pool and a linear head.

    Each stage pools before its ReLU: max pooling and ReLU commute exactly (values and
    gradients, ties included), and the ReLU then runs on a quarter of the elements.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv3x3(in_channels, width),
            norm_layer(width),
            _stem_pool(image_size),
            nn.ReLU(),
            _conv3x3(width, 2 * width),
            norm_layer(2 * width),
            FastMaxPool2d(2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),  # keeps coarse layout, makes the head size-independent
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 conv–norm layers with an identity (or 1×1 conv–norm) shortcut (He et al. 2016)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.norm1 = norm_layer(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = norm_layer(out_channels)
        self.relu = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                norm_layer(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@ARCHS.register("resnet")
class ResNet(nn.Module):
    """A small ResNet: conv stem, one block at ``width``, one stride-2 block at 2·``width``."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv3x3(in_channels, width),
            norm_layer(width),
            nn.ReLU(),
            _stem_pool(image_size),
            BasicBlock(width, width, 1, norm_layer),
            BasicBlock(width, 2 * width, 2, norm_layer),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@ARCHS.register("mlp")
class MLP(nn.Module):
    """Two hidden layers of ``width`` units, each Linear–norm–ReLU, on flattened pixels."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, width),
            norm_layer(width),
            nn.ReLU(),
            nn.Linear(width, width),
            norm_layer(width),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


__all__ = ["ARCHS", "MLP", "BasicBlock", "ConvNet", "ResNet", "build_model", "input_kind"]

"""The four-block convolutional backbone shared by the few-shot papers (Vinyals et al. 2016).

Each block is conv 3x3 -> batch norm -> ReLU -> 2x2 max-pool (``pool="max"``, Vinyals, Snell) or a
stride-2 conv without pooling (``pool="stride"``, Finn et al. 2017's Omniglot network). A 28x28
Omniglot image leaves as a 64-d vector; an 84x84 miniImageNet image as 1600-d.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int, pool: str = "max") -> nn.Sequential:
    """conv 3x3 (stride 2 when ``pool="stride"``) -> BN -> ReLU [-> max-pool 2].

    The max-pool runs before the ReLU: max and ReLU commute exactly (ReLU is monotone), in value
    and in gradient wherever the maximum is unique, and the ReLU and its backward then touch a
    quarter of the elements (benchmarks/RESULTS.md)."""
    if pool not in ("max", "stride"):
        raise ValueError(f"pool={pool!r}: use 'max' or 'stride'")
    stride = 2 if pool == "stride" else 1
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels),
    ]
    if pool == "max":
        layers.append(nn.MaxPool2d(2))  # = relu-then-pool, see above
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def feature_side(image_size: int, pool: str) -> int:
    """Side of Conv4's last feature map: each block halves, rounding up for a stride-2 conv
    (padding 1) and down for a 2x2 max-pool."""
    side = image_size
    for _ in range(4):
        side = (side + 1) // 2 if pool == "stride" else side // 2
    return side


class Conv4(nn.Module):
    """Four conv blocks and a flatten: ``(B, C, H, W) -> (B, features)``.

    Args:
        in_channels: 1 for Omniglot, 3 for miniImageNet.
        hidden: filters per block (64 in Snell et al.; 32 in Ravi & Larochelle for miniImageNet).
        pool: ``"max"`` or ``"stride"`` (see the module docstring).
        pooling: ``"flatten"`` (the papers': every position of the last feature map its own
            features) or ``"mean"`` (global average pooling: ``hidden`` features at any input
            size). The same at 28x28, where the last map is 1x1.
    """

    def __init__(
        self, in_channels: int = 1, hidden: int = 64, pool: str = "max", pooling: str = "flatten"
    ) -> None:
        super().__init__()
        check_pooling(pooling)
        self.pooling = pooling
        self.blocks = nn.Sequential(
            conv_block(in_channels, hidden, pool),
            conv_block(hidden, hidden, pool),
            conv_block(hidden, hidden, pool),
            conv_block(hidden, hidden, pool),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return readout(self.blocks(x), self.pooling)


def check_pooling(pooling: str) -> None:
    if pooling not in ("flatten", "mean"):
        raise ValueError(f"pooling={pooling!r}: use 'flatten' or 'mean'")


def readout(features: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, C, h, w) -> (B, C*h*w)`` (``"flatten"``) or ``(B, C)`` (``"mean"`` over positions)."""
    return features.mean((-2, -1)) if pooling == "mean" else features.flatten(1)

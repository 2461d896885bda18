"""ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019's MetaOptNet widths), the deeper few-shot
backbone: four residual blocks, each three conv 3x3 -> BN -> leaky ReLU (0.1) with a 1x1 conv +
BN shortcut, then a 2x2 max-pool. Widths ``hidden x (1, 2.5, 5, 10)``: 64-160-320-640 at
``hidden=64``. About 36x Conv4's multiply-adds at 28x28, so it is a lever for a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from metalab.nets.conv4 import check_pooling, readout


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(
                    in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False
                ),
                nn.BatchNorm2d(out_channels),
            ]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """``(B, C, H, W) -> (B, features)``: ``10 * hidden`` features with ``pooling="mean"``,
    ``10 * hidden * h * w`` with ``"flatten"`` (``h = w = 1`` at 28x28).

    Args:
        in_channels: 1 for Omniglot, 3 for miniImageNet.
        hidden: the first block's width; the others are 2.5x, 5x and 10x.
        pooling: ``"flatten"`` or ``"mean"`` (see :class:`~metalab.nets.conv4.Conv4`).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, pooling: str = "mean") -> None:
        super().__init__()
        check_pooling(pooling)
        self.pooling = pooling
        widths = [hidden, int(2.5 * hidden), 5 * hidden, 10 * hidden]
        blocks, previous = [], in_channels
        for width in widths:
            blocks.append(ResidualBlock(previous, width))
            previous = width
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return readout(self.blocks(x), self.pooling)

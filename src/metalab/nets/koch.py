"""Koch, Zemel & Salakhutdinov 2015's verification network (Fig. 4) and its initialisation.

One twin of the siamese network of :mod:`metalab.methods.siamese`: 105x105 images in, a 4096-d
sigmoid embedding out.
"""

from __future__ import annotations

import torch
from torch import nn

from metalab.errors import ConfigError


def koch_feature_map(image_size: int) -> int:
    """Side of the last conv layer's map for a square input: 105 -> 6 (Fig. 4)."""
    side = image_size
    for kernel, pool in ((10, True), (7, True), (4, True), (4, False)):
        side = side - kernel + 1
        side = side // 2 if pool else side
    return side


class KochNet(nn.Module):
    """Koch et al.'s best verification network (Fig. 4): ``(B, 1, 105, 105) -> (B, 4096)``.

    conv 64@10x10 -> ReLU -> max-pool 2 -> 128@7x7 -> ReLU -> pool -> 128@4x4 -> ReLU -> pool ->
    256@4x4 -> ReLU -> flatten (256·6·6 = 9216) -> FC 4096 -> sigmoid. Stride 1, no padding.
    """

    def __init__(self, image_size: int = 105, features: int = 4096) -> None:
        super().__init__()
        side = koch_feature_map(image_size)
        if side < 1:
            raise ConfigError(
                f"image_size={image_size} is too small for the koch net (it needs 105x105 "
                "images): use --image-size 105, or net='conv4' for 28x28"
            )
        self.conv = nn.Sequential(
            nn.Conv2d(1, 64, 10),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 7),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 4),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(256 * side * side, features)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                koch_init(layer, weight_std=1e-2)
        koch_init(self.fc, weight_std=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.conv(x).flatten(1)))


def koch_init(layer: nn.Conv2d | nn.Linear, weight_std: float) -> None:
    """Koch's init: weights N(0, 1e-2) (conv) or N(0, 0.2) (fully connected), biases N(0.5, 1e-2)."""
    nn.init.normal_(layer.weight, 0.0, weight_std)
    nn.init.normal_(layer.bias, 0.5, 1e-2)

"""The image embedding of Garcia & Bruna 2018's Omniglot model (vgsatorras/few-shot-gnn,
``EmbeddingOmniglot``): the CNN whose outputs become the nodes of :mod:`metalab.methods.gnn`.
"""

from __future__ import annotations

import torch
from torch import nn

from metalab.errors import ConfigError


class GNNEmbedding(nn.Module):
    """Their Omniglot CNN: four 3x3 convs of 64 filters, each + BN + leaky ReLU (0.1), max-pooled
    after the first two, unpadded in the last two (28 -> 14 -> 7 -> 5 -> 3); then FC -> ``out``
    + BN + leaky ReLU. ``(B, 1, H, W) -> (B, out)``."""

    def __init__(self, image_size: int, out: int, filters: int = 64) -> None:
        super().__init__()
        side = image_size // 4 - 4
        if side < 1:
            raise ConfigError(f"image_size={image_size} is too small for the GNN's CNN: use 20+")

        def block(c_in: int, padding: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(c_in, filters, 3, padding=padding, bias=False)]
            layers.append(nn.BatchNorm2d(filters))
            if pool:
                layers.append(nn.MaxPool2d(2))  # before the leaky ReLU, as in their code
            return [*layers, nn.LeakyReLU(0.1, inplace=True)]

        self.features = nn.Sequential(
            *block(1, 1, True), *block(filters, 1, True), *block(filters, 0, False),
            *block(filters, 0, False), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Sequential(
            nn.Linear(filters * side * side, out, bias=False), nn.BatchNorm1d(out), nn.LeakyReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

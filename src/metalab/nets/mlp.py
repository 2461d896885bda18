"""A fully connected ReLU network: Finn et al. 2017's sinusoid regressor is ``MLP((1, 40, 40, 1))``."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear layers of the given widths with ReLU between them (none after the last).

    Args:
        sizes: input width, hidden widths, output width, e.g. ``(1, 40, 40, 1)``.
    """

    def __init__(self, sizes: tuple[int, ...] = (1, 40, 40, 1)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes={sizes}: give at least an input and an output width")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(n_in, n_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, sizes[0]) -> (B, sizes[-1])``."""
        return self.layers(x)

"""Finn et al. 2017's MAML classifiers: :class:`~metalab.nets.conv4.Conv4` and a linear layer to
``ways`` logits, with batch norm on batch statistics only.

MAML normalises with the statistics of the batch at hand, at training and at test time alike (a
task's support or query set), so the batch norms keep no running statistics. That also keeps the
network free of buffers that ``functional_call`` under ``vmap`` would have to update in place.

Omniglot (``pool="stride"``): stride-2 convolutions take 28x28 to 14, 7, 4 and 2, and the 2x2 map
is averaged to ``hidden`` features, as in Finn's code (``maml.py``, ``forward_conv``:
``tf.reduce_mean(hidden4, [1, 2])``; flattening would give ``hidden * 4`` = 256). miniImageNet
(``pool="max"``): max-pooling takes 84x84 to 42, 21, 10 and 5, and the map is flattened to
``hidden * 25`` features (800 for Finn's 32 filters).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import replace_all_batch_norm_modules_

from metalab.nets.conv4 import Conv4, feature_side


class Conv4Classifier(nn.Module):
    """``(B, C, H, W) -> (B, ways)`` logits.

    Args:
        ways: classes per task (N).
        in_channels: 1 for Omniglot, 3 for miniImageNet.
        hidden: filters per block (64 for Omniglot, 32 for miniImageNet in Finn et al.).
        pool: ``"stride"`` (Omniglot: average the last map) or ``"max"`` (miniImageNet: flatten).
        image_size: input side, which sets the linear layer's width when ``pool="max"``.
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        hidden: int = 64,
        pool: str = "stride",
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.features = replace_all_batch_norm_modules_(Conv4(in_channels, hidden, pool))
        width = hidden if pool == "stride" else hidden * feature_side(image_size, pool) ** 2
        self.head = nn.Linear(width, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features.blocks(x)  # (B, hidden, side, side)
        features = maps.mean((2, 3)) if self.pool == "stride" else maps.flatten(1)
        return self.head(features)

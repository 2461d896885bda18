"""Prototypical Networks — Snell, Swersky & Zemel, NIPS 2017.

A class is its prototype, the mean embedding of its support examples (Eq. 1); a query is classified
by a softmax over negative squared Euclidean distances to the prototypes (Eq. 2), and training
minimises the negative log-probability of the true class on episodes with more ways than at test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalab.arithmetic import BF16, CHANNELS_LAST, Switch, autocast, images
from metalab.methods.base import Method, MethodConfig
from metalab.nets.conv4 import Conv4
from metalab.tasks.episodes import Episode


@dataclass
class ProtoNetConfig(MethodConfig):
    hidden: int = 64  # Conv4 filters
    # Speed switches, auto | on | off; auto is decided by timing on the run's first episode
    # (metalab.arithmetic), never trying bf16 where the device has no native bf16 kernels.
    bf16: str = "auto"  # auto | on | off: bfloat16 autocast of the embedding (same accuracy)
    channels_last: str = "auto"  # auto | on | off: channels-last activations and weights


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of support embeddings: ``(n, d), (n,) -> (ways, d)``.  # Eq. 1"""
    one_hot = F.one_hot(labels, ways).to(embeddings.dtype)  # (n, ways)
    return (one_hot.T @ embeddings) / one_hot.sum(0, keepdim=True).T


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(..., n, d), (..., m, d) -> (..., n, m)`` squared distances, as one (batched) GEMM."""
    return (
        (a * a).sum(-1, keepdim=True) - 2 * a @ b.transpose(-1, -2) + (b * b).sum(-1)[..., None, :]
    )


_PAPER = dict(
    ways=60, queries=5, eval_ways=5, episodes=200_000, lr_decay_every=2000, val_every=1000
)
_CPU = dict(
    ways=60,
    shots=1,
    queries=5,
    eval_ways=20,
    eval_shots=1,
    episodes=10_000,
    lr_decay_every=2000,
    val_every=1000,
)


class ProtoNet(Method):
    """Conv4 embedding + nearest prototype under squared Euclidean distance."""

    name = "protonet"
    Config = ProtoNetConfig
    recipes = {
        # Snell et al. 2017 on Omniglot (Vinyals split): 60-way training, shots matched to test,
        # 5 queries, Adam 1e-3 halved every 2000 episodes; best.pt by validation (early stopping).
        "omniglot": ProtoNetConfig(**_PAPER, shots=5, eval_shots=5),
        "omniglot-1shot": ProtoNetConfig(**_PAPER, shots=1, eval_shots=1),
        # Ours: the paper's episodes and schedule cut to 10,000 episodes; about 17 minutes on a
        # 2-core CPU with native bf16 (benchmarks/RESULTS.md).
        "omniglot-cpu": ProtoNetConfig(**_CPU),
        # Lake's protocol: learn from the 30 background alphabets only (five held out for
        # validation), for his 20 one-shot runs; also the quickstart (with a few minutes' budget).
        "lake": ProtoNetConfig(**_CPU, split="lake"),
    }

    def __init__(self, config: ProtoNetConfig) -> None:
        super().__init__(config)
        self.encoder = Conv4(in_channels=1, hidden=config.hidden)
        self.set_arithmetic()

    def speed_switches(self) -> tuple[Switch, ...]:
        return (BF16, CHANNELS_LAST)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = images(x, self.arithmetic)
        with autocast(x, self.arithmetic):
            z = self.encoder(x)
        return z.float()

    def logits(self, support_x, support_y, query_x) -> torch.Tensor:
        ways = int(support_y.max()) + 1
        z = self.embed(torch.cat([support_x, query_x]))  # one pass: BN sees the whole episode
        protos = prototypes(z[: len(support_x)], support_y, ways)
        return -squared_euclidean(z[len(support_x) :], protos)  # Eq. 2

    def meta_loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(batch.support_x, batch.support_y, batch.query_x)
        loss = F.cross_entropy(logits, batch.query_y)
        acc = (logits.argmax(-1) == batch.query_y).float().mean()
        return loss, {"acc": acc.item()}

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        return self.logits(support_x, support_y, query_x)

"""Prototypical Networks — Snell, Swersky & Zemel, NIPS 2017.

A class is its prototype, the mean embedding of its support examples (Eq. 1); a query is classified
by a softmax over negative squared Euclidean distances to the prototypes (Eq. 2), and training
minimises the negative log-probability of the true class on episodes with more ways than at test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalab.arithmetic import BF16, CHANNELS_LAST, Switch, autocast, images
from metalab.errors import ConfigError
from metalab.methods.base import Method, MethodConfig
from metalab.nets.conv4 import Conv4
from metalab.nets.resnet12 import ResNet12
from metalab.tasks.episodes import Episode
from metalab.tasks.transforms import augment_images

ENCODERS = {"conv4": Conv4, "resnet12": ResNet12}
# Test-time distortions (support_augment, finetune): Koch's affine ones and stroke-width changes,
# each component with probability one half.
TEST_AFFINE, TEST_STROKE = 0.5, 0.5


@dataclass
class ProtoNetConfig(MethodConfig):
    encoder: str = "conv4"  # conv4 | resnet12 (widths hidden x 1, 2.5, 5, 10)
    hidden: int = 64  # Conv4 filters; ResNet-12's first width
    pooling: str = "flatten"  # flatten | mean: the last feature map, flattened or averaged
    # Test time (`metalab eval RUN --test-time NAME=VALUE` changes them on a trained run):
    support_augment: int = 0  # distorted copies of each support image in its prototype
    finetune_steps: int = 0  # SGD steps on the embedding, support set only, before answering
    finetune_lr: float = 0.01  # their step size
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

# The ProtoNet beside ARML's MAML on OUR SUBSTITUTE for Art-Multi, Omni-Art-Multi
# (metalab.data.artmulti; no paper number is comparable): the same episodes as MAML's recipe
# (5-way, K + 15 queries per class, every episode from one sub-dataset) and the same trunk (Conv4,
# 32 filters, max-pool: a 32-d embedding at 28x28), Adam 1e-3, one episode per step.
_ART_MULTI = dict(
    data="omni-art-multi",
    split="art4",
    hidden=32,
    ways=5,
    eval_ways=5,
    queries=15,
    eval_queries=15,
    lr=1e-3,
    lr_decay_every=8000,
    val_episodes=300,
)

# CACTUs-ProtoNets (Hsu, Levine & Finn 2019; kylehkhsu/cactus-protonets scripts/omniglot.sh [R]):
# 20-way 1-shot 15-query training episodes of k-means pseudo-classes (k = 500, P = 100) of an
# unsupervised embedding of the 1100 unrotated training characters (pass --cactus-embedding
# RUN_DIR, e.g. an acai run; tasks.cactus), Conv4-64, Adam 1e-3 halved every 2000 episodes (the
# protonets code: every 20 epochs of 100 episodes), 300 epochs; tested on 5-way 1/5-shot episodes
# of the 423 test characters with 5 queries. A fixed budget and no validation: the paper uses
# validation labels only to monitor. --cactus off trains the same network on the true classes
# (the supervised oracle), --cactus random on random labels (randrand).
_CACTUS = dict(
    split="cactus",
    ways=20,
    shots=1,
    queries=15,
    eval_ways=5,
    eval_shots=1,
    eval_queries=5,
    episodes=30_000,
    lr_decay_every=2000,
    val_every=0,
    cactus="kmeans",
    cactus_clusters=500,
    cactus_partitions=100,
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
        # Issue 13's CPU recipe: Lake's protocol in 30 minutes on a 2-core CPU with native bf16
        # (14,000 episodes; about twice that time without), best.pt chosen by within-alphabet
        # trials on the held-out background alphabets (docs/one-shot.md).
        "lake-cpu": ProtoNetConfig(
            **{**_CPU, "episodes": 14_000},
            split="lake",
            val_protocol="within-alphabet",
        ),
        # Omni-Art-Multi 5-way (settings in _ART_MULTI): 40,000 episodes, Adam 1e-3 halved every
        # 8,000 (omniglot-cpu's schedule, stretched). One thread of a 2-core AMD EPYC: 11 ms an
        # episode with bf16 + channels-last (24 ms without), so 8-16 minutes of CPU time.
        "omni-art-multi-5w1s": ProtoNetConfig(
            **_ART_MULTI, shots=1, eval_shots=1, episodes=40_000, val_every=2000
        ),
        "omni-art-multi-5w5s": ProtoNetConfig(
            **_ART_MULTI, shots=5, eval_shots=5, episodes=40_000, val_every=2000
        ),
        # CACTUs-ProtoNets (settings in _CACTUS); -cpu: a third of the episodes on the schedule
        # cut to match and 20 partitions, CPU_BUDGET in docs/cactus.md.
        "cactus-omniglot": ProtoNetConfig(**_CACTUS),
        "cactus-omniglot-cpu": ProtoNetConfig(
            **{**_CACTUS, "episodes": 10_000, "lr_decay_every": 700, "cactus_partitions": 20}
        ),
        # Ours (the paper has CACTUs-MAML only on MNIST): the MAML script's MNIST tasks (k = 10,
        # P = 100, 10-way 1-shot, 10 queries per class) with ProtoNets' schedule.
        "cactus-mnist": ProtoNetConfig(
            **{
                **_CACTUS,
                "data": "mnist",
                "split": "standard",
                "ways": 10,
                "queries": 10,
                "eval_ways": 10,
                "episodes": 10_000,
                "lr_decay_every": 700,
                "cactus_clusters": 10,
            }
        ),  # fmt: skip
    }

    test_time = ("support_augment", "finetune_steps", "finetune_lr")
    compiled_modules = ("encoder",)  # --compile: the embedding network

    def __init__(self, config: ProtoNetConfig) -> None:
        super().__init__(config)
        if config.encoder not in ENCODERS:
            raise ConfigError(f"encoder={config.encoder!r}: use one of {', '.join(ENCODERS)}")
        if config.pooling not in ("flatten", "mean"):
            raise ConfigError(f"pooling={config.pooling!r}: use flatten or mean")
        self.encoder = ENCODERS[config.encoder](1, config.hidden, pooling=config.pooling)
        self.set_arithmetic()

    def speed_switches(self) -> tuple[Switch, ...]:
        return (BF16, CHANNELS_LAST)

    def embed(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Embeddings ``(B, d)``; ``params``: the encoder's weights to use instead of its own."""
        x = images(x, self.arithmetic)
        with autocast(x, self.arithmetic):
            z = self.encoder(x) if params is None else functional_call(self.encoder, params, (x,))
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

    def protocol(self) -> dict:
        c = self.config
        out = {"support_augment": c.support_augment} if c.support_augment else {}
        if c.finetune_steps:
            out.update(finetune_steps=c.finetune_steps, finetune_lr=c.finetune_lr)
        return out

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        c = self.config
        if not (c.support_augment or c.finetune_steps):
            return self.logits(support_x, support_y, query_x)
        ways = int(support_y.max()) + 1
        generator = torch.Generator(support_x.device).manual_seed(0)  # the same copies every run
        params = None
        if c.finetune_steps:
            params = self.finetune(support_x, support_y, ways, generator)
        if c.support_augment:  # each prototype: the mean of the image and its distorted copies
            copies = support_x.expand(c.support_augment, *support_x.shape)
            copies = augment_images(copies, TEST_AFFINE, TEST_STROKE, generator)
            support_x = torch.cat([support_x, copies.flatten(0, 1)])
            support_y = support_y.repeat(c.support_augment + 1)
        protos = prototypes(self.embed(support_x, params), support_y, ways)
        return -squared_euclidean(self.embed(query_x, params), protos)

    def finetune(
        self, support_x: torch.Tensor, support_y: torch.Tensor, ways: int, generator
    ) -> dict[str, torch.Tensor]:
        """Encoder weights after ``finetune_steps`` SGD steps on the support set alone: distorted
        copies of the support images, classified against the prototypes of the originals, so the
        embedding learns to keep this episode's characters apart under the distortions. The
        queries are not used (not transductive); the model's own weights are untouched."""
        c = self.config
        params = {n: p.detach().clone() for n, p in self.encoder.named_parameters()}
        with torch.enable_grad():
            for _ in range(c.finetune_steps):
                for p in params.values():
                    p.requires_grad_(True)
                copies = augment_images(support_x, TEST_AFFINE, TEST_STROKE, generator)
                protos = prototypes(self.embed(support_x, params), support_y, ways)
                logits = -squared_euclidean(self.embed(copies, params), protos)
                loss = F.cross_entropy(logits, support_y)
                grads = torch.autograd.grad(loss, list(params.values()))
                params = {
                    n: (p - c.finetune_lr * g).detach() for (n, p), g in zip(params.items(), grads)
                }
        return params

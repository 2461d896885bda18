"""A contrastive encoder, SimCLR-style — Chen, Kornblith, Norouzi & Hinton, ICML 2020.

OUR EXTENSION for CACTUs (Hsu et al. 2019), not one of the paper's embeddings (those are ACAI and
BiGAN): a modern unsupervised embedding of the meta-training images, reported on its own row.

Every image of a minibatch is distorted twice (:func:`two_views`); an encoder ``f`` maps each view
to ``h = f(x)`` (the embedding :meth:`SimCLR.encode` returns) and a projection head ``g`` to
``z = g(h)``; the NT-Xent loss (:func:`nt_xent`, the paper's Eq. 1) makes each view pick out its
partner among the ``2N - 1`` other views of the batch by cosine similarity at temperature ``τ``.

Choices (ours, for 28x28 pen drawings on a CPU):

* encoder: Conv4 blocks (conv 3x3, BN, ReLU, max-pool 2) with 32, 64, 128, 256 filters,
  averaged over the last map (1x1 at 28x28): a 256-d embedding, as ACAI's in CACTUs;
* head: Linear-BN-ReLU-Linear to 128-d (the paper's MLP head; the loss is taken on ``z``, the
  embedding is ``h``, before the head, which the paper found better for downstream tasks);
* views (:func:`augment`): a random affine map with every component on (rotation, anisotropic
  scale, shear, translation; it stands in for the paper's random resized crop, the augmentation
  that mattered most), then a stroke-width change and a random erased rectangle (the paper's
  colour distortion has no counterpart in binary drawings). All drawn from torch's global
  generator, part of a training checkpoint;
* τ = 0.5: the paper's value for CIFAR-10 and small batches (its Table 5/B.9: with a few hundred
  images per batch 0.5 beat 0.1, which pays off with batches of thousands);
* Adam 1e-3, no weight decay, in place of LARS (which the paper needs for batches of 4096).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalab.arithmetic import BF16, CHANNELS_LAST, Switch, autocast, images
from metalab.errors import ConfigError
from metalab.methods.embedding import EmbeddingConfig, EmbeddingMethod
from metalab.nets.conv4 import conv_block
from metalab.tasks.images import Images
from metalab.tasks.transforms import affine_distort, stroke_width

VAL_SEED = 7  # the fixed distortions of the validation images


@dataclass
class SimCLRConfig(EmbeddingConfig):
    batch: int = 256  # images per minibatch (2 views each: 2N - 2 negatives per view)
    lr: float = 1e-3
    widths: str = "32,64,128,256"  # filters of the four conv blocks; the last is the embedding size
    projection: int = 128  # output of the projection head (the loss's space)
    temperature: float = 0.5  # tau of NT-Xent
    rotation: float = 15.0  # degrees, each view rotated by U(-rotation, rotation)
    shear: float = 0.3  # U(-shear, shear) in x and in y
    scale_min: float = 0.75  # x and y scaled by U(scale_min, scale_max) each
    scale_max: float = 1.2  # the upper end of that range
    translation: float = 3.0  # pixels (of 28x28), U(-translation, translation) in x and in y
    view_stroke: float = 0.5  # probability of a stroke-width change of a view
    view_erase: float = 0.25  # probability of erasing a random rectangle of a view
    erase_max: float = 0.4  # the largest side of that rectangle, as a fraction of the image side
    episodes: int = 2500  # optimizer steps (minibatches)
    val_every: int = 500
    val_episodes: int = 2000
    # Speed switches, auto | on | off, decided by timing on the run's first batch (as ProtoNet's)
    bf16: str = "auto"  # auto | on | off: bfloat16 autocast of the encoder and head
    channels_last: str = "auto"  # auto | on | off: channels-last activations and weights


_MNIST = dict(data="mnist", split="standard", val_every=0)


def augment(
    x: torch.Tensor, c: SimCLRConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One random view of each image ``(B, C, H, W)`` in [0, 1] (ink > 0 on 0), same shape and
    range: an affine map with every component on, a stroke-width change (probability
    ``c.view_stroke``), an erased rectangle (probability ``c.view_erase``). ``generator``: None, torch's."""
    x = affine_distort(
        x,
        generator,
        p=1.0,
        rotation=c.rotation,
        shear=c.shear,
        scale=(c.scale_min, c.scale_max),
        translation=c.translation,
    )
    if c.view_stroke:
        x = stroke_width(x, generator, p=c.view_stroke)
    if c.view_erase:
        x = erase_rectangles(x, c.view_erase, c.erase_max, generator)
    return x.clamp(0.0, 1.0)


def erase_rectangles(
    x: torch.Tensor, p: float, largest: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """With probability ``p`` per image, a random axis-aligned rectangle (sides
    U(0.1, ``largest``) of the image's) set to background 0 (random erasing, Zhong et al. 2020)."""
    b, _, h, w = x.shape
    kw = dict(device=x.device, dtype=x.dtype)
    on = torch.rand(b, generator=generator, **kw) < p
    sides = 0.1 + (largest - 0.1) * torch.rand(b, 2, generator=generator, **kw)
    corner = (1 - sides) * torch.rand(b, 2, generator=generator, **kw)  # top-left, fractions
    rows = (torch.arange(h, **kw) + 0.5) / h
    cols = (torch.arange(w, **kw) + 0.5) / w
    in_rows = (rows >= corner[:, :1]) & (rows < corner[:, :1] + sides[:, :1])  # (B, H)
    in_cols = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + sides[:, 1:])  # (B, W)
    box = in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None]
    return x.masked_fill(box[:, None], 0.0)


def two_views(
    x: torch.Tensor, c: SimCLRConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Two independent views of each image, stacked ``(2B, C, H, W)``: view ``i`` and view
    ``i + B`` come from image ``i``."""
    return augment(torch.cat([x, x]), c, generator)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, Eq. 1) of ``2N`` projections ``(2N, d)`` whose rows ``i`` and
    ``i + N`` are the two views of one image: the mean over all ``2N`` ordered positive pairs of
    ``-log(exp(s_ij / τ) / Σ_{k≠i} exp(s_ik / τ))``, ``s`` the cosine similarity."""
    n2 = z.shape[0]
    if n2 % 2 or n2 < 4:
        raise ValueError(f"nt_xent needs an even number >= 4 of views, got {n2}")
    z = F.normalize(z, dim=1)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    n = n2 // 2
    partner = torch.cat([torch.arange(n, n2), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


class SimCLR(EmbeddingMethod):
    """Conv encoder + MLP projection head trained with NT-Xent on two views of each image."""

    name = "simclr"
    Config = SimCLRConfig
    recipes = {
        # Ours (see the module docstring): the 22,000 unlabelled images of the CACTUs Omniglot
        # split, 2500 steps of 256 images (about 29 epochs); best.pt by NT-Xent on the 2000 fixed
        # val images. About 12 minutes on one core of a 2-core AVX-512 BF16 CPU (0.28 s a step
        # with bf16 + channels-last, 0.5 s without).
        "omniglot": SimCLRConfig(),
        # MNIST's 60,000 training images (no val part: the final weights), same steps.
        "mnist": SimCLRConfig(**_MNIST),
    }

    def __init__(self, config: SimCLRConfig) -> None:
        super().__init__(config)
        try:
            widths = [int(w) for w in config.widths.split(",")]
        except ValueError:
            widths = []
        if len(widths) != 4 or min(widths) < 1:
            raise ConfigError(
                f"widths={config.widths!r}: give four filter counts, e.g. 64,64,128,256"
            )
        if config.temperature <= 0:
            raise ConfigError(f"temperature={config.temperature}: use a positive temperature")
        if not 0 < config.scale_min <= config.scale_max:
            raise ConfigError("scale_min and scale_max: use 0 < scale_min <= scale_max")
        if config.batch < 2:
            raise ConfigError(f"batch={config.batch}: NT-Xent needs 2 images or more")
        channels = 3 if config.data == "miniimagenet" else 1
        blocks, previous = [], channels
        for width in widths:
            blocks.append(conv_block(previous, width))
            previous = width
        self.encoder = nn.Sequential(*blocks)
        self.embedding_dim = widths[-1]
        self.head = nn.Sequential(
            nn.Linear(widths[-1], widths[-1]),
            nn.BatchNorm1d(widths[-1]),
            nn.ReLU(inplace=True),
            nn.Linear(widths[-1], config.projection),
        )
        self.set_arithmetic()

    def speed_switches(self) -> tuple[Switch, ...]:
        return (BF16, CHANNELS_LAST)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = images(x, self.arithmetic)
        with autocast(x, self.arithmetic):
            h = self.encoder(x).mean((-2, -1))  # global average (the map is 1x1 at 28x28)
        return h.float()

    def project(self, h: torch.Tensor) -> torch.Tensor:
        with autocast(h, self.arithmetic):
            z = self.head(h)
        return z.float()

    def loss_of_views(self, views: torch.Tensor) -> torch.Tensor:
        return nt_xent(self.project(self.encode(views)), self.config.temperature)

    def meta_loss(self, batch: Images) -> tuple[torch.Tensor, dict[str, float]]:
        views = two_views(batch.x, self.config)
        z = self.project(self.encode(views))
        loss = nt_xent(z, self.config.temperature)
        with torch.no_grad():  # how often a view's nearest other view is its partner
            zn = F.normalize(z, dim=1)
            sim = (zn @ zn.T).fill_diagonal_(-2.0)
            n = len(z) // 2
            partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
            acc = (sim.argmax(1) == partner).float().mean()
        return loss, {"acc": acc.item()}

    @torch.no_grad()
    def validation_loss(self, images: Images) -> float:
        """NT-Xent on the fixed validation images, in minibatches of ``batch`` (the training
        loss's scale), each image's two views drawn from a generator seeded with
        :data:`VAL_SEED`: the same views at every validation."""
        x = images.x
        generator = torch.Generator(x.device).manual_seed(VAL_SEED)
        total, count = 0.0, 0
        for start in range(0, len(x), self.config.batch):
            chunk = x[start : start + self.config.batch]
            if len(chunk) < 2:
                break
            views = two_views(chunk, self.config, generator)
            total += float(self.loss_of_views(views)) * len(chunk)
            count += len(chunk)
        return total / count

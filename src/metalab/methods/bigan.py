"""BiGAN — Donahue, Krähenbühl & Darrell, ICLR 2017, "Adversarial feature learning".

A generator ``G`` maps ``z ~ U(-1, 1)^d`` to images; an encoder ``E`` maps images to ``z``; a
discriminator ``D(x, z)`` sees joint pairs and tells real ``(x, E(x))`` from generated
``(G(z), z)``. At the optimum ``E = G⁻¹``, and ``E(x)`` is the embedding (:meth:`BiGAN.encode`);
CACTUs (Hsu et al. 2019) clusters it, its second embedding for Omniglot and MNIST beside ACAI.

Settings we follow: the latent size 200 of CACTUs's BiGAN on Omniglot and MNIST; the uniform prior
and the non-saturating losses of the paper (D: ``-log D(x, E x) - log(1 - D(G z, z))``; G and E:
the same with the labels swapped); Adam at 2e-4 with β1 = 0.5 (the paper's and DCGAN's). The
networks are ours, DCGAN-style for 28x28 and sized for a CPU: ``width`` 32, ``hidden`` 512 (twice
each is 4.5x slower a step). The paper's MNIST networks are fully connected, its ImageNet ones
AlexNet-sized.

* ``G``: z -> FC 512 -> FC 64x7x7 -> deconv 32 (14x14) -> deconv 1 (28x28), sigmoid; BN + ReLU;
* ``E``: x -> conv 32 s2 -> conv 64 s2 -> FC 512 -> FC d -> tanh; BN + leaky ReLU. The tanh
  keeps ``E(x)`` in the prior's support. Measured, 600 steps from the same seed: 1-NN 5-way
  1-shot accuracy of ``E(x)`` on 200 episodes of the test characters 52% with it, 43% with a
  linear output (raw pixels: 43%); the discriminator's accuracy was about 0.98 either way;
* ``D``: x -> conv 32 s2 -> conv 64 s2 -> flattened; z -> FC 512; joined -> FC 512 -> 1 logit;
  leaky ReLU and dropout 0.2, no batch norm (a pair's score depends on that pair alone).

One :meth:`BiGAN.meta_step` is one simultaneous update of both players: a single forward pass, then
the discriminator's loss differentiated into D's parameters only and the G/E loss into G's and E's
only (``torch.autograd.grad`` with those inputs), written to ``.grad`` for the trainer's single
Adam (per parameter, so the same as two optimizers).

Validation (what picks ``best.pt``, lower is better) is the pixel reconstruction error
``mean((G(E(x)) - x)²)`` on the fixed val images: BiGAN never trains it, but ``E`` inverting ``G``
is what the objective aims at, so it falls as the encoder learns to keep what identifies an image
(and rises when the GAN collapses). It is only a monitor: the GAN losses themselves say little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalab.errors import ConfigError
from metalab.methods.embedding import EmbeddingConfig, EmbeddingMethod
from metalab.tasks.images import Images


@dataclass
class BiGANConfig(EmbeddingConfig):
    batch: int = 64  # images per minibatch (and as many generated ones)
    lr: float = 2e-4
    beta1: float = 0.5  # Adam's first beta (DCGAN's 0.5; 0.9 is Adam's default)
    latent: int = 200  # size of z and of the embedding E(x)
    width: int = 32  # filters of the first conv (the second has twice as many)
    hidden: int = 512  # units of the fully connected hidden layers of G, E and D
    dropout: float = 0.2  # in the discriminator's joint layers
    episodes: int = 6000  # optimizer steps (minibatches)
    val_every: int = 1000
    val_episodes: int = 2000


_MNIST = dict(data="mnist", split="standard", val_every=0)


def _flat_side(image_size: int) -> int:
    if image_size % 4:
        raise ConfigError(f"image_size={image_size}: BiGAN's nets need a multiple of 4 (28)")
    return image_size // 4


class Generator(nn.Module):
    def __init__(self, latent: int, width: int, hidden: int, side: int, channels: int) -> None:
        super().__init__()
        self.side, self.width = side, 2 * width
        self.fc = nn.Sequential(
            nn.Linear(latent, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2 * width * side * side),
            nn.BatchNorm1d(2 * width * side * side),
            nn.ReLU(inplace=True),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.width, self.side, self.side)
        return torch.sigmoid(self.deconv(h))


def _image_trunk(channels: int, width: int, batch_norm: bool) -> nn.Sequential:
    """conv 4x4 s2 -> leaky ReLU -> conv 4x4 s2 [-> BN] -> leaky ReLU -> flatten."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 4, 2, 1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, 2 * width, 4, 2, 1),
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(2 * width))
    layers += [nn.LeakyReLU(0.2, inplace=True), nn.Flatten()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, latent: int, width: int, hidden: int, side: int, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _image_trunk(channels, width, batch_norm=True),
            nn.Linear(2 * width * side * side, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, latent),
            nn.Tanh(),  # E(x) in the prior's support (-1, 1)^d
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Discriminator(nn.Module):
    def __init__(
        self, latent: int, width: int, hidden: int, side: int, channels: int, dropout: float
    ) -> None:
        super().__init__()
        self.x_path = _image_trunk(channels, width, batch_norm=False)
        self.z_path = nn.Sequential(nn.Linear(latent, 512), nn.LeakyReLU(0.2, inplace=True))
        self.joint = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * width * side * side + 512, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` that ``(x, z)`` is a real pair ``(x, E(x))``."""
        return self.joint(torch.cat([self.x_path(x), self.z_path(z)], 1)).squeeze(1)


class BiGAN(EmbeddingMethod):
    """Generator, encoder and joint discriminator; the embedding is the encoder's ``E(x)``."""

    name = "bigan"
    Config = BiGANConfig
    recipes = {
        # The CACTUs Omniglot split's 22,000 unlabelled images, 6000 steps of 64 (about 17
        # epochs; the paper trains MNIST for 400): about 10 minutes on one free core of a 2-core
        # CPU (0.09 s a step).
        # best.pt by the reconstruction error of G(E(x)) on the 2000 fixed val images.
        "omniglot": BiGANConfig(),
        # MNIST's 60,000 training images (no val part: the final weights), same steps.
        "mnist": BiGANConfig(**_MNIST),
    }

    def __init__(self, config: BiGANConfig) -> None:
        super().__init__(config)
        if config.latent < 1 or config.width < 1:
            raise ConfigError("latent and width: use positive sizes")
        side = _flat_side(config.image_size)
        channels = 3 if config.data == "miniimagenet" else 1
        sizes = (config.latent, config.width, config.hidden, side, channels)
        self.generator = Generator(*sizes)
        self.encoder = Encoder(*sizes)
        self.discriminator = Discriminator(*sizes, config.dropout)
        self.embedding_dim = config.latent

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.config.lr, betas=(self.config.beta1, 0.999)
        )

    def sample_latent(self, n: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``z ~ U(-1, 1)^latent`` from torch's global generator."""
        return 2 * torch.rand(n, self.config.latent, device=device, dtype=dtype) - 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The discriminator's loss and the generator/encoder's (non-saturating) on a batch of
        real images ``x`` and as many generated ones, from one forward pass; and metrics."""
        b = len(x)
        z = self.sample_latent(b, x.device, x.dtype)
        fake = self.generator(z)
        code = self.encoder(x)
        logits = self.discriminator(torch.cat([x, fake]), torch.cat([code, z]))
        real_logits, fake_logits = logits[:b], logits[b:]
        ones, zeros = torch.ones_like(real_logits), torch.zeros_like(real_logits)
        d_loss = F.binary_cross_entropy_with_logits(
            real_logits, ones
        ) + F.binary_cross_entropy_with_logits(fake_logits, zeros)
        ge_loss = F.binary_cross_entropy_with_logits(
            real_logits, zeros
        ) + F.binary_cross_entropy_with_logits(fake_logits, ones)
        with torch.no_grad():
            d_acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
        metrics = {
            "d_loss": d_loss.item(),
            "ge_loss": ge_loss.item(),
            "d_acc": d_acc.item(),
            "code_abs": code.detach().abs().mean().item(),  # |E(x)|: the prior's is 0.5
        }
        return d_loss, ge_loss, metrics

    def meta_step(self, batch: Images) -> tuple[float, dict[str, float]]:
        d_loss, ge_loss, metrics = self.losses(batch.x)
        d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        ge_params = [
            p for m in (self.generator, self.encoder) for p in m.parameters() if p.requires_grad
        ]
        d_grads = torch.autograd.grad(d_loss, d_params, retain_graph=True)
        ge_grads = torch.autograd.grad(ge_loss, ge_params)
        for p, g in zip(d_params + ge_params, d_grads + ge_grads):
            p.grad = g if p.grad is None else p.grad + g
        return d_loss.item() + ge_loss.item(), metrics

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``G(E(x))``."""
        return self.generator(self.encoder(x))

    @torch.no_grad()
    def validation_loss(self, images: Images) -> float:
        """Mean squared pixel error of ``G(E(x))`` on the fixed validation images."""
        total = 0.0
        for start in range(0, len(images.x), 500):
            x = images.x[start : start + 500]
            total += float(F.mse_loss(self.reconstruct(x), x, reduction="sum"))
        return total / images.x.numel()

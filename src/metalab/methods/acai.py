"""ACAI — Berthelot, Raffel, Roy & Goodfellow, ICLR 2019, "Understanding and improving
interpolation in autoencoders via an adversarial regularizer" (Adversarially Constrained
Autoencoder Interpolation), as the unsupervised embedding of CACTUs (Hsu, Levine & Finn, ICLR 2019), whose
best Omniglot and MNIST tasks come from ACAI's 256-d code.

An autoencoder ``x -> z = f(x) -> x_hat = g(z)`` is trained to reconstruct, and a critic ``d`` (the
encoder's architecture, its output map averaged to a scalar) looks at decoded interpolations
``x_hat_alpha = g(alpha z_1 + (1 - alpha) z_2)`` of two images' codes, ``alpha ~ U[0, 1/2]``
(Section 2), and regresses ``alpha``. The critic minimises (Eq. 1)

    L_d = ||d(x_hat_alpha) - alpha||^2 + ||d(gamma x + (1 - gamma) g(f(x)))||^2

(the second term shows it data, made realistic-but-imperfect by blending each image with its
reconstruction, whose answer is 0, even while reconstructions are poor); the autoencoder minimises
(Eq. 2)

    L_{f,g} = ||x - g(f(x))||^2 + lambda ||d(x_hat_alpha)||^2,

i.e. reconstruct, and make interpolants look like data (alpha 0) to the critic. Every ``||.||^2``
is a mean over the batch and elements, as in the authors' code (github.com/brain-research/acai).
``adv_weight = 0`` (lambda) is the plain autoencoder of CACTUs' ablation: no critic is built.

Networks (the paper's architecture for all its experiments; the authors' code, ``aes.py``): the
encoder is a 1x1 convolution to ``width`` channels, then ``scales`` blocks of two 3x3 convolutions
(``width * 2^i`` channels, leaky ReLU 0.2) each followed by 2x2 average pooling, then a 3x3
convolution (``width * 2^scales``, leaky ReLU) and a linear 3x3 convolution to ``latent_channels``;
the decoder mirrors it with nearest-neighbour upsampling and ends in a linear 3x3 convolution to
the image's channels. Images are mapped to [-1, 1] (the authors' scaling) and padded with
background to a multiple of ``2^scales`` pixels: 28x28 -> 32x32 (the authors' MNIST is 32x32), so
the code is 16 x 4 x 4 = 256 numbers. Losses and ``recon`` are in that frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalab.arithmetic import BF16, CHANNELS_LAST, Switch, autocast, images
from metalab.errors import ConfigError
from metalab.methods.embedding import EmbeddingConfig, EmbeddingMethod
from metalab.tasks.images import Images

SLOPE = 0.2  # leaky ReLU negative slope (tf.nn.leaky_relu, the authors' activation)
VAL_CHUNK = 500  # validation images per forward pass


@dataclass
class ACAIConfig(EmbeddingConfig):
    width: int = 16  # encoder/decoder base channels ("depth" in the ACAI code), doubled per scale
    latent_channels: int = 16  # channels of the code; 16 x 4 x 4 = 256-d for 28x28 images
    scales: int = 3  # 2x2 poolings: a 28x28 image (padded to 32) gives a 4x4 code
    critic_width: int = 16  # the critic's base channels ("advdepth" in the ACAI code)
    adv_weight: float = 0.5  # lambda of Eq. 2; 0 = a plain autoencoder (no critic)
    reg: float = 0.2  # gamma of Eq. 1: real images blended with their reconstructions
    # Speed switches, auto | on | off; auto is decided by timing on the run's first batch
    # (metalab.arithmetic), never trying bf16 where the device has no native bf16 kernels.
    bf16: str = "auto"  # auto | on | off: bfloat16 autocast of the networks
    channels_last: str = "auto"  # auto | on | off: channels-last activations and weights


def _conv(c_in: int, c_out: int, k: int = 3) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    nn.init.xavier_uniform_(conv.weight)  # variance_scaling(1, fan_avg, uniform) in the code
    nn.init.zeros_(conv.bias)
    return conv


def _act() -> nn.Module:
    return nn.LeakyReLU(SLOPE)


class Encoder(nn.Sequential):
    """``(n, C, S, S) -> (n, latent, S / 2^scales, S / 2^scales)``; also the critic's trunk."""

    def __init__(self, channels: int, width: int, latent: int, scales: int) -> None:
        layers: list[nn.Module] = [_conv(channels, width, 1)]
        c = width
        for scale in range(scales):
            layers += [_conv(c, width << scale), _act(), _conv(width << scale, width << scale)]
            layers += [_act(), nn.AvgPool2d(2)]
            c = width << scale
        layers += [_conv(c, width << scales), _act(), _conv(width << scales, latent)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """``(n, latent, s, s) -> (n, C, s * 2^scales, s * 2^scales)``, the encoder mirrored."""

    def __init__(self, channels: int, width: int, latent: int, scales: int) -> None:
        layers: list[nn.Module] = []
        c = latent
        for scale in range(scales - 1, -1, -1):
            layers += [_conv(c, width << scale), _act(), _conv(width << scale, width << scale)]
            layers += [_act(), nn.Upsample(scale_factor=2, mode="nearest")]
            c = width << scale
        layers += [_conv(c, width), _act(), _conv(width, channels)]
        super().__init__(*layers)


class Critic(nn.Module):
    """The encoder's architecture with its output map averaged: one number per image, the
    critic's guess of alpha (0 for real data)."""

    def __init__(self, channels: int, width: int, latent: int, scales: int) -> None:
        super().__init__()
        self.net = Encoder(channels, width, latent, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


# The paper's networks (the authors' 256-d MNIST/Omniglot runs: depth 16, advdepth 16, latent 16,
# scales 3, advweight 0.5, reg 0.2), batch 64.
_NET = dict(width=16, latent_channels=16, scales=3, critic_width=16, adv_weight=0.5, reg=0.2)
# ACAI-lite, for a CPU budget of about 10 minutes (2-core AMD EPYC, one thread, bf16 +
# channels-last chosen by the probe: 142 ms a step alone, 86 ms without the critic): the paper's
# networks and batch, but 3,000 steps instead of 2^24 images (262k steps), so Adam at 1e-3 (halved
# every 1,000 steps) instead of the paper's 1e-4, which is too slow for so few steps: after 600
# steps at a constant rate, validation reconstruction 0.088 at 1e-3 against 0.118 at 1e-4 (1-NN
# 5-way 1-shot on cactus-test 65.3% against 62.3%, 300 episodes); the critic stayed stable.
_LITE = dict(_NET, batch=64, episodes=3000, lr=1e-3, lr_decay_every=1000, lr_decay=0.5)
_MNIST = dict(data="mnist", split="standard", val_every=0)  # MNIST has no val part


class ACAI(EmbeddingMethod):
    """An autoencoder whose decoded latent interpolations are made realistic by a critic."""

    name = "acai"
    Config = ACAIConfig
    recipes = {
        # ACAI-lite on Omniglot's CACTUs split (1100 characters x 20 unrotated drawings): see _LITE;
        # validation (best.pt) is the reconstruction error of 2000 images of the 100 val characters.
        "omniglot": ACAIConfig(**_LITE, val_every=500, val_episodes=2000),
        # The plain-autoencoder ablation (lambda = 0): the same steps, about half the time per step
        # (no critic).
        "omniglot-ae": ACAIConfig(**{**_LITE, "adv_weight": 0.0}, val_every=500, val_episodes=2000),
        # MNIST (60k training images), the same budget; no validation (no val part).
        "mnist": ACAIConfig(**_LITE, **_MNIST),
        "mnist-ae": ACAIConfig(**{**_LITE, "adv_weight": 0.0}, **_MNIST),
        # The paper's schedule, for a GPU: Adam 1e-4, batch 64, 2^24 images = 262,144 steps.
        "omniglot-full": ACAIConfig(
            **_NET, batch=64, episodes=262_144, lr=1e-4, val_every=5000, val_episodes=2000
        ),
        "mnist-full": ACAIConfig(**_NET, **_MNIST, batch=64, episodes=262_144, lr=1e-4),
    }

    def __init__(self, config: ACAIConfig) -> None:
        super().__init__(config)
        c = config
        for what in ("width", "latent_channels", "critic_width"):
            if getattr(c, what) < 1:
                raise ConfigError(f"{what}={getattr(c, what)}: use a positive number of channels")
        if c.scales < 0:
            raise ConfigError(f"scales={c.scales}: use 0 or more")
        if c.adv_weight < 0 or not 0 <= c.reg <= 1:
            raise ConfigError(
                f"adv_weight={c.adv_weight}, reg={c.reg}: use adv_weight >= 0 and 0 <= reg <= 1"
            )
        channels = 3 if c.data == "miniimagenet" else 1
        self.padded = -(-c.image_size // 2**c.scales) * 2**c.scales  # 28 -> 32
        self.embedding_dim = c.latent_channels * (self.padded // 2**c.scales) ** 2
        self.encoder = Encoder(channels, c.width, c.latent_channels, c.scales)
        self.decoder = Decoder(channels, c.width, c.latent_channels, c.scales)
        # The plain autoencoder (lambda = 0) has no critic: it would not change the autoencoder.
        self.critic = (
            Critic(channels, c.critic_width, c.latent_channels, c.scales) if c.adv_weight else None
        )
        self.set_arithmetic()

    def speed_switches(self) -> tuple[Switch, ...]:
        return (BF16, CHANNELS_LAST)

    # -- the networks --------------------------------------------------------------------------
    def frame(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the networks see them: in [-1, 1] (the authors' scaling), padded
        with background to ``padded`` pixels."""
        pad = self.padded - x.shape[-1]
        x = F.pad(x * 2 - 1, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
        return images(x, self.arithmetic)

    def encode_frame(self, x: torch.Tensor) -> torch.Tensor:
        """The code map ``(n, latent_channels, s, s)`` of framed images."""
        with autocast(x, self.arithmetic):
            return self.encoder(x).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Framed images ``(n, C, padded, padded)`` in about [-1, 1] from code maps (or from
        flattened codes ``(n, embedding_dim)``)."""
        if z.dim() == 2:
            s = self.padded // 2**self.config.scales
            z = z.view(len(z), self.config.latent_channels, s, s)
        z = images(z, self.arithmetic)
        with autocast(z, self.arithmetic):
            return self.decoder(z).float()

    def judge(self, x: torch.Tensor) -> torch.Tensor:
        """The critic's alpha for each framed image, ``(n,)``."""
        with autocast(x, self.arithmetic):
            return self.critic(x).float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened code ``(n, embedding_dim)`` of images ``(n, C, H, W)`` in [0, 1]."""
        return self.encode_frame(self.frame(x)).flatten(1)

    # -- training ------------------------------------------------------------------------------
    def losses(self, batch: Images) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """The autoencoder's loss (Eq. 2) and the critic's (Eq. 1, None without a critic), both
        still attached to every network, and metrics. :meth:`meta_step` sends each loss's gradient
        to its own networks only."""
        c = self.config
        x = self.frame(batch.x)
        z = self.encode_frame(x)
        x_hat = self.decode(z)
        recon = F.mse_loss(x_hat, x)
        metrics = {"recon": recon.item()}
        if self.critic is None:
            return recon, None, metrics
        # alpha ~ U[0, 1/2], per pair (Section 2: the critic cannot tell which end is which);
        # each image's code is mixed with the code of the image at the mirrored batch position.
        alpha = 0.5 - (torch.rand(len(z), device=z.device) - 0.5).abs()
        a = alpha.view(-1, 1, 1, 1)
        x_mix = self.decode(a * z + (1 - a) * z.flip(0))  # x_hat_alpha
        guess_mix = self.judge(x_mix)
        adv = guess_mix.square().mean()  # ||d(x_hat_alpha)||^2
        loss_ae = recon + c.adv_weight * adv  # Eq. 2
        blend = c.reg * x + (1 - c.reg) * x_hat  # gamma x + (1 - gamma) g(f(x))
        loss_critic = (guess_mix - alpha).square().mean() + self.judge(
            blend
        ).square().mean()  # Eq. 1
        metrics.update(critic=loss_critic.item(), adv=adv.item())
        return loss_ae, loss_critic, metrics

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def meta_step(self, batch: Images) -> tuple[float, dict[str, float]]:
        """One ACAI step's gradients in ``.grad``: Eq. 2's into the encoder and decoder only,
        Eq. 1's into the critic only (as the authors' two optimizers with their own variable
        lists); the trainer's one Adam then steps both, Adam being per parameter. Returns the
        autoencoder's loss."""
        loss_ae, loss_critic, metrics = self.losses(batch)
        ae = self.autoencoder_parameters()
        wanted = [(loss_ae, ae)]
        if loss_critic is not None:
            wanted.append((loss_critic, list(self.critic.parameters())))
        for i, (loss, params) in enumerate(wanted):
            grads = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(wanted))
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad + g
        return loss_ae.item(), metrics

    def validation_loss(self, images: Images) -> float:
        """Reconstruction error (mean squared, framed images in [-1, 1], as the training
        ``recon``) of the fixed validation images."""
        total, count = 0.0, 0
        for start in range(0, len(images.x), VAL_CHUNK):
            x = self.frame(images.x[start : start + VAL_CHUNK])
            x_hat = self.decode(self.encode_frame(x))
            total += F.mse_loss(x_hat, x, reduction="sum").item()
            count += x.numel()
        return total / count

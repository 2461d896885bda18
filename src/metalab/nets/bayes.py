"""Stochastic layers of Yin et al. 2020's meta-regularisers, shared by MR-MAML and MR-CNP.

:class:`BayesLinear` and :class:`BayesConv2d` are Bayes-by-backprop layers (Blundell et al. 2015)
with the defaults of TensorFlow Probability's ``DenseReparameterization`` /
``Convolution2DReparameterization``, which the official code uses [R]: a mean-field Gaussian
kernel N(loc, scale^2) with ``scale = softplus(rho) + float32 eps`` (TFP's floor), loc ~ N(0,
0.1^2), rho ~ N(scale_init, 0.1^2), a point-estimate bias ~ N(0, 0.1^2), the prior N(0, 1) on the
kernel; a kernel is ``loc + scale * noise`` for noise the caller draws (zero: the mean), so that
a vmapped or seeded pass is a plain function of its inputs. :class:`ActivationEncoder` is the
activation bottleneck's encoder x -> (mu, sigma) and :func:`activation_kl` its KL to N(0, I).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # TFP's floor on a softplus scale
VARIANCE_FLOOR = 1e-16  # the notebooks' kl_qp_gaussian adds it to the variance


class BayesLinear(nn.Module):
    """A dense Bayes-by-backprop layer; the kernel is ``(in, out)`` as TF's.

    Args:
        n_in, n_out: widths.
        scale_init: the mean of rho at initialisation (MR-CNP: -3; MR-MAML's notebook: -50).
    """

    def __init__(self, n_in: int, n_out: int, scale_init: float = -3.0) -> None:
        super().__init__()
        self.loc = nn.Parameter(0.1 * torch.randn(n_in, n_out))
        self.rho = nn.Parameter(scale_init + 0.1 * torch.randn(n_in, n_out))
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))

    def scale(self) -> torch.Tensor:
        return F.softplus(self.rho) + FLOAT32_EPS

    def kernel(self, noise: torch.Tensor) -> torch.Tensor:
        """``loc + scale * noise`` for standard-normal ``noise`` (``(..., *loc.shape)``)."""
        return self.loc + self.scale() * noise

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """``x (..., n, in)`` through ``kernel (..., in, out)``: ``(..., n, out)``."""
        return x @ kernel + self.bias

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, 1)) summed over the kernel: sum log(1/s) + (s^2 + loc^2 - 1) / 2."""
        s = self.scale()
        return (0.5 * (s.square() + self.loc.square() - 1) - s.log()).sum()


class BayesConv2d(BayesLinear):
    """A 3x3 Bayes convolution with stride 2 and padding 1 (Finn's Omniglot blocks); the kernel
    is ``(out, in, 3, 3)`` and its loc starts as torch's default convolution weights."""

    def __init__(self, n_in: int, n_out: int, scale_init: float = -3.0) -> None:
        nn.Module.__init__(self)
        bound = 1 / (9 * n_in) ** 0.5
        self.loc = nn.Parameter(torch.empty(n_out, n_in, 3, 3).uniform_(-bound, bound))
        self.rho = nn.Parameter(scale_init + 0.1 * torch.randn(n_out, n_in, 3, 3))
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, self.bias, stride=2, padding=1)


class ActivationEncoder(nn.Module):
    """The activation bottleneck's encoder ``x -> (mu, sigma)``: dense ``hidden`` ReLU, then two
    linear heads, sigma through softplus (both notebooks' ``encoder_w``; each method initialises
    the layers as its notebook does)."""

    def __init__(self, n_in: int, hidden: int, dim_w: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_in, hidden)
        self.mu = nn.Linear(hidden, dim_w)
        self.sigma = nn.Linear(hidden, dim_w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., n_in) -> mu, sigma``, each ``(..., dim_w)``."""
        h = F.relu(self.hidden(x))
        return self.mu(h), F.softplus(self.sigma(h))


def activation_kl(mu: torch.Tensor, sigma: torch.Tensor, dims: str = "sum") -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per point, summed (MR-CNP's notebook) or averaged
    (MR-MAML's) over the last dim, then averaged over the points; the notebooks'
    ``kl_qp_gaussian`` with its 1e-16 on the variance::

        0.5 * (sigma_d^2 + mu_d^2 - 1 - log sigma_d^2)   per dimension d
    """
    variance = sigma.square() + VARIANCE_FLOOR
    per_dim = 0.5 * (variance + mu.square() - 1 - variance.log())
    return (per_dim.sum(-1) if dims == "sum" else per_dim.mean(-1)).mean()

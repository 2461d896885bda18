"""Gradient preprocessing of the learned optimizers (Andrychowicz et al. 2016, Appendix A)."""

from __future__ import annotations

import math

import torch


def log_sign(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Each value to two features ``(..., 2)``: ``(log|x| / p, sgn x)`` where ``|x| >= e^-p``, else
    ``(-1, e^p x)`` — gradients (and losses) of very different scales on one footing.

    The paper writes p = 10; the official code calls it k and uses 5. Written as clamps, which give
    the same values on both branches (tests check them against the two-branch formula)."""
    log = torch.log(x.abs()).div(p).clamp(min=-1.0)
    sign = (x * math.exp(p)).clamp(-1.0, 1.0)
    return torch.stack([log, sign], dim=-1)

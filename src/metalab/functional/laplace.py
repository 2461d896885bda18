"""Laplace approximations with Kronecker-factored curvature (K-FAC), inside the autograd graph.

The Laplace approximation of a marginal likelihood around a posterior mode phi (MacKay 1992; the
meta-learning use is Grant et al. 2018, metalab.methods.llama):

    log p(D) ~= log p(D | phi) + log p(phi) + P/2 log(2 pi) - 1/2 log det H,

H the Hessian of -log p(D | phi) - log p(phi) at phi, P the number of parameters. For a network,
H is replaced by a block-diagonal, Kronecker-factored curvature (Martens & Grosse 2015, K-FAC;
Grosse & Martens 2016 for convolutions): for each linear or conv layer l with weights and bias
W_l = [W | b] (out x in+1, a row-major vector),

    H_l ~= N * G_l (x) A_l + tau * I,                                       # K-FAC block
    A_l = mean over examples (and positions) of a a^T,  a = [layer input, 1],
    G_l = mean over examples of sum over positions of J^T Lambda J,

where J is the Jacobian of the network's outputs with respect to the layer's pre-activations,
Lambda the Hessian of the negative log-likelihood with respect to the outputs, N the number of
examples and tau the precision of an isotropic Gaussian prior (the damping).

**G from the output Jacobian (the exact-expectation Fisher, i.e. the generalized Gauss-Newton).**
For a Gaussian likelihood with unit variance (MSE regression) Lambda = I; for a categorical one
(softmax cross-entropy) Lambda = diag(p) - p p^T. Both are the Fisher of the model's predictive
distribution in *exact expectation* over the targets, so G needs no labels, no sampling noise
(which would make the meta-gradient noisy) and is positive semi-definite. The empirical Fisher
(gradients with the true targets) is avoided: it vanishes where the model fits its data and is a
poor curvature estimate (Kunstner et al. 2019). J is read off with one vector-Jacobian product per
output unit (``torch.func.vjp`` with respect to zero perturbations added to the layers' outputs),
so A and G are plain tensor functions of the parameters: their log determinant can be
differentiated through an inner loop (second order, as MAML's meta-gradient). A Gaussian variance
s^2 other than 1 needs no option: log det(H/s^2 + tau I) = log det(H + s^2 tau I) - P log s^2.

With batch norm on batch statistics the examples interact; the vector-Jacobian product then
sums, at each example, the paths through the batch statistics (as K-FAC implementations that
backpropagate a mini-batch loss do), which is an approximation on top of K-FAC's.

**Damping.** ``"exact"``: the exact log determinant of N G (x) A + tau I from the eigenvalues of
the factors, sum_ij log(N mu_i lambda_j + tau) (as Immer et al. 2021 do for marginal likelihoods):
the Laplace approximation with the prior tau I, exact wherever K-FAC is (a linear model with a
Gaussian likelihood; the last layer of a network with one Gaussian output; every layer without
weight sharing on a single example). Only eigenvalues are differentiated, whose gradient
V diag(.) V^T stays defined where they repeat (A has rank at most N x positions), unlike that of
eigenvectors. ``"factored"``: Martens & Grosse's damping split between
the factors, (N G + sqrt(tau)/pi I) (x) (A + pi sqrt(tau) I) with
pi = sqrt((tr A / d_A) / (tr N G / d_G)); its log det is d_A log det(.) + d_G log det(.) and
never below the exact one (it adds positive semi-definite cross terms).

Cost per call: one forward for the shapes, one forward with K vector-Jacobian products (K outputs),
and two symmetric eigendecompositions per layer (d_A <= 577 and d_G = 64 for Conv4 at 64 filters),
in float64 whatever the factors' dtype: float32 LAPACK fails to converge on some factors that
training produces (a ReLU layer with half its units dead on a task's support points leaves G with
zero rows and entries near float32's denormals; seen on the sinusoid at step 413).

Only the weights and biases of ``nn.Linear`` and ``nn.Conv2d`` layers (groups 1, zero padding)
are covered; other parameters (batch norm's scale and shift) have no block, so they do not enter
the log determinant and posterior samples keep them at the mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

from metalab.functional.inner import Params

LIKELIHOODS = ("gaussian", "categorical")
DAMPINGS = ("exact", "factored")


class KFACFactor(NamedTuple):
    """One layer's Kronecker factors: ``H ~= count * G (x) A + tau I`` on the row-major vector of
    ``[weight.reshape(out, -1) | bias]``.

    Attributes:
        weight: the key of the layer's weight in the parameter dict.
        bias: the key of its bias, or None.
        A: ``(d_A, d_A)``: the second moment of the layer's inputs (patches for a conv), with the
            bias 1 last when there is a bias.
        G: ``(d_G, d_G)``: the output curvature pulled back to the pre-activations (J^T Lambda J),
            summed over positions and averaged over examples.
        count: N, the number of examples the curvature sums over.
    """

    weight: str
    bias: str | None
    A: torch.Tensor
    G: torch.Tensor
    count: int


def curvature_layers(model: nn.Module, params: Mapping[str, torch.Tensor]) -> list[tuple]:
    """``(module name, module, weight key, bias key or None)`` of each ``nn.Linear`` and
    ``nn.Conv2d`` of ``model`` whose weight is in ``params``, in module order."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        prefix = f"{name}." if name else ""
        if prefix + "weight" not in params:
            continue
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise ValueError(
                f"{name}: K-FAC here needs a conv with groups=1 and numeric zero padding"
            )
        bias = prefix + "bias" if module.bias is not None and prefix + "bias" in params else None
        found.append((name, module, prefix + "weight", bias))
    return found


def _forward(
    model: nn.Module,
    variables: tuple[Mapping[str, torch.Tensor], ...],
    x: torch.Tensor,
    layers: list[tuple],
    deltas: Mapping[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Size]]:
    """The network's output with ``deltas[name]`` added to each layer's output, and each layer's
    input and output shape, captured by forward hooks around ``functional_call``."""
    inputs: dict[str, torch.Tensor] = {}
    shapes: dict[str, torch.Size] = {}

    def hook(name: str):
        def capture(module, args, output):
            inputs[name], shapes[name] = args[0], output.shape
            return None if deltas is None else output + deltas[name]

        return capture

    handles = [module.register_forward_hook(hook(name)) for name, module, *_ in layers]
    try:
        out = functional_call(model, variables, (x,))
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs, shapes


def kfac_factors(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    likelihood: str = "gaussian",
) -> list[KFACFactor]:
    """The K-FAC factors of each linear and conv layer of ``model`` at ``params`` on inputs ``x``.

    Differentiable with respect to ``params`` (and ``x``), and usable under ``vmap`` and
    ``torch.func.grad``: the factors are built from the layers' inputs and from vector-Jacobian
    products of the outputs, all inside the caller's graph.

    Args:
        model: a network ``(N, ...) -> (N, K)``, called as ``functional_call(model, params, x)``
            with its buffers.
        params: the parameters at which to take the curvature (e.g. adapted ones).
        x: the inputs ``(N, ...)`` (no labels: the Fisher is in exact expectation over targets).
        likelihood: ``"gaussian"`` (unit variance; the outputs are means, as for MSE) or
            ``"categorical"`` (the outputs are logits, as for cross-entropy).

    Returns:
        A :class:`KFACFactor` per layer, in module order.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r}: use one of {LIKELIHOODS}")
    layers = curvature_layers(model, params)
    if not layers:
        raise ValueError("no nn.Linear or nn.Conv2d layer of the model has its weight in params")
    variables = (params, dict(model.named_buffers()))
    with torch.no_grad():  # only the shapes of the layers' outputs
        _, _, shapes = _forward(model, variables, x, layers, None)
    zeros = {name: x.new_zeros(shapes[name]) for name, *_ in layers}

    def perturbed(deltas):
        out, inputs, _ = _forward(model, variables, x, layers, deltas)
        return out, inputs

    out, pullback, inputs = vjp(perturbed, zeros, has_aux=True)
    if out.dim() != 2:
        raise ValueError(f"the model's output has shape {tuple(out.shape)}: K-FAC needs (N, K)")
    n, k = out.shape
    # J[name]: (K, N, *layer output) = d out[:, c] / d pre-activations, one vjp per output unit c
    # (the cotangent is 1 at unit c of every example).
    units = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, n, k)
    (jacobians,) = vmap(pullback)(units)
    probs = out.softmax(-1).T[:, :, None] if likelihood == "categorical" else None  # (K, N, 1)

    factors = []
    for name, module, weight, bias in layers:
        a, jac = inputs[name], jacobians[name]
        if isinstance(module, nn.Conv2d):
            # Patches (N, positions, C_in*kh*kw) in the order of weight.reshape(out, -1).
            a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
            a = a.transpose(1, 2)
            jac = jac.flatten(3).transpose(2, 3)  # (K, N, positions, C_out)
        else:  # a Linear on (N, ..., in): every leading index after N is a position
            a = a.reshape(n, -1, a.shape[-1])
            jac = jac.reshape(k, n, -1, jac.shape[-1])
        if bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
        a = a.flatten(0, 1)  # (N * positions, d_A)
        A = a.T @ a / len(a)
        if probs is None:  # Lambda = I: sum over units, examples, positions of J J^T
            flat = jac.flatten(0, 2)
            G = flat.T @ flat / n
        else:  # J^T (diag p - p p^T) J = sum_k p_k J_k^T J_k - (sum_k p_k J_k)^T (sum_k p_k J_k)
            weighted = jac * probs[..., None]
            mean = weighted.sum(0).flatten(0, 1)
            G = (weighted.flatten(0, 2).T @ jac.flatten(0, 2) - mean.T @ mean) / n
        factors.append(KFACFactor(weight, bias, A, G, n))
    return factors


def _damped(
    mu: torch.Tensor, lam: torch.Tensor, prior_precision: float, damping: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """From the eigenvalues ``mu`` of count * G and ``lam`` of A, the damped ones and the
    constant ``extra`` such that the block's eigenvalues are ``mu_i * lam_j + extra``: tau for
    ``"exact"``, 0 for ``"factored"`` (whose damping is inside the factors)."""
    if damping not in DAMPINGS:
        raise ValueError(f"damping={damping!r}: use one of {DAMPINGS}")
    if prior_precision <= 0:
        raise ValueError(f"prior_precision={prior_precision}: it must be positive")
    mu, lam = mu.clamp(min=0), lam.clamp(min=0)  # rounding may leave -1e-17 for a zero
    if damping == "exact":
        return mu, lam, prior_precision
    tiny = torch.finfo(lam.dtype).tiny
    pi = torch.sqrt(lam.mean().clamp(min=tiny) / mu.mean().clamp(min=tiny))
    root = math.sqrt(prior_precision)
    return mu + root / pi, lam + root * pi, 0.0


def kfac_logdet(
    factors: list[KFACFactor], prior_precision: float, damping: str = "exact"
) -> torch.Tensor:
    """``sum_l log det(count * G_l (x) A_l + tau I)`` (``"exact"``), or with the damping split
    between the factors (``"factored"``); see the module docstring. Differentiable.

    Args:
        factors: from :func:`kfac_factors`.
        prior_precision: tau > 0, the precision of the isotropic Gaussian prior.
        damping: ``"exact"`` or ``"factored"``.
    """
    total = factors[0].A.new_zeros(())
    for factor in factors:
        # Eigenvalues only (see the module docstring on their gradient).
        mu = _eigvalsh(factor.count * factor.G)
        lam = _eigvalsh(factor.A)
        mu, lam, extra = _damped(mu, lam, prior_precision, damping)
        total = total + torch.log(mu[:, None] * lam[None, :] + extra).sum().to(total.dtype)
    return total


def _eigvalsh(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric matrix, computed in float64 (see the module docstring)."""
    return torch.linalg.eigvalsh(matrix.double())


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix in its dtype, computed in float64."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.to(matrix.dtype), vectors.to(matrix.dtype)


@torch.no_grad()
def kfac_sample(
    params: Mapping[str, torch.Tensor],
    factors: list[KFACFactor],
    prior_precision: float,
    samples: int,
    damping: str = "exact",
    generator: torch.Generator | None = None,
) -> Params:
    """Draws from the Laplace posterior ``N(params, H^-1)`` with the K-FAC ``H`` of ``factors``:
    ``samples`` parameter dicts stacked on a leading dimension (for ``vmap`` over them).

    Per layer, with ``count * G = U_G diag(mu) U_G^T`` and ``A = U_A diag(lam) U_A^T``, a draw is
    ``[W | b] + U_G (Z / sqrt(mu lam^T + tau)) U_A^T`` with ``Z`` standard normal (``d_G x d_A``):
    its covariance is exactly ``(count * G (x) A + tau I)^-1`` (the damped factors for
    ``"factored"``, which share the eigenvectors). Parameters without a block stay at ``params``.
    Not differentiable (a prediction tool, not a training loss).
    """
    out = {name: p.detach().expand(samples, *p.shape).clone() for name, p in params.items()}
    for factor in factors:
        mu, u_g = _eigh(factor.count * factor.G)
        lam, u_a = _eigh(factor.A)
        mu, lam, extra = _damped(mu, lam, prior_precision, damping)
        scale = (mu[:, None] * lam[None, :] + extra).rsqrt()
        where = scale.device if generator is None else generator.device
        z = torch.randn(
            (samples, *scale.shape), generator=generator, dtype=scale.dtype, device=where
        )
        noise = u_g @ (z.to(scale.device) * scale) @ u_a.T  # (S, d_G, d_A)
        weight = params[factor.weight]
        columns = weight[0].numel()
        out[factor.weight] += noise[..., :columns].reshape(samples, *weight.shape)
        if factor.bias is not None:
            out[factor.bias] += noise[..., columns]
    return out


def laplace_log_marginal(
    log_likelihood: torch.Tensor, log_prior: torch.Tensor, logdet: torch.Tensor, dim: int
) -> torch.Tensor:
    """``log p(D) ~= log p(D | phi) + log p(phi) + dim/2 log(2 pi) - 1/2 log det H`` at a mode
    ``phi`` of the posterior, with ``logdet`` from
    :func:`kfac_logdet` and ``dim`` the number of parameters ``H`` covers. Exact for a
    linear-Gaussian model."""
    return log_likelihood + log_prior + 0.5 * dim * math.log(2 * math.pi) - 0.5 * logdet

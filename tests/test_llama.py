"""LLAMA and its K-FAC Laplace core in float64: the Laplace marginal is exact for Bayesian linear
regression, K-FAC's log det is exact where K-FAC is and close to the exact block log det
elsewhere, its gradient through the inner loop is the true derivative, the meta-loss is MAML's
plus eta times that term (exactly MAML at eta = 0), posterior samples have the Laplace covariance,
and LLAMA learns sinusoids."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

from metalab.data.omniglot import omniglot
from metalab.errors import ConfigError
from metalab.evaluate import evaluate, evaluate_regression
from metalab.functional import adapt, classification_loss, regression_loss
from metalab.functional.laplace import (
    kfac_factors,
    kfac_logdet,
    kfac_sample,
    laplace_log_marginal,
)
from metalab.methods import get_method
from metalab.methods.llama import LLAMA
from metalab.methods.maml import MAML
from metalab.nets.classifier import Conv4Classifier
from metalab.nets.mlp import MLP
from metalab.rundir import load_method
from metalab.tasks.episodes import EpisodeSampler, TaskBatch
from metalab.tasks.regression import SinusoidTasks
from metalab.train import train

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def unit_directions(params, count: int, seed: int):
    """``count`` random directions of unit norm over all parameters."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        norm = math.sqrt(sum(x.square().sum().item() for x in v.values()))
        yield {k: x / norm for k, x in v.items()}


def exact_blocks(model: nn.Module, params, x, likelihood: str) -> list[torch.Tensor]:
    """Each linear / conv layer's exact Gauss-Newton block sum_n J_n^T Lambda_n J_n on the
    row-major vector of [weight | bias], from the full Jacobian of the outputs."""
    out = functional_call(model, params, (x,))
    n, k = out.shape
    if likelihood == "categorical":
        p = out.softmax(-1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        lam = torch.eye(k, dtype=out.dtype).expand(n, k, k)
    jac = jacrev(lambda q: functional_call(model, q, (x,)))(params)
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w, b = jac[f"{name}.weight"].flatten(3), jac[f"{name}.bias"][..., None]
            j = torch.cat([w, b], -1).reshape(n, k, -1)
            blocks.append(torch.einsum("nki,nkl,nlj->ij", j, lam, j))
    return blocks


def damped_logdet(block: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.logdet(block + tau * torch.eye(len(block), dtype=block.dtype))


# -- the Laplace core -----------------------------------------------------------------------------


def linear_regression(outputs: int):
    """A linear model with a Gaussian prior N(theta, I / tau) on [W | b] and unit noise: data,
    prior mean, the posterior mode (closed form) and the posterior precision."""
    torch.manual_seed(0)
    d, n, tau = 3, 8, 0.7
    model = nn.Linear(d, outputs).double()
    x, y = torch.randn(n, d, dtype=F64), torch.randn(n, outputs, dtype=F64)
    theta = params_of(model)
    xb = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    prior_mean = torch.cat([theta["weight"], theta["bias"][:, None]], 1)  # (outputs, d + 1)
    precision = xb.T @ xb + tau * torch.eye(d + 1, dtype=F64)  # per output row
    mode = torch.linalg.solve(precision, xb.T @ y + tau * prior_mean.T).T
    return model, x, y, xb, tau, theta, prior_mean, precision, mode


@pytest.mark.parametrize("outputs", [1, 3])
def test_laplace_marginal_is_exact_for_bayesian_linear_regression(outputs):
    model, x, y, xb, tau, theta, prior_mean, precision, mode = linear_regression(outputs)
    d = x.shape[1]
    phi = {"weight": mode[:, :d], "bias": mode[:, d]}

    def neg_log_posterior(p):  # the inner loss whose minimum is the mode
        out = functional_call(model, p, (x,))
        quad = sum((p[k] - theta[k]).square().sum() for k in p)
        return 0.5 * (out - y).square().sum() + 0.5 * tau * quad

    assert max(g.abs().max().item() for g in grad(neg_log_posterior)(phi).values()) < 1e-12

    factors = kfac_factors(model, phi, x, "gaussian")
    logdet = kfac_logdet(factors, tau)
    assert abs(logdet.item() - outputs * torch.logdet(precision).item()) < 1e-10
    log_lik = torch.distributions.Normal(xb @ mode.T, 1.0).log_prob(y).sum()
    log_prior = torch.distributions.Normal(prior_mean, tau**-0.5).log_prob(mode).sum()
    laplace = laplace_log_marginal(log_lik, log_prior, logdet, outputs * (d + 1))
    covariance = torch.eye(len(x), dtype=F64) + xb @ xb.T / tau  # y_k ~ N(X theta_k, this)
    closed = sum(
        torch.distributions.MultivariateNormal(xb @ prior_mean[k], covariance).log_prob(y[:, k])
        for k in range(outputs)
    )
    assert abs(laplace.item() - closed.item()) < 1e-10, (laplace, closed)
    # The damping split between the factors adds positive semi-definite terms to N G (x) A + tau I,
    # so its log det is larger (here by about 2 nats per output).
    assert kfac_logdet(factors, tau, "factored").item() > logdet.item() + 1.0


def test_kfac_is_exact_where_kfac_is_exact():
    """One example (each block is then G (x) A exactly, at every layer, for either likelihood);
    a conv whose output is one position is the same; and the last layer of a network with one
    Gaussian output is exact for any number of examples (G = 1)."""
    torch.manual_seed(0)
    tau = 0.1
    mlp = MLP((2, 8, 8, 3)).double()
    conv = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)
    ).double()  # 3x3 inputs: the conv has one output position
    cases = [
        (mlp, torch.randn(1, 2, dtype=F64), likelihood, None)
        for likelihood in ("gaussian", "categorical")
    ]
    cases += [(conv, torch.randn(1, 2, 3, 3, dtype=F64), "categorical", None)]
    cases += [(MLP((1, 8, 8, 1)).double(), 3 * torch.randn(10, 1, dtype=F64), "gaussian", -1)]
    for model, x, likelihood, only in cases:
        params = params_of(model)
        factors = kfac_factors(model, params, x, likelihood)
        blocks = exact_blocks(model, params, x, likelihood)
        assert len(factors) == len(blocks)
        pairs = list(zip(factors, blocks))
        for factor, block in pairs if only is None else pairs[only:]:
            assert factor.A.shape[0] * factor.G.shape[0] == len(block)
            ours = kfac_logdet([factor], tau).item()
            assert abs(ours - damped_logdet(block, tau).item()) < 1e-10, (likelihood, factor)


@pytest.mark.parametrize(
    "likelihood, sizes", [("gaussian", (1, 8, 8, 1)), ("categorical", (2, 8, 8, 3))]
)
def test_kfac_logdet_is_close_to_the_exact_block_logdet(likelihood, sizes):
    """On 10 examples K-FAC is not exact for the hidden layers: log det rises above the prior's
    P log tau by at most twice the exact rise, and not less (measured over these seeds: the
    K-FAC rise is the exact one times 0.99 to 1.60; without the count N in N G (x) A it fails)."""
    tau = 0.1
    for seed in range(3):
        torch.manual_seed(seed)
        model = MLP(sizes).double()
        params, x = params_of(model), 2 * torch.randn(10, sizes[0], dtype=F64)
        factors = kfac_factors(model, params, x, likelihood)
        for factor, block in zip(factors, exact_blocks(model, params, x, likelihood)):
            floor = len(block) * math.log(tau)
            exact = damped_logdet(block, tau).item() - floor
            ours = kfac_logdet([factor], tau).item() - floor
            assert exact > 1.0  # the layer has curvature to compare
            assert 0.95 * exact < ours < 2.0 * exact, (seed, factor.weight, ours, exact)


def logdet_after_adaptation(model, loss_fn, likelihood, support, steps, lr, tau, damping):
    """theta -> log det of the K-FAC curvature at the parameters after ``steps`` inner steps."""

    def term(theta):
        adapted = adapt(theta, lambda p, x, y: loss_fn(p, x, y)[0], support, steps, lr)
        return kfac_logdet(kfac_factors(model, adapted, support[0], likelihood), tau, damping)

    return term


def check_against_finite_differences(term, theta, bound: float) -> None:
    analytic = grad(term)(theta)
    # Plain autograd through the same function gives the same derivative.
    leaves = {k: p.clone().requires_grad_() for k, p in theta.items()}
    term(leaves).backward()
    for k in theta:
        assert torch.allclose(leaves[k].grad, analytic[k], rtol=1e-10, atol=1e-12), k
    norm = math.sqrt(sum(g.square().sum().item() for g in analytic.values()))
    assert norm > 0.1
    # eps = 1e-6 on a unit direction fits between ReLU kinks (see test_functional.py).
    eps = 1e-6
    for v in unit_directions(theta, 3, seed=1):
        plus = term({k: p + eps * v[k] for k, p in theta.items()})
        minus = term({k: p - eps * v[k] for k, p in theta.items()})
        directional = sum((analytic[k] * v[k]).sum() for k in theta).item()
        assert abs((plus - minus).item() / (2 * eps) - directional) < bound * norm


@pytest.mark.parametrize("damping", ["exact", "factored"])
@pytest.mark.parametrize("steps", [1, 3])
def test_logdet_gradient_through_adaptation_mlp(damping, steps):
    """Measured: within 3e-10 |grad| (1-16-16-1 ReLU MLP, 10 sinusoid points)."""
    torch.manual_seed(0)
    model = MLP((1, 16, 16, 1)).double()
    gen = torch.Generator().manual_seed(0)
    x = 10 * torch.rand(10, 1, generator=gen, dtype=F64) - 5
    term = logdet_after_adaptation(
        model, regression_loss(model), "gaussian", (x, torch.sin(x)), steps, 0.01, 1.0, damping
    )
    check_against_finite_differences(term, params_of(model), 1e-8)


def test_logdet_gradient_through_adaptation_conv():
    """Conv4 with batch norm (4 filters), 5-way 1-shot, one step at alpha = 0.4; measured within
    1e-8 |grad| (rounding of a larger log det over the 2e-6 difference)."""
    torch.manual_seed(0)
    model = Conv4Classifier(5, hidden=4).double()
    gen = torch.Generator().manual_seed(0)
    support = (torch.rand(5, 1, 28, 28, generator=gen, dtype=F64), torch.arange(5))
    term = logdet_after_adaptation(
        model, classification_loss(model), "categorical", support, 1, 0.4, 12.5, "exact"
    )
    check_against_finite_differences(term, params_of(model), 1e-6)


def test_logdet_survives_a_factor_float32_lapack_fails_on():
    """A G factor from LLAMA's sinusoid training (step 413, seed 0: 20 of the 40 units of the
    second hidden layer dead on the task's support points, entries near float32's denormals) on
    which float32 ``eigvalsh`` failed to converge: the log det and the posterior draws are
    finite and equal the float64 computation."""
    from pathlib import Path

    from metalab.functional.laplace import KFACFactor

    G = torch.from_numpy(np.load(Path(__file__).parent / "fixtures" / "kfac_dead_units_G.npy"))
    assert G.dtype == torch.float32 and (G.abs().sum(0) == 0).sum() == 20
    A = torch.eye(41) + 0.1
    factor = KFACFactor("w", "b", A, G, 5)
    got = kfac_logdet([factor], 25.0)
    exact = kfac_logdet([KFACFactor("w", "b", A.double(), G.double(), 5)], 25.0)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)
    params = {"w": torch.zeros(40, 40), "b": torch.zeros(40)}
    draws = kfac_sample(params, [factor], 25.0, 3, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(d).all() for d in draws.values())


@pytest.mark.parametrize("damping", ["exact", "factored"])
def test_posterior_samples_have_the_kfac_covariance(damping):
    """Draws around the parameters with covariance (N G (x) A + tau I)^-1 on the row-major
    [W | b] of each layer (the damped factors' product for "factored"), G not isotropic (a
    categorical output), so swapped factors would show. 40,000 draws: the sample covariance is
    within 5% (measured 1-2%)."""
    torch.manual_seed(0)
    tau, samples = 0.5, 40_000
    model = MLP((2, 3, 2)).double()
    params = params_of(model)
    factors = kfac_factors(model, params, torch.randn(6, 2, dtype=F64), "categorical")
    draws = kfac_sample(params, factors, tau, samples, damping, torch.Generator().manual_seed(0))
    for f in factors:
        w, b = draws[f.weight] - params[f.weight], draws[f.bias] - params[f.bias]
        assert w.shape == (samples, *params[f.weight].shape)
        flat = torch.cat([w, b[..., None]], -1).flatten(1)  # (S, d_G * d_A)
        g, a = f.count * f.G, f.A
        eye_g, eye_a = torch.eye(len(g), dtype=F64), torch.eye(len(a), dtype=F64)
        if damping == "exact":
            precision = torch.kron(g, a) + tau * torch.eye(len(g) * len(a), dtype=F64)
        else:
            pi = math.sqrt(torch.trace(a).item() / len(a) / (torch.trace(g).item() / len(g)))
            root = math.sqrt(tau)
            precision = torch.kron(g + root / pi * eye_g, a + root * pi * eye_a)
        covariance = torch.linalg.inv(precision)
        assert (torch.cov(flat.T) - covariance).norm() < 0.05 * covariance.norm(), f.weight
        assert flat.mean(0).abs().max() < 0.05 * covariance.diagonal().sqrt().max()


# -- the method ------------------------------------------------------------------------------------


def sinusoid_batch(tasks: int) -> TaskBatch:
    batch = SinusoidTasks(10, 10, seed=1).sample_batch(tasks)
    return TaskBatch(*(t.double() for t in batch.tensors()))


def image_batch(tasks: int, ways: int = 5) -> TaskBatch:
    """Random 28x28 images with labels 0..ways-1, 1 support and 2 queries per class."""
    gen = torch.Generator().manual_seed(0)
    return TaskBatch(
        torch.rand(tasks, ways, 1, 28, 28, generator=gen, dtype=F64),
        torch.arange(ways).repeat(tasks, 1),
        torch.rand(tasks, 2 * ways, 1, 28, 28, generator=gen, dtype=F64),
        torch.arange(ways).repeat_interleave(2).repeat(tasks, 1),
    )


def meta_grads(method, batch: TaskBatch, backend: str) -> tuple[float, dict, dict]:
    method.zero_grad()
    method.set_arithmetic({**method.arithmetic, "backend": backend})
    loss, metrics = method.meta_step(batch)
    return loss, metrics, {k: p.grad.clone() for k, p in method.named_parameters()}


CASES = {
    "sinusoid": (LLAMA.recipe("sinusoid").updated(hidden=16), sinusoid_batch),
    "omniglot": (LLAMA.recipe("omniglot-5w1s").updated(hidden=4), image_batch),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_eta_zero_is_maml_and_eta_adds_its_logdet_gradient(case):
    """At eta = 0 LLAMA's meta-gradient is MAML's, bit for bit, with either backend; at eta > 0 it
    is MAML's plus eta times the mean gradient of log det(H / tau) after the inner loop (the term
    whose gradient matches finite differences above), and the backends agree to 1e-10."""
    config, make_batch = CASES[case]
    batch = make_batch(3)
    torch.manual_seed(0)
    shared = {k: v for k, v in asdict(config).items() if k in MAML.Config.__dataclass_fields__}
    maml = MAML(MAML.Config(**shared)).double()
    zero = LLAMA(config.updated(eta=0.0)).double()
    zero.load_state_dict(maml.state_dict())
    for backend in ("vmap", "loop"):
        loss_maml, _, grads_maml = meta_grads(maml, batch, backend)
        loss_zero, metrics, grads_zero = meta_grads(zero, batch, backend)
        assert loss_zero == loss_maml and metrics["logdet"] > 0.0
        assert all(torch.equal(grads_zero[k], grads_maml[k]) for k in grads_maml), backend

    eta = 0.3
    llama = LLAMA(config.updated(eta=eta)).double()
    llama.load_state_dict(maml.state_dict())
    theta = params_of(llama.net)
    tau = llama.prior_precision(batch.support_x.shape[1])
    extra = dict.fromkeys(theta, 0.0)
    for t in range(batch.tasks):
        support = (batch.support_x[t], batch.support_y[t])
        term = logdet_after_adaptation(
            llama.net, llama.query_loss, llama.likelihood, support, 1, config.inner_lr, tau, "exact"
        )
        for k, g in grad(term)(theta).items():
            extra[k] = extra[k] + g / batch.tasks
    looped = meta_grads(llama, batch, "loop")[2]
    vmapped = meta_grads(llama, batch, "vmap")[2]
    for k in theta:
        expected = grads_maml[f"net.{k}"] + eta * extra[k]
        assert torch.allclose(looped[f"net.{k}"], expected, rtol=1e-10, atol=1e-13), k
        assert torch.allclose(vmapped[f"net.{k}"], looped[f"net.{k}"], rtol=1e-10, atol=1e-13)


def test_sample_functions_spreads_less_with_a_tighter_prior():
    torch.manual_seed(0)
    llama = LLAMA(LLAMA.recipe("sinusoid"))
    batch = SinusoidTasks(5, 20, seed=2).sample_batch(1)
    args = (batch.support_x[0], batch.support_y[0], batch.query_x[0])
    spreads = []
    for tau in (1.0, 100.0):
        llama.config = llama.config.updated(prior_precision=tau)
        draws = llama.sample_functions(*args, 64, torch.Generator().manual_seed(0))
        assert draws.shape == (64, 20, 1) and torch.isfinite(draws).all()
        spreads.append(draws.std(0).mean().item())
    assert spreads[1] < 0.5 * spreads[0], spreads
    # The test-time prior implied by 10 steps at alpha = 0.01 on 5 points: 5 / (2 * 0.01 * 10).
    llama.config = llama.config.updated(prior_precision=0.0)
    assert llama.prior_precision(5, test=True) == pytest.approx(25.0)


def test_llama_learns_sinusoids_in_seconds():
    """300 meta-steps of 10 tasks (Adam 3e-3): the post-adaptation MSE (10 steps, K = 10) falls
    well below that of the un-meta-trained initialisation (measured 4.2 -> 1.3)."""
    assert get_method("llama") is LLAMA
    config = LLAMA.recipe("sinusoid").updated(meta_batch=10, lr=3e-3, backend="vmap")
    torch.manual_seed(0)
    llama = LLAMA(config)
    before = evaluate_regression(llama, shots=10, tasks=200, steps=(10,))[0].mean
    tasks = LLAMA.task_sampler(config, "train")
    optimizer = llama.make_optimizer()
    for _ in range(300):
        optimizer.zero_grad()
        _, metrics = llama.meta_step(tasks.sample_batch(config.meta_batch))
        optimizer.step()
    assert math.isfinite(metrics["logdet"]) and metrics["logdet"] > 0
    after = evaluate_regression(llama, shots=10, tasks=200, steps=(10,))[0].mean
    assert after < 0.5 * before and after < 2.0, (before, after)


def test_settings_are_checked():
    assert LLAMA.recipe("omniglot-5w1s").eta == pytest.approx(0.1)
    maml = asdict(MAML.recipe("omniglot-5w1s"))
    assert {k: v for k, v in asdict(LLAMA.recipe("omniglot-5w1s")).items() if k in maml} == maml
    for bad in ({"damping": "nope"}, {"curvature": "all"}, {"eta": -1.0}):
        with pytest.raises(ConfigError):
            LLAMA(LLAMA.recipe("sinusoid").updated(**bad))
    with pytest.raises(ConfigError, match="--prior-precision"):
        LLAMA(LLAMA.recipe("sinusoid").updated(inner_steps=0))
    model = MLP((1, 4, 1))
    with pytest.raises(ValueError, match="likelihood"):
        kfac_factors(model, dict(model.named_parameters()), torch.zeros(2, 1), "poisson")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match="groups=1"):
        kfac_factors(grouped, dict(grouped.named_parameters()), torch.zeros(1, 2, 3, 3))


@pytest.mark.realdata
def test_llama_learns_omniglot_quickly(omniglot_root, tmp_path):
    """60 meta-steps of 8 tasks, 16 filters (a K-FAC step costs about 6 MAML steps on a CPU):
    5-way 1-shot accuracy well above chance (measured 46%; MAML under the same budget 50%)."""
    config = LLAMA.recipe("omniglot-5w1s").updated(
        episodes=60, meta_batch=8, hidden=16, val_every=0, backend="vmap"
    )
    torch.manual_seed(0)
    train("llama", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "run" / "best.pt")
    assert isinstance(method, LLAMA) and method.config.eta == pytest.approx(0.1)
    test = omniglot("vinyals", "test", omniglot_root)
    result = evaluate(method, EpisodeSampler(test, 5, 1, 5, seed=7), episodes=100)
    assert result.mean > 0.35, result  # chance is 0.2

"""PLATIPUS in float64: its KL is the diagonal-Gaussian KL, the gradient of its whole loss matches
finite differences for every meta-parameter and an independent autograd loop, it is MAML's
meta-gradient when its noise, posterior step and KL are switched off, test-time samples spread
with sigma_theta and are reproducible, the ambiguous regression tasks keep their invariants, and
PLATIPUS learns sinusoids."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call, grad

from metalab import functional
from metalab.errors import ConfigError
from metalab.evaluate import evaluate_regression
from metalab.methods import get_method
from metalab.methods.maml import MAML
from metalab.methods.platipus import (
    GROUPS,
    PLATIPUS,
    diagonal_gaussian_kl,
    meta_gradient,
    task_loss,
)
from metalab.rundir import load_checkpoint
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.regression import LINE, SINE, AmbiguousFamily, AmbiguousTasks, SinusoidTasks
from metalab.train import train

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


def sinusoid_batch(tasks: int, shots: int = 5, queries: int = 6, seed: int = 1) -> TaskBatch:
    batch = SinusoidTasks(shots, queries, seed=seed).sample_batch(tasks)
    return TaskBatch(*(t.double() for t in batch.tensors()))


def small_platipus(**changes) -> PLATIPUS:
    """A 1-8-8-1 PLATIPUS in float64 whose meta-parameters are all away from their initial
    values (so that no gradient vanishes by symmetry): log-stds spread around log 0.3, step
    sizes differing per tensor."""
    config = PLATIPUS.recipe("sinusoid").updated(hidden=8, **changes)
    torch.manual_seed(0)
    method = PLATIPUS(config).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for group in (method.log_sigma, method.log_v_q):
            for p in group:
                p.copy_(math.log(0.3) + 0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
        for i, (p, q) in enumerate(zip(method.gamma_p, method.gamma_q)):
            p.fill_(0.02 + 0.01 * i)
            q.fill_(0.03 - 0.005 * i)
    return method


def detached(meta):
    return {g: {k: p.detach().clone() for k, p in part.items()} for g, part in meta.items()}


def fixed_noise(method: PLATIPUS, leading: tuple[int, ...], seed: int = 5):
    return method.draw_noise(leading, torch.Generator().manual_seed(seed))


# -- the KL term ----------------------------------------------------------------------------------


def test_kl_is_the_diagonal_gaussian_kl_and_zero_when_q_is_the_prior():
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (3, 2), "b": (3,)}
    mu_q, log_q, mu_p, log_p = (
        {k: 0.5 * torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()}
        for _ in range(4)
    )
    ours = diagonal_gaussian_kl(mu_q, log_q, mu_p, log_p)
    q = {k: Normal(mu_q[k], log_q[k].exp()) for k in shapes}
    p = {k: Normal(mu_p[k], log_p[k].exp()) for k in shapes}
    direct = sum(kl_divergence(q[k], p[k]).sum() for k in shapes)
    assert abs(ours.item() - direct.item()) < 1e-12 and ours.item() > 0.5
    # Monte Carlo, E_q[log q(z) - log p(z)] from 200,000 draws: within 4 standard errors.
    draws = 200_000
    log_ratio = 0.0
    for k, shape in shapes.items():
        z = mu_q[k] + log_q[k].exp() * torch.randn((draws, *shape), generator=gen, dtype=F64)
        log_ratio = log_ratio + (q[k].log_prob(z) - p[k].log_prob(z)).flatten(1).sum(1)
    error = log_ratio.std().item() / math.sqrt(draws)
    assert abs(log_ratio.mean().item() - ours.item()) < 4 * error, (ours, log_ratio.mean())
    assert diagonal_gaussian_kl(mu_q, log_q, mu_q, log_q).item() == 0.0


# -- the meta-gradient ----------------------------------------------------------------------------


@pytest.mark.parametrize("posterior_data", ["query", "all"])
def test_meta_gradient_matches_finite_differences_for_every_meta_parameter(posterior_data):
    """The whole loss of one task (2 draws, 2 inner steps at alpha = 0.05, w_KL = 0.1), fixed
    noise: along a random unit direction inside each group of meta-parameters, the central
    difference (eps = 1e-6) agrees with the analytic directional derivative within 1e-8 of the
    group's gradient norm (measured: at most 8e-10)."""
    method = small_platipus(inner_steps=2, inner_lr=0.05)
    batch = sinusoid_batch(1)
    support = (batch.support_x[0], batch.support_y[0])
    query = (batch.query_x[0], batch.query_y[0])
    noise = fixed_noise(method, (2,))
    meta = detached(method.meta_params())

    def loss(m):
        return task_loss(method.loss_fn, 2, 0.05, 0.1, posterior_data, m, support, query, noise)[0]

    analytic = grad(loss)(meta)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6
    for group in GROUPS:
        norm = math.sqrt(sum(g.square().sum().item() for g in analytic[group].values()))
        assert norm > 1e-3, group  # every group has a gradient to check
        v = {k: torch.randn(p.shape, generator=gen, dtype=F64) for k, p in meta[group].items()}
        length = math.sqrt(sum(x.square().sum().item() for x in v.values()))

        def shifted(sign, group=group, v=v, length=length):
            moved = {k: p + sign * eps * v[k] / length for k, p in meta[group].items()}
            return loss({**meta, group: moved}).item()

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        directional = sum((analytic[group][k] * v[k]).sum() for k in v).item() / length
        assert abs(numeric - directional) < 1e-8 * norm, (group, numeric, directional)


def reference_task_loss(model, meta, support, query, noise, steps, lr, kl_weight):
    """Alg. 1 written out with plain autograd (create_graph in every step) and the KL of
    torch.distributions: the loss whose gradient the backends must reproduce."""

    def mse(params, x, y):
        return F.mse_loss(functional_call(model, params, (x,)), y)

    def step(params, data, rate):
        grads = torch.autograd.grad(mse(params, *data), list(params.values()), create_graph=True)
        return {k: p - rate[k] * g for (k, p), g in zip(params.items(), grads)}

    mu, alpha = meta["mu"], dict.fromkeys(meta["mu"], lr)
    mu_q, mu_p = step(mu, query, meta["gamma_q"]), step(mu, support, meta["gamma_p"])
    data = 0.0
    draws = next(iter(noise.values())).shape[0]
    for s in range(draws):
        phi = {k: mu_q[k] + meta["log_v_q"][k].exp() * noise[k][s] for k in mu}
        for _ in range(steps):
            phi = step(phi, support, alpha)
        data = data + mse(phi, *query) / draws
    kl = sum(
        kl_divergence(
            Normal(mu_q[k], meta["log_v_q"][k].exp()), Normal(mu_p[k], meta["log_sigma"][k].exp())
        ).sum()
        for k in mu
    )
    return data + kl_weight * kl


def test_backends_agree_with_a_plain_autograd_loop():
    """vmap and loop backends, 3 tasks, 2 draws, 2 inner steps: the same loss and gradients as
    the written-out reference, to 1e-10 relative."""
    method = small_platipus(inner_steps=2, inner_lr=0.05)
    batch = sinusoid_batch(3)
    noise = fixed_noise(method, (3, 2))
    meta = detached(method.meta_params())
    leaves = {
        g: {k: p.clone().requires_grad_() for k, p in part.items()} for g, part in meta.items()
    }
    total = 0.0
    for t in range(3):
        total = (
            total
            + reference_task_loss(
                method.net,
                leaves,
                (batch.support_x[t], batch.support_y[t]),
                (batch.query_x[t], batch.query_y[t]),
                {k: n[t] for k, n in noise.items()},
                2,
                0.05,
                0.1,
            )
            / 3
        )
    total.backward()
    for backend in ("vmap", "loop"):
        result = meta_gradient(
            method.loss_fn,
            meta,
            (batch.support_x, batch.support_y),
            (batch.query_x, batch.query_y),
            noise,
            2,
            0.05,
            0.1,
            backend=backend,
        )
        assert abs(result.loss.item() - total.item()) < 1e-10 * abs(total.item()), backend
        assert result.metrics["kl"].shape == (3,) and (result.metrics["kl"] > 0).all()
        for group in GROUPS:
            for k, leaf in leaves[group].items():
                assert torch.allclose(result.grads[group][k], leaf.grad, rtol=1e-10, atol=1e-13), (
                    backend,
                    group,
                    k,
                )


def test_without_noise_posterior_step_and_kl_it_is_maml():
    """The exact reduction: zero noise (theta = mu_q), gamma_q = 0 (mu_q = mu_theta) and w_KL = 0
    leave L(phi(mu_theta), D^test) with phi MAML's inner loop, so the gradient for mu_theta is
    MAML's (functional.meta_gradient) to 1e-12, the loss is MAML's, and log sigma, log v_q and
    gamma_p get exactly zero. Then through the methods' meta_step with real noise: v_q = 1e-9,
    gamma_q = 0, w_KL = 0 gives MAML's meta_step gradient to 1e-6 relative."""
    method = small_platipus(inner_steps=2, inner_lr=0.05)
    batch = sinusoid_batch(4)
    support, query = (batch.support_x, batch.support_y), (batch.query_x, batch.query_y)
    meta = detached(method.meta_params())
    meta["gamma_q"] = {k: torch.zeros_like(g) for k, g in meta["gamma_q"].items()}
    zero = {k: torch.zeros_like(n) for k, n in fixed_noise(method, (4, 1)).items()}
    ours = meta_gradient(method.loss_fn, meta, support, query, zero, 2, 0.05, 0.0, backend="loop")
    maml = functional.meta_gradient(
        method.loss_fn, meta["mu"], support, query, 2, 0.05, backend="loop"
    )
    assert abs(ours.loss.item() - maml.loss.item()) < 1e-12 * maml.loss.item()
    for k, g in maml.grads.items():
        assert torch.allclose(ours.grads["mu"][k], g, rtol=1e-12, atol=1e-15), k
    for group in ("log_sigma", "log_v_q", "gamma_p"):
        assert all((g == 0).all() for g in ours.grads[group].values()), group

    # Through the methods: PLATIPUS's meta_step draws its own noise, scaled to 1e-9 here.
    platipus = small_platipus(inner_steps=2, inner_lr=0.05, kl_weight=0.0, samples=2)
    with torch.no_grad():
        for v, g in zip(platipus.log_v_q, platipus.gamma_q):
            v.fill_(math.log(1e-9))
            g.zero_()
    shared = {
        k: v for k, v in asdict(platipus.config).items() if k in MAML.Config.__dataclass_fields__
    }
    reference = MAML(MAML.Config(**shared)).double()
    reference.net.load_state_dict(platipus.net.state_dict())
    for model in (platipus, reference):
        model.set_arithmetic({**model.arithmetic, "backend": "vmap"})
        model.zero_grad()
        model.meta_step(batch)
    for (k, p), q in zip(platipus.net.named_parameters(), reference.net.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9), k


# -- test time ------------------------------------------------------------------------------------


def test_samples_differ_shrink_with_sigma_and_are_seeded():
    torch.manual_seed(0)
    method = PLATIPUS(PLATIPUS.recipe("sinusoid"))
    batch = SinusoidTasks(5, 20, seed=2).sample_batch(1)
    args = (batch.support_x[0], batch.support_y[0], batch.query_x[0])
    spreads = []
    for sigma in (0.1, 0.01):
        with torch.no_grad():
            for p in method.log_sigma:
                p.fill_(math.log(sigma))
        draws = method.sample_functions(*args, 16, torch.Generator().manual_seed(0))
        again = method.sample_functions(*args, 16, torch.Generator().manual_seed(0))
        assert draws.shape == (16, 20, 1) and torch.equal(draws, again)
        assert all(not torch.equal(draws[0], d) for d in draws[1:])
        spreads.append(draws.std(0).mean().item())
    assert spreads[1] < 0.3 * spreads[0], spreads  # about 10x: the network is near linear in eps
    other = method.sample_functions(*args, 16, torch.Generator().manual_seed(1))
    assert not torch.equal(other, draws)
    # predict: the mean of eval_samples draws seeded by config.seed, the same on every call.
    mean = method.sample_functions(*args, 10, torch.Generator().manual_seed(0)).mean(0)
    assert torch.equal(method.predict(*args), mean) and torch.equal(method.predict(*args), mean)
    # The regression curve (all tasks and draws in one vmap) scores that same ensemble.
    curve = method.regression_curve(batch, method.config.eval_inner_steps)
    mse = (mean - batch.query_y[0]).square().mean()
    assert curve.shape == (1, 11) and torch.allclose(curve[0, -1], mse, rtol=1e-5)


def test_classification_predicts_the_log_of_the_mean_softmax():
    torch.manual_seed(0)
    method = PLATIPUS(PLATIPUS.recipe("omniglot-5w1s").updated(hidden=4, eval_samples=3))
    gen = torch.Generator().manual_seed(0)
    support_x, query_x = (
        torch.rand(5, 1, 28, 28, generator=gen),
        torch.rand(10, 1, 28, 28, generator=gen),
    )
    support_y = torch.arange(5)
    draws = method.sample_functions(
        support_x, support_y, query_x, 3, torch.Generator().manual_seed(method.config.seed)
    )
    logits = method.predict(support_x, support_y, query_x)
    assert logits.shape == (10, 5)
    expected = draws.softmax(-1).mean(0).log()
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(10), atol=1e-5)
    with pytest.raises(ConfigError, match="5-way"):
        method.predict(support_x[:3], torch.arange(3), query_x)


# -- the ambiguous regression tasks ---------------------------------------------------------------


def test_ambiguous_tasks_keep_their_invariants():
    family = AmbiguousFamily()
    tasks = AmbiguousTasks(5, 20, seed=0)
    batch, info = tasks.fixed(400)
    assert batch.support_x.shape == (400, 5, 1) and batch.query_y.shape == (400, 20, 1)
    sx, qx = batch.support_x.double().numpy()[..., 0], batch.query_x.double().numpy()[..., 0]
    # Support points in the task's narrow window (width 2) inside [-5, 5]; queries anywhere.
    low, high = info["window"][:, :1], info["window"][:, 1:]
    assert np.allclose(high - low, family.support_width)
    assert (low >= -5).all() and (high <= 5).all()
    assert ((sx >= low - 1e-6) & (sx <= high + 1e-6)).all()
    assert (sx.max(1) - sx.min(1) <= 2.0 + 1e-6).all()
    assert qx.min() >= -5 and qx.max() <= 5 and qx.max() - qx.min() > 9.5
    assert low.min() < -4.5 and high.max() > 4.5  # windows are placed all over the range
    # Both kinds occur, about half each (400 tasks: 4 standard deviations is 0.1).
    kind = info["kind"]
    assert set(np.unique(kind)) == {SINE, LINE} and abs((kind == LINE).mean() - 0.5) < 0.1
    assert ((info["amplitude"] >= 0.1) & (info["amplitude"] <= 5)).all()
    assert ((info["phase"] >= 0) & (info["phase"] <= np.pi)).all()
    for name in ("slope", "intercept"):
        assert ((info[name] >= -3) & (info[name] <= 3)).all() and np.ptp(info[name]) > 5
    # The clean targets follow each task's own function.
    x = np.concatenate([sx, qx], 1)
    line = info["slope"][:, None] * x + info["intercept"][:, None]
    sine = info["amplitude"][:, None] * np.sin(x - info["phase"][:, None])
    np.testing.assert_allclose(
        info["clean"][..., 0], np.where(kind[:, None] == LINE, line, sine), atol=1e-5
    )
    # Noise of std 0.3 on every target (10,000 residuals: standard error of the std ~0.002).
    y = np.concatenate([batch.support_y.numpy(), batch.query_y.numpy()], 1)[..., 0]
    residual = y - info["clean"][..., 0]
    assert abs(residual.std() - 0.3) < 0.01 and abs(residual.mean()) < 0.012
    # Seeded, checkpointable, fixed sets are prefixes; the sampler PLATIPUS trains on.
    state = tasks.state()
    first = tasks.sample_batch(3)
    tasks.set_state(state)
    assert torch.equal(tasks.sample_batch(3).support_y, first.support_y)
    assert torch.equal(tasks.fixed(7)[0].query_x, batch.query_x[:7])
    config = PLATIPUS.recipe("ambiguous-regression")
    sampler = PLATIPUS.task_sampler(config, "train")
    assert isinstance(sampler, AmbiguousTasks) and sampler.shots == 5
    assert PLATIPUS.task_sampler(config, "val") is None
    for bad in (dict(support_width=0.0), dict(support_width=11.0), dict(noise=-1.0)):
        with pytest.raises(ConfigError):
            AmbiguousTasks(5, 5, family=AmbiguousFamily(**bad))
    with pytest.raises(ConfigError, match="shots=0"):
        AmbiguousTasks(0, 5)


# -- learning -------------------------------------------------------------------------------------


def test_platipus_learns_sinusoids_in_seconds():
    """300 meta-steps of 10 tasks (Adam 3e-3, 1 draw per task): the MSE of the 10-model ensemble
    after 10 steps on K = 10 falls well below that of the un-meta-trained initialisation."""
    assert get_method("platipus") is PLATIPUS
    config = PLATIPUS.recipe("sinusoid").updated(meta_batch=10, lr=3e-3, samples=1, backend="vmap")
    torch.manual_seed(0)
    method = PLATIPUS(config)
    before = evaluate_regression(method, shots=10, tasks=200, steps=(10,))[0].mean
    tasks = PLATIPUS.task_sampler(config, "train")
    optimizer = method.make_optimizer()
    for _ in range(300):
        optimizer.zero_grad()
        _, metrics = method.meta_step(tasks.sample_batch(config.meta_batch))
        optimizer.step()
    assert math.isfinite(metrics["kl"]) and metrics["kl"] >= 0
    after = evaluate_regression(method, shots=10, tasks=200, steps=(10,))[0].mean
    assert after < 0.5 * before and after < 2.0, (before, after)


def test_the_ambiguous_recipe_trains():
    """One meta-step on the ambiguous tasks: the MLP regressor, every meta-parameter gets a
    finite gradient."""
    torch.manual_seed(0)
    config = PLATIPUS.recipe("ambiguous-regression").updated(meta_batch=3, backend="loop")
    method = PLATIPUS(config)
    assert method.regression and method.config.data == "ambiguous"
    loss, metrics = method.meta_step(PLATIPUS.task_sampler(config, "train").sample_batch(3))
    assert math.isfinite(loss) and metrics["kl"] > 0
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_resumed_run_draws_the_same_noise(tmp_path):
    """The training noise comes from torch's global RNG, which the trainer seeds and checkpoints:
    10 + 10 resumed episodes give the weights of 20 straight ones, bit for bit."""
    config = PLATIPUS.recipe("sinusoid").updated(
        episodes=20, meta_batch=4, hidden=16, samples=2, backend="vmap"
    )
    train("platipus", config.updated(episodes=10), tmp_path / "resumed", progress=False)
    train("platipus", config, tmp_path / "resumed", resume=True, progress=False)
    train("platipus", config, tmp_path / "straight", progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert a["episode"] == b["episode"] == 20 and "log_v_q.0" in a["model"]
    for key, value in a["model"].items():
        if key != "_extra_state":
            assert torch.equal(value, b["model"][key]), key
    first = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]["log_sigma.0"]
    assert not torch.equal(first, torch.full_like(first, math.log(config.init_std)))


# -- settings -------------------------------------------------------------------------------------


def test_recipes_and_bad_settings():
    maml = asdict(MAML.recipe("omniglot-5w1s"))
    ours = asdict(PLATIPUS.recipe("omniglot-5w1s"))
    assert {k: v for k, v in ours.items() if k in maml} == maml
    assert PLATIPUS.recipe("sinusoid").inner_lr == 0.01
    base = PLATIPUS.recipe("sinusoid")
    bad = (
        {"samples": 0},
        {"eval_samples": 0},
        {"kl_weight": -0.1},
        {"init_std": 0.0},
        {"posterior_data": "support"},
        {"learn_inner_lr": True},
        {"first_order": True},
        {"data": "cifar"},
    )
    for changes in bad:
        with pytest.raises(ConfigError) as error:
            PLATIPUS(base.updated(**changes))
        assert "\n" not in str(error.value), changes
    with pytest.raises(ValueError, match="backend"):
        meta_gradient(None, {}, (), (), {}, 1, 0.1, 0.0, backend="grad-of-vmap")

"""CNP / MR-CNP(A) / MR-CNP(W) (Yin et al. 2020) in float64: both KL terms are the Gaussian KLs of
torch.distributions, the Bayes-by-backprop layer reparameterises (its mean at zero noise, the
scale's gradient), a batch of tasks is the per-task computation, the loss's gradient matches
finite differences, the networks are the notebook's, predictions are seeded means, MR-CNP(A) beats
the memorising CNP on new NME tasks after seconds of training, and `metalab eval` writes the
notebook's test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from metalab.errors import ConfigError
from metalab.evaluate.memorization import evaluate_nme_sinusoid
from metalab.evaluate.run import evaluate_run
from metalab.methods import get_method
from metalab.methods.cnp import CNP, TEST_SET, gaussian_nll
from metalab.nets.bayes import BayesLinear, activation_kl
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.nme import NMESinusoidTasks
from metalab.train import train

F64 = torch.float64
RECIPES = {"none": "nme-sinusoid", "activation": "nme-sinusoid-a", "weights": "nme-sinusoid-w"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


def small_cnp(regularizer: str, **changes) -> CNP:
    """A float64 model of ``regularizer``'s recipe with 8 hidden units, its biases moved off
    zero (a zero bias behind a layer whose ReLUs are all off sits on a kink); for (W) the scales
    are raised to about 0.3 so that the noise matters."""
    torch.manual_seed(0)
    method = CNP(CNP.recipe(RECIPES[regularizer]).updated(hidden=8, **changes)).double()
    with torch.no_grad():
        for name, p in method.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
        if regularizer == "weights":
            for layer in method.encoder_w.layers:
                layer.rho.add_(2.0)
    return method


def nme_batch(tasks: int = 3, shots: int = 4, queries: int = 5) -> TaskBatch:
    batch = NMESinusoidTasks(shots, queries, seed=1).sample_batch(tasks)
    return TaskBatch(*(t.double() for t in batch.tensors()))


def loss_with(method: CNP, batch: TaskBatch, noise) -> torch.Tensor:
    mean, kl = method(batch.support_x, batch.support_y, batch.query_x, noise)
    return gaussian_nll(mean, batch.query_y, method.config.noise_scale) + method.config.beta * kl


# -- the KL terms and the BbB layer ---------------------------------------------------------------


def test_activation_kl_is_the_gaussian_kl_summed_over_dims_and_averaged_over_points():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 7, 5, generator=gen, dtype=F64)
    sigma = torch.rand(3, 7, 5, generator=gen, dtype=F64) + 0.1
    reference = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum(-1).mean()
    assert torch.allclose(activation_kl(mu, sigma), reference, rtol=1e-12, atol=1e-12)
    assert activation_kl(torch.zeros(4, 5, dtype=F64), torch.ones(4, 5, dtype=F64)).abs() < 1e-12


def test_bayes_layer_kl_is_the_closed_form_to_the_standard_normal():
    torch.manual_seed(0)
    layer = BayesLinear(4, 3, scale_init=-1.0).double()
    q = Normal(layer.loc, layer.scale())
    assert torch.allclose(layer.kl(), kl_divergence(q, Normal(0.0, 1.0)).sum(), rtol=1e-12)
    with torch.no_grad():
        layer.loc.zero_()
        layer.rho.fill_(math.log(math.e - 1))  # softplus = 1: q is the prior, up to TFP's eps
    assert layer.kl().abs() < 1e-6


def test_bayes_layer_reparameterises_its_kernel():
    """Zero noise gives the mean kernel (a plain dense layer); kernel = loc + scale * noise, so
    d kernel / d rho = noise * sigmoid(rho); many draws have mean loc and std scale."""
    torch.manual_seed(0)
    layer = BayesLinear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=F64)
    zero = torch.zeros(2, 4, 3, dtype=F64)
    assert torch.allclose(layer(x, layer.kernel(zero)), x @ layer.loc + layer.bias)
    noise = torch.randn(1, 4, 3, dtype=F64)
    layer.kernel(noise).sum().backward()
    assert torch.allclose(layer.rho.grad, noise[0] * torch.sigmoid(layer.rho))
    assert torch.allclose(layer.loc.grad, torch.ones_like(layer.loc))
    with torch.no_grad():
        draws = layer.kernel(torch.randn(20_000, 4, 3, dtype=F64))
    assert torch.allclose(draws.mean(0), layer.loc, atol=4 * 0.06 / math.sqrt(20_000))
    assert torch.allclose(draws.std(0), layer.scale(), rtol=0.05)


# -- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("regularizer", ["none", "activation", "weights"])
def test_a_batch_of_tasks_is_the_per_task_computation(regularizer):
    """The batched pass and the loss's gradient equal a plain loop over the tasks, each with its
    slice of the noise (its own BbB kernels for (W))."""
    method = small_cnp(regularizer)
    batch = nme_batch()
    noise = method.draw_noise(batch.tasks, 4, 5, torch.Generator().manual_seed(2))
    mean, kl = method(batch.support_x, batch.support_y, batch.query_x, noise)
    grads = torch.autograd.grad(loss_with(method, batch, noise), list(method.parameters()))
    looped = [torch.zeros_like(g) for g in grads]
    for t in range(batch.tasks):
        one = TaskBatch(*(x[t : t + 1] for x in batch.tensors()))
        mine = {k: n[t : t + 1] for k, n in noise.items()}
        mean_t, kl_t = method(one.support_x, one.support_y, one.query_x, mine)
        assert torch.allclose(mean_t[0], mean[t], atol=1e-12)
        if regularizer != "activation":  # (A)'s KL is a mean over every context point
            assert torch.allclose(kl_t, kl, atol=1e-12)
        g = torch.autograd.grad(loss_with(method, one, mine), list(method.parameters()))
        looped = [a + b / batch.tasks for a, b in zip(looped, g)]
    for g, h in zip(grads, looped):
        assert torch.allclose(g, h, atol=1e-10)


@pytest.mark.parametrize("regularizer", ["none", "activation", "weights"])
def test_the_loss_gradient_matches_finite_differences(regularizer):
    """The directional derivative of the whole loss (NLL + beta KL, fixed noise) along a random
    direction in every parameter tensor matches a central difference."""
    method = small_cnp(regularizer)
    batch = nme_batch()
    noise = method.draw_noise(batch.tasks, 4, 5, torch.Generator().manual_seed(3))
    params = dict(method.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss_with(method, batch, noise), params.values())))
    gen = torch.Generator().manual_seed(4)
    for name, p in params.items():
        direction = torch.randn(p.shape, generator=gen, dtype=F64)
        h = 1e-6
        with torch.no_grad():
            p.add_(h * direction)
            up = loss_with(method, batch, noise)
            p.sub_(2 * h * direction)
            down = loss_with(method, batch, noise)
            p.add_(h * direction)
        numeric = (up - down) / (2 * h)
        analytic = (grads[name] * direction).sum()
        assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-6), name


def test_the_networks_are_the_notebooks():
    """dim_r 10, dim_z 5, dim_w 5, hidden [100, 100]; the CNP encodes [x, y, one-hot] (22) and
    decodes [z, x*] (26), MR-CNP encodes [w, y] (6) and decodes [z, w*] (10); dense layers start
    at N(0, 0.05^2) with zero bias, the BbB scales near softplus(-3)."""
    torch.manual_seed(0)
    cnp = CNP(CNP.recipe("nme-sinusoid"))
    a = CNP(CNP.recipe("nme-sinusoid-a"))
    w = CNP(CNP.recipe("nme-sinusoid-w"))
    assert cnp.encoder_r.layers[0].in_features == 22 and cnp.decoder.layers[0].in_features == 26
    for m in (a, w):
        assert m.encoder_r.layers[0].in_features == 6 and m.decoder.layers[0].in_features == 10
    assert cnp.encoder_r.layers[-1].out_features == 10 and cnp.to_z.out_features == 5
    assert [layer.loc.shape for layer in w.encoder_w.layers] == [(21, 100), (100, 5)]
    assert a.encoder_w.mu.out_features == a.encoder_w.sigma.out_features == 5
    first = cnp.decoder.layers[0]
    assert abs(first.weight.std().item() - 0.05) < 0.005 and first.bias.abs().max() == 0
    scale = w.encoder_w.layers[0].scale()
    assert abs(scale.mean().item() - math.log1p(math.exp(-3))) < 0.005
    assert (a.config.beta, w.config.beta, cnp.config.beta) == (5.0, 0.15, 0.0)
    assert (cnp.config.episodes, a.config.episodes, w.config.episodes) == (30_000, 30_000, 120_000)
    assert cnp.config.shots == cnp.config.queries == 10 and cnp.config.meta_batch == 1


def test_predictions_are_seeded_means_of_draws():
    """The mean of eval_samples passes, their noise drawn in turn from a generator seeded with
    config.seed (so the same on every call); the CNP needs one pass."""
    method = small_cnp("activation", eval_samples=20)
    tasks = NMESinusoidTasks.test_set(3, 5, 30, **TEST_SET)[0]
    batch = TaskBatch(*(t.double() for t in tasks.tensors()))
    first, again = method.predict_tasks(batch), method.predict_tasks(batch)
    assert first.shape == (3, 30, 1) and torch.equal(first, again)
    generator = torch.Generator().manual_seed(method.config.seed)
    with torch.no_grad():
        passes = [
            method(*batch.tensors()[:3], method.draw_noise(3, 5, 30, generator))[0]
            for _ in range(20)
        ]
    assert torch.allclose(first, torch.stack(passes).mean(0), atol=1e-12)
    assert passes[0].sub(passes[1]).abs().max() > 1e-3  # the draws differ
    cnp = small_cnp("none", eval_samples=20)
    assert cnp.draws == 1 and cnp.protocol() == {"prediction": "mean of 1 draw"}
    one = cnp.predict(batch.support_x[1], batch.support_y[1], batch.query_x[1])
    assert torch.allclose(one, cnp.predict_tasks(batch)[1], atol=1e-12)


# -- learning -----------------------------------------------------------------------------------


def test_mr_cnp_a_beats_the_memorising_cnp_on_new_tasks():
    """1,500 steps of the notebook's recipes (about 4 s): the CNP fits its training tasks (MSE far
    below the zero predictor's) but not new ones, where MR-CNP(A) is several times better."""
    scores = {}
    for regularizer in ("none", "activation"):
        config = CNP.recipe(RECIPES[regularizer]).updated(eval_samples=10)
        torch.manual_seed(0)
        method = CNP(config)
        tasks = CNP.task_sampler(config, "train")
        optimizer = method.make_optimizer()
        for _ in range(1500):
            optimizer.zero_grad()
            method.meta_step(tasks.sample_batch(1))
            optimizer.step()
        seen = NMESinusoidTasks(5, 100, seed=7).sample_batch(200)
        train_mse = (method.predict_tasks(seen) - seen.query_y).square().mean().item()
        zero_mse = seen.query_y.square().mean().item()
        test = evaluate_nme_sinusoid(method.predict_tasks, {}, 200, 5, 100, **TEST_SET)
        scores[regularizer] = (train_mse, zero_mse, test[1].mean)
    cnp_train, zero, cnp_test = scores["none"]
    assert cnp_train < 0.1 * zero and cnp_test > 3 * cnp_train, scores
    assert scores["activation"][2] < 0.4 * cnp_test, scores


def test_train_and_eval_write_the_notebooks_test(tmp_path):
    """`metalab train` then `metalab eval`: four results (two errors, 5 and 10 context points)
    in eval.json, and the figure."""
    assert get_method("cnp") is CNP
    config = CNP.recipe("nme-sinusoid-w").updated(episodes=20, eval_samples=3)
    train("cnp", config, tmp_path / "run", progress=False)
    assert evaluate_run(tmp_path / "run", episodes=10) is None
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]
    found = {(r["protocol"]["shots"], r["protocol"]["metric"]) for r in rows}
    assert found == {(k, m) for k in (5, 10) for m in ("mse", "mse_clean")}
    for r in rows:
        p = r["protocol"]
        assert p["indices"] == "5..15" and p["prediction"] == "mean of 3 draws"
        assert p["queries"] == 100 and p["episodes"] == 10 and np.isfinite(r["mean"])
    assert (tmp_path / "run" / "nme_fits.png").stat().st_size > 10_000


def test_bad_settings_are_config_errors():
    base = CNP.recipe("nme-sinusoid")
    for changes in (
        {"regularizer": "dropout"},
        {"data": "sinusoid"},
        {"beta": -1.0},
        {"noise_scale": 0.0},
        {"dim_w": 0},
        {"eval_samples": 0},
    ):
        with pytest.raises(ConfigError):
            CNP(base.updated(**changes))
    with pytest.raises(ConfigError):
        CNP.recipe("sinusoid")

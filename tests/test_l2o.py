"""The learned optimizer of Andrychowicz et al. 2016 (metalab.methods.l2o), on real problems."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from metalab.errors import ConfigError
from metalab.evaluate.optimization import LR_GRID, baseline_curves, baseline_update
from metalab.methods.l2o import L2O, LearnedOptimizer, preprocess
from metalab.rundir import load_method
from metalab.tasks.optimization import get_family, make_problems, trajectory
from metalab.train import train


def _method(recipe: str = "quadratic", **changes) -> L2O:
    torch.manual_seed(0)
    return L2O(L2O.recipe(recipe).updated(**changes))


@pytest.mark.parametrize("recipe", ["quadratic", "mnist"])
def test_update_is_coordinatewise(one_thread, recipe):
    method = _method(recipe)
    grad = torch.randn(7) * 3
    state = torch.randn(method.config.layers, 2, 7, method.config.hidden_size)
    with torch.no_grad():
        update, new = method(grad, state)
        perm = torch.randperm(7)
        p_update, p_new = method(grad[perm], state[:, :, perm])
        more = torch.randn(5)
        more_state = torch.randn(method.config.layers, 2, 5, method.config.hidden_size)
        c_update, _ = method(torch.cat([grad, more]), torch.cat([state, more_state], dim=2))
    torch.testing.assert_close(p_update, update[perm])
    torch.testing.assert_close(p_new, new[:, :, perm])
    torch.testing.assert_close(c_update[:7], update)


def test_preprocess_matches_both_branches():
    k = 5.0
    grad = torch.tensor([3.0, -0.5, 1e-2, -7e-3, 1e-3, -2e-5, 0.0])
    out = preprocess(grad, k)
    for g, (a, b) in zip(grad.tolist(), out.tolist()):
        if abs(g) >= math.exp(-k):
            expected = (math.log(abs(g)) / k, math.copysign(1.0, g))
        else:
            expected = (-1.0, math.exp(k) * g)
        assert a == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
        assert b == pytest.approx(expected[1], rel=1e-5, abs=1e-6)
    paper = preprocess(torch.tensor([1e-4]), 10.0)  # p = 10: above e^-10, so the log branch
    assert paper[0, 0].item() == pytest.approx(math.log(1e-4) / 10, rel=1e-5)


def test_meta_gradient_reaches_phi_without_second_derivatives(one_thread):
    method = _method("quadratic", problems_per_draw=4)
    sampler = L2O.task_sampler(method.config, "train")
    inputs = []
    method.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    loss, metrics = method.meta_step(sampler.sample())
    assert math.isfinite(loss) and metrics["final_loss"] > 0
    assert len(inputs) == method.config.unroll
    assert all(g.grad_fn is None and not g.requires_grad for g in inputs)
    grads = [p.grad for p in method.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # The next unroll continues the same trajectory (theta and LSTM state carried, detached).
    carried = method._trajectory[1]
    assert not carried.requires_grad
    unroll = sampler.sample()
    assert unroll.start == method.config.unroll
    assert unroll.problems.key == method._trajectory[0]


def test_baselines_match_torch_optim():
    family = get_family("quadratic")
    problems = make_problems(family, "val", 0, range(3))
    for name, make in {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
        "nag": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    }.items():
        ours = baseline_curves(problems, name, [0.01], steps=10)[0]
        theta = problems.theta0.clone().requires_grad_(True)
        opt, reference = make([theta]), []
        for t in range(11):
            opt.zero_grad()
            loss = problems.loss(theta, t)
            reference.append(loss.detach())
            loss.sum().backward()
            opt.step()
        torch.testing.assert_close(ours, torch.stack(reference, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown baseline"):
        baseline_update("lbfgs", torch.ones(1, 1))


def test_short_meta_training_beats_untuned_sgd_on_quadratics(one_thread):
    method = _method("quadratic", problems_per_draw=32, lr=1e-2)
    sampler = L2O.task_sampler(method.config, "train")
    optimizer = method.make_optimizer()
    for _ in range(150):  # 30 trajectories of 5 unrolls, a few seconds
        optimizer.zero_grad()
        method.meta_step(sampler.sample())
        optimizer.step()
    test = make_problems(get_family("quadratic"), "test", 2016, range(128))
    lstm = method.curves(test)[:, -1].mean()
    sgd = baseline_curves(test, "sgd", [0.01])[0, :, -1].mean()
    assert lstm < sgd, (lstm.item(), sgd.item())


@pytest.mark.realdata
def test_short_meta_training_learns_to_optimise_real_mnist(one_thread, mnist_root):
    """Forty unrolls (eight 100-step trajectories) on real MNIST minibatches: the LSTM goes from
    near-zero steps (the sigmoid MLP stays at ln 10) to training fresh networks well below it."""
    method = _method("mnist", lr=3e-3)
    test = make_problems(get_family("mnist"), "test", 2016, range(4), mnist_root)
    untrained = method.curves(test)[:, -1].mean()
    sampler = L2O.task_sampler(method.config, "train", mnist_root)
    optimizer = method.make_optimizer()
    for _ in range(40):
        optimizer.zero_grad()
        loss, _ = method.meta_step(sampler.sample())
        assert math.isfinite(loss)
        optimizer.step()
    trained = method.curves(test)[:, -1].mean()
    assert untrained == pytest.approx(math.log(10), abs=0.05)
    assert trained < 1.2, (untrained.item(), trained.item())
    other = make_problems(get_family("mnist-2layer"), "test", 2016, range(2), mnist_root)
    assert method.curves(other, steps=3).isfinite().all()


def test_drop_in_optimizer_trains_a_module_and_survives_save_load(one_thread, tmp_path):
    config = L2O.recipe("quadratic").updated(
        problems_per_draw=16, episodes=100, val_every=50, val_episodes=16, lr=1e-2
    )
    train("l2o", config, tmp_path / "run", device="cpu", progress=False)
    method, saved = load_method(tmp_path / "run" / "best.pt", "l2o")
    assert saved["episode"] in (50, 100)

    torch.manual_seed(1)
    model = nn.Linear(10, 1)
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    opt = LearnedOptimizer(model.parameters(), method)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.state[model.weight]["lstm"].shape == (2, 2, 10, 20)

    # A second optimizer loaded from the first's state_dict takes exactly the same next step.
    twin_model = nn.Linear(10, 1)
    twin_model.load_state_dict(model.state_dict())
    reloaded, _ = load_method(tmp_path / "run" / "best.pt", "l2o")
    twin = LearnedOptimizer(twin_model.parameters(), reloaded)
    twin.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (twin_model, twin)):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
    torch.testing.assert_close(twin_model.weight, model.weight)


def test_trajectory_records_every_step():
    problems = make_problems(get_family("quadratic"), "test", 0, range(2))
    curves = trajectory(problems, 5, baseline_update("sgd", torch.full((2, 1), 1e-3)))
    assert curves.shape == (2, 6)
    assert (curves[:, -1] < curves[:, 0]).all()


def test_reproduce_writes_the_curves_and_the_table(one_thread, tmp_path, capsys):
    """`metalab reproduce l2o-quadratic`: meta-train, then the LSTM against the four tuned
    baselines on fixed test problems, as a PNG and eval.json (final loss with CIs, paired diffs)."""
    from metalab.cli import main

    run = tmp_path / "l2o"
    argv = ["reproduce", "l2o-quadratic", "--minutes", "0.05", "--episodes", "16"]
    assert main([*argv, "--run-dir", str(run), "--device", "cpu", "--no-progress"]) == 0
    assert (run / "l2o_quadratic.png").stat().st_size > 10_000
    results = json.loads((run / "eval.json").read_text())["results"]["quadratic"]
    assert set(results) == {"LSTM", "sgd", "rmsprop", "adam", "nag"}
    for name in ("sgd", "rmsprop", "adam", "nag"):
        assert results[name]["lr"] in LR_GRID
        for stat in ("step 100", "mean 1..100"):
            paired = results[name]["lstm_minus_this"][stat]
            assert math.isfinite(paired["mean"]) and paired["ci95"] > 0
    assert len(results["LSTM"]["mean_curve"]) == 101
    assert "LSTM − this" in capsys.readouterr().out


@pytest.mark.realdata
def test_moving_mnist_problems_copies_the_shared_images_once(mnist_root):
    """Every unroll is moved to the training device; the 60,000 images must travel only once."""
    family = get_family("mnist")
    first = make_problems(family, "train", 0, range(1), mnist_root).to("meta")
    second = make_problems(family, "train", 0, range(1, 3), mnist_root).to("meta")
    assert first.data["images"].device.type == "meta" and first.theta0.device.type == "meta"
    assert first.data["images"] is second.data["images"]
    assert first.data["labels"] is second.data["labels"]
    assert second.data["batches"].shape == (2, family.steps, 128)

"""GrBAL (metalab.rl.grbal): the meta-gradient through the online step equals a plain per-window
loop and finite differences in float64 (with a fixed and a learned psi), the controller really
adapts, and meta-training on simulator windows makes the one step pay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalab.rl.grbal import GrBAL, GrBALConfig
from metalab.rl.rollout import RandomController, Replay, rollout


def small(**changes) -> GrBAL:
    torch.manual_seed(0)
    config = GrBALConfig(hidden=16, layers=2, past=4, future=3, meta_batch=3, **changes)
    return GrBAL(config).double()


def windows(method: GrBAL, tasks: int = 3):
    g = torch.Generator().manual_seed(1)
    c, d_in = method.config, method.model.in_mean.numel()
    d_out = method.obs_dim
    make = lambda n, d: torch.randn(tasks, n, d, generator=g, dtype=torch.float64)  # noqa: E731
    return (make(c.past, d_in), make(c.past, d_out)), (make(c.future, d_in), make(c.future, d_out))


def loop_loss(method: GrBAL, params: dict, lr, support, query) -> torch.Tensor:
    """The meta-objective written out: per window one SGD step on the past M, loss on the next K,
    averaged (Nagabandi et al. 2019, Eqs. 3-4)."""
    total = 0.0
    for t in range(support[0].shape[0]):
        inner = method.model.loss(params, support[0][t], support[1][t])
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {
            n: p - (lr[n] if isinstance(lr, dict) else lr) * g
            for (n, p), g in zip(params.items(), grads)
        }
        total = total + method.model.loss(adapted, query[0][t], query[1][t])
    return total / support[0].shape[0]


@pytest.mark.parametrize("learn", [False, True])
def test_meta_gradient_equals_a_per_window_loop_in_float64(learn: bool) -> None:
    method = small(learn_inner_lr=learn, inner_lr=0.05)
    support, query = windows(method)
    result = method.meta_gradient(support, query)
    params = {n: p.detach().clone().requires_grad_() for n, p in method.model.params().items()}
    lr = method.inner_lr()
    if learn:
        lr = {n: r.detach().clone().requires_grad_() for n, r in lr.items()}
    loss = loop_loss(method, params, lr, support, query)
    leaves = list(params.values()) + (list(lr.values()) if learn else [])
    expected = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(result.loss, loss.detach(), rtol=1e-12, atol=1e-12)
    for g, e in zip(result.grads.values(), expected[: len(params)]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    if learn:
        for g, e in zip(result.lr_grads.values(), expected[len(params) :]):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_meta_gradient_matches_finite_differences() -> None:
    method = small(inner_lr=0.05)
    support, query = windows(method)
    result = method.meta_gradient(support, query)
    params = {n: p.detach().clone() for n, p in method.model.params().items()}
    name, eps = "layers.2.weight", 1e-6
    for index in [(0, 0), (3, 5), (7, 11)]:
        shifted = []
        for sign in (1, -1):
            p = {n: v.clone() for n, v in params.items()}
            p[name][index] += sign * eps
            p = {n: v.requires_grad_() for n, v in p.items()}
            with torch.enable_grad():
                shifted.append(loop_loss(method, p, 0.05, support, query).item())
        numeric = (shifted[0] - shifted[1]) / (2 * eps)
        assert abs(result.grads[name][index].item() - numeric) < 1e-7 * max(1, abs(numeric))


def test_the_online_step_moves_the_model_toward_the_recent_transitions() -> None:
    method = GrBAL(GrBALConfig(hidden=32, inner_lr=0.05))
    env = method.family.make(method.config.frame_skip)
    traj = rollout(env, RandomController(env.action_space.low, env.action_space.high,
                                         np.random.default_rng(0)), 40, method.family.sample_train(
                                             np.random.default_rng(0)), seed=0)  # fmt: skip
    method.model.set_statistics(*Replay([traj]).transitions())
    starts = np.array([20, 30])
    adapted = method.predict_ahead(traj, starts, 1, adapt=True)[:, 0]
    fixed = method.predict_ahead(traj, starts, 1, adapt=False)[:, 0]
    assert not np.allclose(adapted, fixed)
    # The step is taken on the 16 transitions before each start: their loss goes down.
    controller = method.controller(torch.Generator().manual_seed(0), adapt=True)
    for t in range(20):
        controller.observe(traj.obs[t], traj.actions[t], traj.obs[t + 1])
    obs, actions, next_obs = (torch.as_tensor(a[4:20]) for a in (traj.obs, traj.actions,
                                                                  traj.obs[1:]))  # fmt: skip
    x, y = method.model.encode(obs, actions, next_obs)
    before = method.model.loss(method.model.params(), x, y).item()
    after = method.model.loss(controller.current_params(), x, y).item()
    assert after < before


def test_meta_training_makes_the_online_step_pay_on_held_out_rollouts() -> None:
    """Random rollouts of the cheetah with a different disabled joint each: after GrBAL's fit
    (learned psi), the future loss after the step on the past is below the loss without it on
    windows of rollouts it never trained on, by more than twice the paired standard error."""
    config = GrBALConfig(hidden=32, epochs=30, patience=30, learn_inner_lr=True, seed=0)
    torch.manual_seed(0)
    method = GrBAL(config)
    env = method.family.make(config.frame_skip)
    rng = np.random.default_rng(0)
    random = RandomController(env.action_space.low, env.action_space.high, rng)

    def collect(n: int) -> Replay:
        return Replay([
            rollout(env, random, 100, method.family.sample_train(rng), int(rng.integers(1 << 30)))
            for _ in range(n)
        ])  # fmt: skip

    train, test = collect(10), collect(4)
    method.fit(train, method.make_optimizer(), np.random.default_rng(0))
    x, y = method.model.encode(*map(torch.as_tensor, test.transitions()))
    support, query = method.windows(x, y, test.windows(32)[::4])
    adapted = method.meta_gradient(support, query).metrics["mse"]
    with torch.no_grad():
        unadapted = torch.stack([
            method.model.loss(method.model.params(), qx, qy) for qx, qy in zip(*query)
        ])  # fmt: skip
    gain = unadapted - adapted
    assert gain.mean() > 2 * gain.std() / len(gain) ** 0.5, (gain.mean(), gain.std())

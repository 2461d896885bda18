"""Planners (metalab.rl.mpc) under known models: random shooting executes the first action of the
best candidate, the CEM finds a target a random search misses, and returns add up as written."""

from __future__ import annotations

import torch

from metalab.rl.mpc import cem, random_shooting, sequence_returns


def integrator(state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """s' = s + a (a known model)."""
    return state + action


def closeness(target: torch.Tensor):
    """Reward: minus the squared distance of the next state to ``target``."""
    return lambda s, a, s2: -((s2 - target) ** 2).sum(-1)


def test_sequence_returns_sum_rewards_along_the_model() -> None:
    obs = torch.tensor([1.0, -1.0], dtype=torch.float64)
    actions = torch.randn(7, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = sequence_returns(
        integrator, lambda s, a, s2: s2[:, 0] - 0.1 * (a**2).sum(-1), obs, actions
    )
    states = obs + actions.cumsum(1)  # the integrator's states after each step
    expected = states[..., 0].sum(1) - 0.1 * (actions**2).sum((1, 2))
    torch.testing.assert_close(got, expected)


def test_random_shooting_executes_the_first_action_of_the_best_sequence() -> None:
    low, high = -torch.ones(2), torch.ones(2)
    obs, target = torch.zeros(2), torch.tensor([0.7, -0.4])
    reward = closeness(target)
    action = random_shooting(
        integrator, reward, obs, low, high, torch.Generator().manual_seed(3), 64, 3
    )
    # The same candidates, drawn again from the same generator state, scored by hand.
    u = torch.rand(64, 3, 2, generator=torch.Generator().manual_seed(3))
    candidates = low + (high - low) * u
    scores = torch.stack(
        [sum(reward(obs + c[: h + 1].sum(0), c[h], obs + c[: h + 1].sum(0)) for h in range(3))
         for c in candidates]
    )  # fmt: skip
    torch.testing.assert_close(action, candidates[scores.argmax(), 0])
    assert torch.all(action >= low) and torch.all(action <= high)


def test_cem_beats_random_shooting_with_the_same_samples() -> None:
    """Ten-dimensional actions, a target at the edge of the box: 5 x 100 CEM samples get nearer
    than 500 uniform ones (the point of refitting the sampling distribution)."""
    low, high = -torch.ones(10), torch.ones(10)
    obs, target = torch.zeros(10), 0.9 * torch.ones(10)
    reward = closeness(target)
    gaps = {}
    for name, planner, kwargs in (
        ("random", random_shooting, {"candidates": 500}),
        ("cem", cem, {"candidates": 100, "iterations": 5, "elites": 0.1}),
    ):
        action = planner(
            integrator, reward, obs, low, high, torch.Generator().manual_seed(0),
            horizon=1, **kwargs,
        )  # fmt: skip
        gaps[name] = (action - target).norm().item()
    assert gaps["cem"] < 0.5 * gaps["random"], gaps

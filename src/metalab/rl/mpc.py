"""Model-predictive control with a learned model: random shooting and the cross-entropy method.

At every environment step the planner scores ``candidates`` action sequences of ``horizon``
steps by the return they earn under the model (rewards computed from the predicted states, as
in Nagabandi et al. 2018/2019), executes the first action of the best, and plans again at the
next step. ``step(obs, actions) -> next_obs`` is the model, batched over candidates;
``reward(obs, actions, next_obs) -> (N,)`` the task's reward from states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sequence_returns(
    step: Step, reward: Reward, obs: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    """The predicted return of each action sequence ``(N, H, a)`` from ``obs`` ``(d,)``: ``(N,)``."""
    state = obs.expand(actions.shape[0], -1)
    total = torch.zeros(actions.shape[0], dtype=obs.dtype, device=obs.device)
    for h in range(actions.shape[1]):
        next_state = step(state, actions[:, h])
        total += reward(state, actions[:, h], next_state)
        state = next_state
    return total


def _uniform(
    n: int, horizon: int, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    u = torch.rand(n, horizon, low.numel(), generator=generator, dtype=low.dtype)
    return low + (high - low) * u.to(low.device)


@torch.no_grad()
def random_shooting(
    step: Step,
    reward: Reward,
    obs: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    generator: torch.Generator,
    candidates: int = 500,
    horizon: int = 10,
) -> torch.Tensor:
    """The first action of the best of ``candidates`` uniformly random sequences: ``(a,)``."""
    actions = _uniform(candidates, horizon, low, high, generator)
    returns = sequence_returns(step, reward, obs, actions)
    return actions[returns.argmax(), 0]


@torch.no_grad()
def cem(
    step: Step,
    reward: Reward,
    obs: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    generator: torch.Generator,
    candidates: int = 500,
    horizon: int = 10,
    iterations: int = 5,
    elites: float = 0.1,
) -> torch.Tensor:
    """The cross-entropy method: sample sequences from a diagonal Gaussian (first from the
    uniform box), refit the Gaussian to the top ``elites`` fraction, ``iterations`` times; the
    first action of the best sequence seen."""
    n_elite = max(1, round(elites * candidates))
    mean = std = None  # the sampling distribution, refitted after each round
    best, best_return = None, -torch.inf
    for _ in range(iterations):
        if mean is None:
            actions = _uniform(candidates, horizon, low, high, generator)
        else:
            noise = torch.randn(candidates, *mean.shape, generator=generator, dtype=low.dtype)
            actions = torch.clamp(mean + std * noise.to(low.device), low, high)
        returns = sequence_returns(step, reward, obs, actions)
        top = returns.topk(n_elite).indices
        if returns[top[0]] > best_return:
            best, best_return = actions[top[0]], returns[top[0]]
        mean, std = actions[top].mean(0), actions[top].std(0, unbiased=False) + 1e-3
    return best[0]


PLANNERS = {"random": random_shooting, "cem": cem}

"""A compact PPO (Schulman et al. 2017, "Proximal policy optimization algorithms"): the inner-loop
learner of meta-learned curiosity (Alet et al. 2020 run ikostrikov's PPO; this is our own, with
the same pieces: clipped surrogate, GAE, value loss, minibatch epochs, gradient clipping).

``PPO.act`` samples actions for a batch of observations; ``PPO.update`` takes one rollout
(``Rollout``: T steps of N environments) and runs ``epochs`` passes of ``minibatches`` clipped
updates. Discrete action spaces get a categorical policy, boxes a diagonal Gaussian with a
state-independent log standard deviation, both on tanh MLPs with separate actor and critic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal


@dataclass
class PPOSettings:
    lr: float = 2.5e-4  # Adam
    clip: float = 0.1  # epsilon of the clipped surrogate (Eq. 7)
    epochs: int = 4  # passes over each rollout
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    entropy: float = 0.0  # entropy bonus coefficient (the curiosity paper: 0)
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64


def _mlp(n_in: int, n_out: int, hidden: int, out_gain: float) -> nn.Sequential:
    layers = [nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()]
    net = nn.Sequential(*layers, nn.Linear(hidden, n_out))
    for layer in net:
        if isinstance(layer, nn.Linear):  # orthogonal init, as in the PPO baselines
            gain = out_gain if layer is net[-1] else np.sqrt(2)
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
    return net


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs; ``discrete``: logits over ``act_dim`` actions, else the
    mean of a Gaussian with a learned, state-independent log standard deviation."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: int) -> None:
        super().__init__()
        self.discrete = discrete
        self.actor = _mlp(obs_dim, act_dim, hidden, 0.01)
        self.critic = _mlp(obs_dim, 1, hidden, 1.0)
        self.log_std = nn.Parameter(torch.zeros(act_dim), requires_grad=not discrete)

    def distribution(self, obs: torch.Tensor) -> Distribution:
        out = self.actor(obs)
        if self.discrete:
            return Categorical(logits=out)
        return Normal(out, self.log_std.exp())

    def log_prob(self, dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        logp = dist.log_prob(actions)
        return logp if self.discrete else logp.sum(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)


@dataclass
class Rollout:
    """T steps of N environments: ``obs[t]`` is where ``actions[t]`` was taken; ``rewards[t]``
    is the reward the learner sees (already combined and normalised); ``dones[t]`` ends the
    episode after step t (terminal: no bootstrap; truncations are bootstrapped in the reward)."""

    obs: torch.Tensor  # (T, N, obs_dim)
    actions: torch.Tensor  # (T, N) or (T, N, act_dim)
    log_probs: torch.Tensor  # (T, N)
    values: torch.Tensor  # (T, N)
    rewards: torch.Tensor  # (T, N)
    dones: torch.Tensor  # (T, N) float
    last_value: torch.Tensor  # (N,) V(obs after the last step)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates (Schulman et al. 2016, Eq. 16) and the value targets."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(rewards.shape[0])):
        keep = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * keep - values[t]
        running = delta + gamma * lam * keep * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


class PPO:
    """The agent and its optimizer. ``generator`` draws the actions and the minibatch order."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        discrete: bool,
        settings: PPOSettings,
        generator: torch.Generator,
    ) -> None:
        self.settings, self.generator = settings, generator
        self.net = ActorCritic(obs_dim, act_dim, discrete, settings.hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=settings.lr, eps=1e-5)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled actions, their log-probabilities and the values of ``obs`` (N, obs_dim)."""
        dist = self.net.distribution(obs)
        if self.net.discrete:
            probs = dist.probs
            actions = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        else:
            noise = torch.randn(dist.mean.shape, generator=self.generator)
            actions = dist.mean + dist.stddev * noise
        return actions, self.net.log_prob(dist, actions), self.net.value(obs)

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net.value(obs)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """``epochs`` passes of clipped-surrogate updates over ``minibatches`` shuffled slices."""
        s = self.settings
        advantages, returns = gae(
            rollout.rewards, rollout.values, rollout.dones, rollout.last_value, s.gamma,
            s.gae_lambda,
        )  # fmt: skip
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        obs, actions, old_logp = flat(rollout.obs), flat(rollout.actions), flat(rollout.log_probs)
        advantages, returns = flat(advantages), flat(returns)
        n = obs.shape[0]
        size = max(1, n // s.minibatches)
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0}
        updates = 0
        for _ in range(s.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n - size + 1, size):
                idx = order[start : start + size]
                adv = advantages[idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(idx) > 1 else adv
                dist = self.net.distribution(obs[idx])
                ratio = (self.net.log_prob(dist, actions[idx]) - old_logp[idx]).exp()
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - s.clip, 1 + s.clip) * adv)
                policy_loss = -surrogate.mean()  # Eq. 7
                value_loss = (self.net.value(obs[idx]) - returns[idx]).pow(2).mean()
                entropy = (
                    dist.entropy().mean() if self.net.discrete else dist.entropy().sum(-1).mean()
                )
                loss = policy_loss + s.value_coef * value_loss - s.entropy * entropy
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), s.max_grad_norm)
                self.optimizer.step()
                stats["policy_loss"] += policy_loss.item()
                stats["value_loss"] += value_loss.item()
                stats["entropy"] += entropy.item()
                updates += 1
        return {k: v / max(updates, 1) for k, v in stats.items()}

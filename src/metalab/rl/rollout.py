"""Rollouts and the replay that aggregates them.

A :class:`Trajectory` is one rollout of a controller in a perturbed environment (numpy arrays,
``T`` steps). :class:`Replay` keeps every trajectory a run has collected (the model-based methods
aggregate all their data, Nagabandi et al. 2019, Alg. 1) and cuts it into transitions or into
windows of consecutive steps for the meta-learners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from metalab.rl.envs import Perturbation, PerturbedEnv


class Controller(Protocol):
    """What :func:`rollout` drives: ``reset`` before an episode, ``act`` on each observation and
    ``observe`` each transition (online adaptation reads it; most controllers ignore it)."""

    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None: ...


class RandomController:
    """Uniform random actions in the action box, from its own generator."""

    def __init__(self, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> None:
        self.low, self.high, self.rng = low, high, rng

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        pass


@dataclass
class Trajectory:
    """One rollout: ``obs`` ``(T+1, d)``, ``actions`` ``(T, a)``, ``rewards`` ``(T,)`` and the
    perturbed part in force at each step, ``parts`` ``(T,)`` (-1: intact)."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    parts: np.ndarray
    condition: str = ""

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def total(self) -> float:
        """The return: the sum of the rewards."""
        return float(self.rewards.sum())


def rollout(
    env: PerturbedEnv,
    controller: Controller,
    steps: int,
    perturbation: Perturbation,
    seed: int,
    condition: str = "",
) -> Trajectory:
    """Run ``controller`` for ``steps`` steps from a reset with ``seed`` under ``perturbation``."""
    obs, _ = env.reset(seed=seed, options={"perturbation": perturbation})
    controller.reset()
    observations, actions, rewards, parts = [obs], [], [], []
    for _ in range(steps):
        action = np.asarray(controller.act(obs), dtype=np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        controller.observe(obs, action, next_obs)
        observations.append(next_obs)
        actions.append(action)
        rewards.append(reward)
        parts.append(-1 if info.get("part") is None else info["part"])
        obs = next_obs
        if terminated:  # our task families never terminate; a user's might
            break
    return Trajectory(
        np.asarray(observations, dtype=np.float32),
        np.asarray(actions, dtype=np.float32),
        np.asarray(rewards, dtype=np.float64),
        np.asarray(parts, dtype=np.int64),
        condition,
    )


@dataclass
class Replay:
    """Every trajectory of a run, in the order collected."""

    trajectories: list[Trajectory] = field(default_factory=list)

    def add(self, trajectory: Trajectory) -> None:
        self.trajectories.append(trajectory)

    def __len__(self) -> int:
        """The number of transitions."""
        return sum(len(t) for t in self.trajectories)

    def transitions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All transitions: ``obs`` ``(n, d)``, ``actions`` ``(n, a)``, ``next_obs`` ``(n, d)``."""
        return (
            np.concatenate([t.obs[:-1] for t in self.trajectories]),
            np.concatenate([t.actions for t in self.trajectories]),
            np.concatenate([t.obs[1:] for t in self.trajectories]),
        )

    def windows(self, length: int) -> np.ndarray:
        """Where every window of ``length`` consecutive transitions inside one trajectory starts,
        as indices into :meth:`transitions` ``(w,)``."""
        starts, offset = [], 0
        for t in self.trajectories:
            if len(t) >= length:
                starts.append(offset + np.arange(len(t) - length + 1))
            offset += len(t)
        return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)

    def state(self) -> list[dict]:
        """Plain arrays for a checkpoint."""
        return [vars(t).copy() for t in self.trajectories]

    @classmethod
    def from_state(cls, state: list[dict]) -> Replay:
        return cls([Trajectory(**t) for t in state])

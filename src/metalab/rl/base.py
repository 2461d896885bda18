"""What every model-based meta-RL method is: a config with the shared collect-fit loop's settings,
and an ``nn.Module`` that fits its model to the replay, controls the robot, and predicts ahead.

The loop itself (:mod:`metalab.rl.train`): random rollouts, then ``iterations`` times fit the
model to everything collected and collect ``rollouts`` more with the controller (Nagabandi et al.
2019, Alg. 1 and 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from metalab.config import Settings, recipe_of
from metalab.rl.envs import TaskFamily, get_task
from metalab.rl.rollout import Controller, Replay, Trajectory


@dataclass
class RLConfig(Settings):
    """Settings every model-based RL method shares. Method configs subclass it."""

    task: str = "cheetah-joint"  # cheetah-joint | ant-leg | cheetah-damping | cheetah-mass: the task family (metalab.rl.envs)
    frame_skip: int = 5  # physics steps per environment step (the paper: 1 at dt 0.01)
    episode_steps: int = 200  # environment steps per rollout
    random_rollouts: int = 10  # iteration 0: rollouts of uniformly random actions
    iterations: int = 8  # then: fit the model, collect `rollouts` with the controller, this often
    rollouts: int = 4  # controller rollouts per iteration
    hidden: int = 256  # width of the dynamics model's hidden layers
    layers: int = 2  # hidden layers
    lr: float = 1e-3  # Adam, for the model
    epochs: int = 50  # most model epochs per iteration (early stopping on the validation split)
    patience: int = 10  # epochs without a better validation loss before stopping
    val_fraction: float = 0.1  # trajectories held out from fitting to stop early
    planner: str = "random"  # random | cem: random shooting or the cross-entropy method
    candidates: int = 500  # action sequences per planning step
    plan_horizon: int = 10  # steps of each sequence
    cem_iterations: int = 5
    cem_elites: float = 0.1  # fraction of the CEM candidates refitted to
    past: int = 16  # M: the recent transitions the model adapts on
    inner_lr: float = 1e-3  # psi: the step size of the online gradient step
    online_adapt: bool = False  # adapt the model online at every step (MB+DE, GrBAL)
    test_rollouts: int = 10  # per test condition, for `metalab eval`
    seed: int = 0


class RLMethod(nn.Module):
    """Base class of the model-based meta-RL methods (one file each)."""

    name: ClassVar[str]
    Config: ClassVar[type[RLConfig]] = RLConfig
    recipes: ClassVar[dict[str, RLConfig]] = {}
    # Config fields that change only how a trained model acts (`metalab eval --test-time`).
    test_time: ClassVar[tuple[str, ...]] = (
        "planner", "candidates", "plan_horizon", "cem_iterations", "past", "inner_lr",
    )  # fmt: skip

    def __init__(self, config: RLConfig) -> None:
        super().__init__()
        self.config = config
        self.family: TaskFamily = get_task(config.task)
        env = self.family.make(config.frame_skip)
        self.obs_dim = env.observation_space.shape[0]
        self.act_dim = env.action_space.shape[0]
        self.dt = float(env.dt)
        self.low = torch.as_tensor(env.action_space.low, dtype=torch.float32)
        self.high = torch.as_tensor(env.action_space.high, dtype=torch.float32)
        env.close()

    @classmethod
    def recipe(cls, name: str) -> RLConfig:
        """The paper's (or our documented) settings by name."""
        return recipe_of(cls, name)

    def fit(
        self, replay: Replay, optimizer: torch.optim.Optimizer, rng: np.random.Generator
    ) -> dict[str, float]:
        """Train the model on everything in ``replay`` (warm-started from the last fit, with the
        run's optimizer); return metrics for the log."""
        raise NotImplementedError

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.lr)

    def controller(self, generator: torch.Generator, adapt: bool | None = None) -> Controller:
        """The MPC controller with this model (adapting online when ``adapt``; None: the
        config's ``online_adapt``)."""
        raise NotImplementedError

    def predict_ahead(
        self, trajectory: Trajectory, starts: np.ndarray, k: int, adapt: bool | None = None
    ) -> np.ndarray:
        """Open-loop predictions of the states ``1..k`` steps after each step in ``starts``
        given the actions taken, after adapting to the transitions before it (as the
        controller would at that step): ``(len(starts), k, d)``."""
        raise NotImplementedError

    def eval_rows(self) -> list[tuple[str, bool | None]]:
        """The rows ``metalab eval`` reports: (label, adapt), e.g. MB and MB+DE for one model."""
        return [(self.name, None)]

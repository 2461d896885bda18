"""The learned dynamics model shared by MB, MB+DE and GrBAL, and its MPC controller.

The network predicts the normalised state change: ``f(z(s), z(a)) -> z(s' - s)``, where ``z``
standardises each dimension with statistics of the data it was fitted on (Nagabandi et al. 2018,
Sec. IV; the code recomputes them before each fit). The absolute position (``family.model_input``
leaves it out) is not an input, so the model does not depend on where the robot is. Parameters are
a dict of tensors called through ``functional_call``, so that the online adaptation step of MB+DE
and GrBAL is :func:`metalab.functional.inner.adapt` on the last ``M`` transitions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalab.functional.inner import Params, adapt
from metalab.nets.mlp import MLP
from metalab.rl.envs import TaskFamily
from metalab.rl.mpc import PLANNERS
from metalab.rl.rollout import Replay, Trajectory


class Standardised(nn.Module):
    """Standardisation of a dynamics model's inputs ``(z(s[inputs]), z(a))`` and target
    ``z(s' - s)`` with statistics of the data it is fitted on, kept as buffers (saved with the
    model, not trained). Shared by :class:`DynamicsMLP` and ReBAL's recurrent model."""

    def _statistics(self, obs_dim: int, act_dim: int, inputs: slice) -> int:
        """Register the buffers; returns the number of network inputs."""
        self.inputs = inputs
        n_in = len(range(obs_dim)[inputs]) + act_dim
        self.register_buffer("in_mean", torch.zeros(n_in))
        self.register_buffer("in_std", torch.ones(n_in))
        self.register_buffer("out_mean", torch.zeros(obs_dim))
        self.register_buffer("out_std", torch.ones(obs_dim))
        return n_in

    def set_statistics(self, obs: np.ndarray, actions: np.ndarray, next_obs: np.ndarray) -> None:
        """Standardise with the mean and sd of these transitions (sd floored at 1e-6)."""
        x = np.concatenate([obs[:, self.inputs], actions], axis=1)
        y = next_obs - obs
        for name, value in (
            ("in_mean", x.mean(0)),
            ("in_std", x.std(0) + 1e-6),
            ("out_mean", y.mean(0)),
            ("out_std", y.std(0) + 1e-6),
        ):
            getattr(self, name).copy_(torch.as_tensor(value))

    def encode(
        self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network input ``z(s), z(a)`` and target ``z(s' - s)`` (None without ``next_obs``)."""
        x = (torch.cat([obs[..., self.inputs], actions], -1) - self.in_mean) / self.in_std
        y = None if next_obs is None else (next_obs - obs - self.out_mean) / self.out_std
        return x, y


class DynamicsMLP(Standardised):
    """An MLP on standardised inputs predicting the standardised state change.

    Args:
        obs_dim, act_dim: the environment's.
        inputs: the observation dimensions the network sees (``family.model_input``).
        hidden, layers: the MLP's width and depth.
    """

    def __init__(self, obs_dim: int, act_dim: int, inputs: slice, hidden: int, layers: int):
        super().__init__()
        n_in = self._statistics(obs_dim, act_dim, inputs)
        self.net = MLP((n_in, *[hidden] * layers, obs_dim))

    def params(self) -> Params:
        return dict(self.net.named_parameters())

    def encode(
        self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network input ``z(s), z(a)`` and target ``z(s' - s)`` (None without ``next_obs``)."""
        x = (torch.cat([obs[..., self.inputs], actions], -1) - self.in_mean) / self.in_std
        y = None if next_obs is None else (next_obs - obs - self.out_mean) / self.out_std
        return x, y

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean squared error on standardised state changes (the training and inner loss)."""
        return F.mse_loss(functional_call(self.net, params, (x,)), y)

    def step(self, params: Params, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The predicted next state ``s + f(...)`` in the environment's units, batched."""
        x, _ = self.encode(obs, actions)
        return obs + functional_call(self.net, params, (x,)) * self.out_std + self.out_mean

    def adapted(
        self, params: Params, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor,
        lr: float | Params, steps: int = 1,
    ) -> Params:  # fmt: skip
        """``params`` after ``steps`` gradient steps on these transitions (GrBAL's inner update,
        Nagabandi et al. 2019, Eq. 3; MB+DE's dynamic evaluation)."""
        x, y = self.encode(obs, actions, next_obs)
        return adapt(params, self.loss, (x, y), steps, lr)


class MPCController:
    """Plans every step with a dynamics model; with ``adapt``, first takes the model's online
    step on the last ``past`` transitions of this rollout (from the meta-learned or fitted
    parameters each time, not cumulatively: Nagabandi et al. 2019, Alg. 2)."""

    def __init__(
        self,
        model: DynamicsMLP,
        family: TaskFamily,
        dt: float,
        low: torch.Tensor,
        high: torch.Tensor,
        generator: torch.Generator,
        plan: dict,
        adapt: Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], Params] | None,
        past: int,
    ) -> None:
        self.model, self.family, self.dt = model, family, dt
        self.low, self.high, self.generator = low, high, generator
        self.planner = PLANNERS[plan.pop("planner")]
        self.plan = plan
        self.adapt, self.past = adapt, past
        self.params = {n: p.detach() for n, p in model.params().items()}
        self.history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def reset(self) -> None:
        self.history = []

    def current_params(self) -> Params:
        """The parameters to plan with now: adapted to the recent transitions, or as fitted."""
        if self.adapt is None or not self.history:
            return self.params
        recent = self.history[-self.past :]
        obs, actions, next_obs = (torch.as_tensor(np.stack(col)) for col in zip(*recent))
        with torch.enable_grad():
            adapted = self.adapt(self.params, obs, actions, next_obs)
        return {n: p.detach() for n, p in adapted.items()}

    def act(self, obs: np.ndarray) -> np.ndarray:
        params = self.current_params()
        action = self.planner(
            lambda s, a: self.model.step(params, s, a),
            lambda s, a, s2: self.family.reward(s, a, s2, self.dt),
            torch.as_tensor(obs, dtype=torch.float32),
            self.low,
            self.high,
            self.generator,
            **self.plan,
        )
        return action.numpy()

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        self.history.append((obs.astype(np.float32), action, next_obs.astype(np.float32)))


def plan_settings(config) -> dict:
    """The planner's keyword arguments from an RL config."""
    plan = {"planner": config.planner, "candidates": config.candidates}
    plan["horizon"] = config.plan_horizon
    if config.planner == "cem":
        plan.update(iterations=config.cem_iterations, elites=config.cem_elites)
    return plan


def predict_ahead(
    model: DynamicsMLP,
    params: Params,
    trajectory: Trajectory,
    starts: np.ndarray,
    k: int,
    adapt: Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], Params] | None,
    past: int,
) -> np.ndarray:
    """``k``-step open-loop predictions from each step in ``starts`` with the actions taken,
    after adapting on the ``past`` transitions before it when ``adapt`` is given:
    ``(len(starts), k, d)``."""
    obs = torch.as_tensor(trajectory.obs)
    actions = torch.as_tensor(trajectory.actions)
    out = []
    for t in starts:
        p = params
        if adapt is not None and t > 0:
            lo = max(0, t - past)
            with torch.enable_grad():
                p = adapt(params, obs[lo:t], actions[lo:t], obs[lo + 1 : t + 1])
        state, path = obs[t], []
        with torch.no_grad():
            for j in range(k):
                state = model.step(p, state[None], actions[t + j][None])[0]
                path.append(state)
        out.append(torch.stack(path))
    return torch.stack(out).numpy()


def hold_out(replay: Replay, fraction: float, rng: np.random.Generator) -> tuple[Replay, Replay]:
    """The rollouts to fit on and those held out (``fraction`` of them, at least one when there
    are two or more) to stop early; with nothing held out, the second is the first."""
    n = len(replay.trajectories)
    held = np.zeros(n, dtype=bool)
    if n >= 2 and fraction > 0:
        held[rng.choice(n, max(1, round(fraction * n)), replace=False)] = True
    train = Replay([t for t, h in zip(replay.trajectories, held) if not h])
    val = Replay([t for t, h in zip(replay.trajectories, held) if h])
    return train, val if held.any() else train


class EarlyStopping:
    """Keeps the parameters of the best validation loss; says stop after ``patience`` epochs
    without improvement."""

    def __init__(self, module: nn.Module, patience: int) -> None:
        self.module, self.patience = module, patience
        self.best, self.bad, self.state = float("inf"), 0, None
        self.epochs = 0

    def update(self, val_loss: float) -> bool:
        """Record an epoch's validation loss; True: stop now."""
        self.epochs += 1
        if val_loss < self.best:
            self.best, self.bad = val_loss, 0
            self.state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> None:
        if self.state is not None:
            self.module.load_state_dict(self.state)

"""MB and MB+DE: model-based control with a dynamics model fitted by plain regression, the
baselines of Nagabandi, Clavera et al. (2019, Sec. 6).

MB fits :class:`~metalab.rl.dynamics.DynamicsMLP` to all transitions collected so far by minibatch
Adam on the standardised state changes, and plans with it unchanged (Nagabandi et al. 2018). MB+DE
("dynamic evaluation") is the same trained model with the same online gradient step as GrBAL at
test time; ``metalab eval`` reports both rows for one MB run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metalab.rl.base import RLConfig, RLMethod
from metalab.rl.dynamics import (
    DynamicsMLP,
    EarlyStopping,
    MPCController,
    hold_out,
    plan_settings,
    predict_ahead,
)
from metalab.rl.rollout import Replay, Trajectory


@dataclass
class MBConfig(RLConfig):
    batch: int = 128  # transitions per Adam step


class MB(RLMethod):
    """MB / MB+DE: a dynamics model fitted by regression and MPC, with (MB+DE) or without (MB)
    an online gradient step on the last M transitions (Nagabandi et al. 2018; 2019, Sec. 6)."""

    name = "mb"
    Config = MBConfig
    recipes = {
        # Our CPU protocol (the shared NEXT-WAVE notes, Sec. 6): dt 0.05, 200-step episodes,
        # 10 random + 8 x 4 controller rollouts (8,400 transitions), 2 x 256 for every method.
        "cheetah-cpu": MBConfig(),
        "ant-cpu": MBConfig(task="ant-leg"),
        # The code's run_mb_mpc.py: 2 x 512, 2000 candidates x horizon 20, 10 rollouts of 100
        # steps per iteration, 50 iterations, at dt 0.01 (frame skip 1).
        "cheetah": MBConfig(
            frame_skip=1,
            episode_steps=100,
            random_rollouts=10,
            iterations=50,
            rollouts=10,
            hidden=512,
            epochs=100,
            candidates=2000,
            plan_horizon=20,
        ),  # fmt: skip
        "ant": MBConfig(
            task="ant-leg",
            frame_skip=1,
            episode_steps=100,
            random_rollouts=10,
            iterations=50,
            rollouts=10,
            hidden=512,
            epochs=100,
            candidates=2000,
            plan_horizon=20,
        ),  # fmt: skip
    }

    def __init__(self, config: MBConfig) -> None:
        super().__init__(config)
        c = config
        self.model = DynamicsMLP(
            self.obs_dim, self.act_dim, self.family.model_input, c.hidden, c.layers
        )

    def fit(
        self, replay: Replay, optimizer: torch.optim.Optimizer, rng: np.random.Generator
    ) -> dict[str, float]:
        c, model = self.config, self.model
        train, val = hold_out(replay, c.val_fraction, rng)
        model.set_statistics(*train.transitions())
        x, y = model.encode(*map(torch.as_tensor, train.transitions()))
        vx, vy = model.encode(*map(torch.as_tensor, val.transitions()))
        stopper = EarlyStopping(model, c.patience)
        params = dict(model.net.named_parameters())
        for _ in range(c.epochs):
            order = torch.as_tensor(rng.permutation(len(x)))
            for i in range(0, len(x), c.batch):
                rows = order[i : i + c.batch]
                optimizer.zero_grad(set_to_none=True)
                model.loss(params, x[rows], y[rows]).backward()
                optimizer.step()
            with torch.no_grad():
                if stopper.update(model.loss(params, vx, vy).item()):
                    break
        stopper.restore()
        return {"val_loss": stopper.best, "epochs": stopper.epochs}

    def _adapt(self):
        lr = self.config.inner_lr
        return lambda p, o, a, o2: self.model.adapted(p, o, a, o2, lr)

    def controller(self, generator: torch.Generator, adapt: bool | None = None) -> MPCController:
        adapt = self.config.online_adapt if adapt is None else adapt
        return MPCController(
            self.model, self.family, self.dt, self.low, self.high, generator,
            plan_settings(self.config), self._adapt() if adapt else None, self.config.past,
        )  # fmt: skip

    def predict_ahead(
        self, trajectory: Trajectory, starts: np.ndarray, k: int, adapt: bool | None = None
    ) -> np.ndarray:
        adapt = self.config.online_adapt if adapt is None else adapt
        params = {n: p.detach() for n, p in self.model.params().items()}
        return predict_ahead(
            self.model, params, trajectory, starts, k, self._adapt() if adapt else None,
            self.config.past,
        )  # fmt: skip

    def eval_rows(self) -> list[tuple[str, bool | None]]:
        return [("MB", False), ("MB+DE", True)]

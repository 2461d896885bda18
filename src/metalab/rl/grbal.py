"""GrBAL: gradient-based adaptive learner (Nagabandi, Clavera et al. 2019, "Learning to adapt in
dynamic, real-world environments through meta-reinforcement learning", Sec. 4.1).

The dynamics model is meta-trained with MAML so that one gradient step on the last M transitions
of a rollout makes it predict the next K well. A meta-training task is a window of M + K
consecutive transitions of one collected rollout: the past M give the inner loss (Eq. 3), the
future K the outer loss after the step (Eq. 4). At test time, at every environment step, the model
is reset to the meta-learned parameters, takes the one step on the last M transitions, and MPC
plans with it (Alg. 2). The meta-gradient comes from the functional core
(:func:`metalab.functional.inner.meta_gradient`), vmapped over the windows of a meta-batch.

Settings from the official code (learning_to_adapt, shared NEXT-WAVE notes Sec. 6): M = K = 16,
psi = 1e-3 fixed (the paper allows a learned psi: ``--learn-inner-lr``), meta-batch 10 windows,
Adam 1e-3, early stopping on held-out rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metalab.functional.inner import Params, meta_gradient, write_grads
from metalab.rl.base import RLConfig
from metalab.rl.dynamics import EarlyStopping, hold_out
from metalab.rl.mb import MB
from metalab.rl.rollout import Replay


@dataclass
class GrBALConfig(RLConfig):
    online_adapt: bool = True  # adapt the model online at every step (MB+DE, GrBAL)
    future: int = 16  # K: the transitions after the past M that score the adapted model
    meta_batch: int = 10  # windows per meta-gradient step
    inner_steps: int = 1  # gradient steps of the adaptation (the paper: 1)
    learn_inner_lr: bool = False  # learn psi, one rate per parameter tensor (the paper's option)
    first_order: bool = False  # drop the second derivatives through the inner step


class GrBAL(MB):
    """GrBAL: a dynamics model meta-trained (MAML) to adapt with one gradient step on the last M
    transitions, for MPC under changing dynamics (Nagabandi, Clavera et al. 2019)."""

    name = "grbal"
    Config = GrBALConfig
    recipes = {
        # Our CPU protocol (shared NEXT-WAVE notes, Sec. 6), as MB's cheetah-cpu.
        "cheetah-cpu": GrBALConfig(),
        "ant-cpu": GrBALConfig(task="ant-leg"),
        # The code's run_grbal.py: 3 x 512, 100 epochs, 5 rollouts of 1000 steps per iteration,
        # 50 iterations, at dt 0.01 (frame skip 1); 500 candidates x horizon 10.
        "cheetah": GrBALConfig(
            frame_skip=1,
            episode_steps=1000,
            random_rollouts=5,
            iterations=50,
            rollouts=5,
            hidden=512,
            layers=3,
            epochs=100,
        ),  # fmt: skip
        "ant": GrBALConfig(
            task="ant-leg",
            frame_skip=1,
            episode_steps=1000,
            random_rollouts=5,
            iterations=50,
            rollouts=5,
            hidden=512,
            layers=3,
            epochs=100,
        ),  # fmt: skip
    }

    def __init__(self, config: GrBALConfig) -> None:
        super().__init__(config)
        self.inner_lrs = nn.ParameterDict()
        if config.learn_inner_lr:  # one learned psi per parameter tensor, from the fixed value
            for name in self.model.params():
                self.inner_lrs[_key(name)] = nn.Parameter(torch.tensor(config.inner_lr))

    def inner_lr(self) -> float | Params:
        """psi: the config's number, or the learned rates by parameter name."""
        if not self.config.learn_inner_lr:
            return self.config.inner_lr
        return {name: self.inner_lrs[_key(name)] for name in self.model.params()}

    def _adapt(self):
        lr = self.inner_lr()
        if isinstance(lr, dict):
            lr = {n: r.detach() for n, r in lr.items()}
        steps = self.config.inner_steps
        return lambda p, o, a, o2: self.model.adapted(p, o, a, o2, lr, steps)

    def windows(self, x: torch.Tensor, y: torch.Tensor, starts: np.ndarray):
        """Support (past M) and query (future K) tensors of the windows starting at ``starts``:
        ``(x, y)`` each ``(T, M, .)`` and ``(T, K, .)``."""
        c = self.config
        idx = torch.as_tensor(starts)[:, None] + torch.arange(c.past + c.future)
        return (x[idx[:, : c.past]], y[idx[:, : c.past]]), (
            x[idx[:, c.past :]],
            y[idx[:, c.past :]],
        )

    def meta_gradient(self, support, query):
        """Eqs. 3-4: the mean over windows of the future loss after the inner step on the past,
        differentiated with respect to the initial parameters (and psi when learned); each
        window's loss is the metric ``mse``."""
        c, model = self.config, self.model
        return meta_gradient(
            lambda p, x, y: (lambda loss: (loss, {"mse": loss}))(model.loss(p, x, y)),
            model.params(), support, query, c.inner_steps, self.inner_lr(), c.first_order,
        )  # fmt: skip

    def fit(
        self, replay: Replay, optimizer: torch.optim.Optimizer, rng: np.random.Generator
    ) -> dict[str, float]:
        c, model = self.config, self.model
        span = c.past + c.future
        train, val = hold_out(replay, c.val_fraction, rng)
        model.set_statistics(*train.transitions())
        x, y = model.encode(*map(torch.as_tensor, train.transitions()))
        vx, vy = model.encode(*map(torch.as_tensor, val.transitions()))
        starts, val_starts = train.windows(span), val.windows(span)[::span]
        # An epoch sees about every transition once: len / (span * meta_batch) steps.
        steps = max(1, len(x) // (span * c.meta_batch))
        stopper = EarlyStopping(self, c.patience)
        for _ in range(c.epochs):
            for _ in range(steps):
                support, query = self.windows(x, y, rng.choice(starts, c.meta_batch))
                result = self.meta_gradient(support, query)
                optimizer.zero_grad(set_to_none=True)
                write_grads(model.params(), result.grads)
                if result.lr_grads is not None:
                    write_grads(self.inner_lr(), result.lr_grads)
                optimizer.step()
            val_loss = self.meta_gradient(*self.windows(vx, vy, val_starts)).loss.item()
            if stopper.update(val_loss):
                break
        stopper.restore()
        return {"val_loss": stopper.best, "epochs": stopper.epochs}

    def eval_rows(self) -> list[tuple[str, bool | None]]:
        return [("GrBAL", True), ("GrBAL without adaptation", False)]


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (no dots)."""
    return name.replace(".", "_")

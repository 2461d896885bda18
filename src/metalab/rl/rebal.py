"""ReBAL: recurrence-based adaptive learner (Nagabandi, Clavera et al. 2019, "Learning to adapt in
dynamic, real-world environments through meta-reinforcement learning", Sec. 4.2).

The dynamics model is recurrent: an LSTM reads each transition's standardised ``(s, a)`` and a
linear head on its output predicts the standardised state change ``z(s' - s)``, as the MLP of
:mod:`metalab.rl.dynamics` does. Its hidden state, advanced with every real transition of the
current rollout, *is* the adaptation: no gradient step at test time. Trained on random sequences of
consecutive transitions of one rollout, each from a zero state, with truncated backprop through the
sequence, the model learns to infer the rollout's dynamics (here: which part is broken) from the
transitions it has seen. MPC plans from the current hidden state: the planner's state is the
observation with the flattened ``(h, c)`` of each candidate, so that each imagined step advances the
candidate's own memory.

Settings from the official code (iclavera/learning_to_adapt, rnn_dynamics.py and run_rebal.py): one
LSTM layer of 256, Adam 1e-2, batches of 10 sequences of 100 steps (the truncated backprop length),
50 epochs per iteration, random shooting with 500 candidates x horizon 10. We add gradient-norm
clipping (``clip``) and early stopping on held-out rollouts run whole from a zero state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metalab.rl.base import RLConfig, RLMethod
from metalab.rl.dynamics import EarlyStopping, Standardised, hold_out, plan_settings
from metalab.rl.envs import TaskFamily
from metalab.rl.mpc import PLANNERS
from metalab.rl.rollout import Replay, Trajectory

State = tuple[torch.Tensor, torch.Tensor]  # the LSTM's (h, c), each (layers, N, hidden)


@dataclass
class ReBALConfig(RLConfig):
    hidden: int = 256  # LSTM width
    layers: int = 1  # LSTM layers
    lr: float = 1e-2  # Adam, for the model (the code's rate for the RNN)
    online_adapt: bool = True  # carry the hidden state through the rollout (False: zero each step)
    sequence: int = 100  # transitions per training sequence (the truncated backprop length)
    batch: int = 10  # sequences per Adam step
    clip: float = 1.0  # most gradient norm per Adam step (0: no clipping; ours, not the code's)


class RecurrentDynamics(Standardised):
    """An LSTM on standardised ``(s, a)`` with a linear head to the standardised state change
    (standardisation as :class:`~metalab.rl.dynamics.DynamicsMLP`'s).

    Args:
        obs_dim, act_dim: the environment's.
        inputs: the observation dimensions the network sees (``family.model_input``).
        hidden, layers: the LSTM's width and number of layers.
    """

    def __init__(self, obs_dim: int, act_dim: int, inputs: slice, hidden: int, layers: int):
        super().__init__()
        self.obs_dim = obs_dim
        n_in = self._statistics(obs_dim, act_dim, inputs)
        self.lstm = nn.LSTM(n_in, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, obs_dim)

    def zero_state(self, n: int) -> State:
        """The state before any transition, for ``n`` sequences."""
        shape = (self.lstm.num_layers, n, self.lstm.hidden_size)
        zeros = torch.zeros(shape, dtype=self.in_mean.dtype, device=self.in_mean.device)
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Standardised inputs ``(N, T, n_in)`` from ``state`` (None: zero) -> the standardised
        state changes ``(N, T, d)`` and the state after the last step."""
        out, state = self.lstm(x, state)
        return self.head(out), state

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MSE on standardised state changes over every step of sequences from a zero state."""
        return F.mse_loss(self(x)[0], y)

    def run(self, obs: torch.Tensor, actions: torch.Tensor, state: State | None = None) -> State:
        """The state after reading the real transitions ``obs`` ``(N, T, d)``, ``actions``
        ``(N, T, a)`` from ``state`` (None: zero): the adaptation to them (Sec. 4.2)."""
        x, _ = self.encode(obs, actions.to(obs.dtype))
        return self(x, state)[1]

    def step(
        self, obs: torch.Tensor, actions: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        """One batched step: ``obs`` ``(N, d)``, ``actions`` ``(N, a)`` -> the predicted next
        state ``s + f(...)`` in the environment's units and the advanced ``(h, c)``."""
        x, _ = self.encode(obs, actions.to(obs.dtype))
        y, state = self(x[:, None], state)
        return obs + y[:, 0] * self.out_std + self.out_mean, state


def pack(obs: torch.Tensor, state: State) -> torch.Tensor:
    """The planner's state: ``obs`` ``(N, d)`` then each candidate's flattened ``h`` and ``c``
    (layer by layer): ``(N, d + 2 * layers * hidden)``."""
    h, c = (s.transpose(0, 1).reshape(len(obs), -1) for s in state)
    return torch.cat([obs, h, c], 1)


def unpack(packed: torch.Tensor, obs_dim: int, layers: int) -> tuple[torch.Tensor, State]:
    """Inverse of :func:`pack`: ``obs`` ``(N, d)`` and ``(h, c)`` each ``(layers, N, hidden)``."""
    obs, memory = packed[:, :obs_dim], packed[:, obs_dim:]
    h, c = memory.reshape(len(packed), 2, layers, -1).unbind(1)
    return obs, (h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous())


class RecurrentMPCController:
    """Plans every step from the model's current hidden state. With ``adapt``, ``observe``
    advances the state with each real transition ``(s, a)`` of the rollout, so that after ``t``
    transitions it summarises them (Sec. 4.2); without, every plan starts from a zero state."""

    def __init__(
        self,
        model: RecurrentDynamics,
        family: TaskFamily,
        dt: float,
        low: torch.Tensor,
        high: torch.Tensor,
        generator: torch.Generator,
        plan: dict,
        adapt: bool,
    ) -> None:
        self.model, self.family, self.dt = model, family, dt
        self.low, self.high, self.generator = low, high, generator
        self.planner = PLANNERS[plan.pop("planner")]
        self.plan, self.adapt = plan, adapt
        self.dtype = model.in_mean.dtype
        self.reset()

    def reset(self) -> None:
        self.state = self.model.zero_state(1)

    def step(self, packed: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The planner's model: one LSTM step of every candidate from its own packed state."""
        obs, state = unpack(packed, self.model.obs_dim, self.model.lstm.num_layers)
        return pack(*self.model.step(obs, actions, state))

    def reward(self, packed: torch.Tensor, actions: torch.Tensor, next_packed: torch.Tensor):
        d = self.model.obs_dim
        return self.family.reward(packed[..., :d], actions, next_packed[..., :d], self.dt)

    def act(self, obs: np.ndarray) -> np.ndarray:
        state = self.state if self.adapt else self.model.zero_state(1)
        packed = pack(torch.as_tensor(obs, dtype=self.dtype)[None], state)[0]
        action = self.planner(
            self.step, self.reward, packed, self.low, self.high, self.generator, **self.plan
        )
        return action.numpy()

    @torch.no_grad()
    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        if self.adapt:
            o = torch.as_tensor(obs, dtype=self.dtype)[None, None]
            a = torch.as_tensor(action, dtype=self.dtype)[None, None]
            self.state = self.model.run(o, a, self.state)


class ReBAL(RLMethod):
    """ReBAL: a recurrent dynamics model whose hidden state adapts it to the current rollout, for
    MPC under changing dynamics (Nagabandi, Clavera et al. 2019, Sec. 4.2)."""

    name = "rebal"
    Config = ReBALConfig
    recipes = {
        # Our CPU protocol (shared NEXT-WAVE notes, Sec. 6), as MB's and GrBAL's cheetah-cpu.
        "cheetah-cpu": ReBALConfig(),
        "ant-cpu": ReBALConfig(task="ant-leg"),
        # The code's run_rebal.py: 1 x 256 LSTM, 50 epochs, 5 rollouts of 1000 steps per
        # iteration, 50 iterations, at dt 0.01 (frame skip 1); 500 candidates x horizon 10.
        "cheetah": ReBALConfig(
            frame_skip=1,
            episode_steps=1000,
            random_rollouts=5,
            iterations=50,
            rollouts=5,
            epochs=50,
        ),  # fmt: skip
        "ant": ReBALConfig(
            task="ant-leg",
            frame_skip=1,
            episode_steps=1000,
            random_rollouts=5,
            iterations=50,
            rollouts=5,
            epochs=50,
        ),  # fmt: skip
    }

    def __init__(self, config: ReBALConfig) -> None:
        super().__init__(config)
        c = config
        self.model = RecurrentDynamics(
            self.obs_dim, self.act_dim, self.family.model_input, c.hidden, c.layers
        )

    def _encode(self, trajectory: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        obs, actions = torch.as_tensor(trajectory.obs), torch.as_tensor(trajectory.actions)
        return self.model.encode(obs[:-1], actions, obs[1:])

    @torch.no_grad()
    def validation_loss(self, trajectories: list[Trajectory]) -> float:
        """The training loss on whole rollouts, each run from a zero state (those of one length
        in one batch): the mean over all their steps."""
        by_length: dict[int, list[Trajectory]] = {}
        for t in trajectories:
            by_length.setdefault(len(t), []).append(t)
        total, count = 0.0, 0
        for group in by_length.values():
            x, y = (torch.stack(v) for v in zip(*map(self._encode, group)))
            total += F.mse_loss(self.model(x)[0], y, reduction="sum").item()
            count += y.numel()
        return total / count

    def fit(
        self, replay: Replay, optimizer: torch.optim.Optimizer, rng: np.random.Generator
    ) -> dict[str, float]:
        c, model = self.config, self.model
        train, held = hold_out(replay, c.val_fraction, rng)
        val = held.trajectories
        model.set_statistics(*train.transitions())
        x, y = model.encode(*map(torch.as_tensor, train.transitions()))
        # Sequences of `sequence` consecutive transitions inside one rollout (shorter when every
        # rollout is), starting anywhere; an epoch sees about every transition once.
        length = min(c.sequence, max(len(t) for t in train.trajectories))
        starts = train.windows(length)
        steps = max(1, len(x) // (length * c.batch))
        offsets = torch.arange(length)
        stopper = EarlyStopping(model, c.patience)
        for _ in range(c.epochs):
            for _ in range(steps):
                idx = torch.as_tensor(rng.choice(starts, c.batch))[:, None] + offsets
                optimizer.zero_grad(set_to_none=True)
                model.loss(x[idx], y[idx]).backward()  # truncated backprop through the sequence
                if c.clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), c.clip)
                optimizer.step()
            if stopper.update(self.validation_loss(val)):
                break
        stopper.restore()
        return {"val_loss": stopper.best, "epochs": stopper.epochs}

    def controller(
        self, generator: torch.Generator, adapt: bool | None = None
    ) -> RecurrentMPCController:
        adapt = self.config.online_adapt if adapt is None else adapt
        return RecurrentMPCController(
            self.model, self.family, self.dt, self.low, self.high, generator,
            plan_settings(self.config), adapt,
        )  # fmt: skip

    @torch.no_grad()
    def predict_ahead(
        self, trajectory: Trajectory, starts: np.ndarray, k: int, adapt: bool | None = None
    ) -> np.ndarray:
        adapt = self.config.online_adapt if adapt is None else adapt
        model = self.model
        dtype = model.in_mean.dtype
        obs = torch.as_tensor(trajectory.obs, dtype=dtype)
        actions = torch.as_tensor(trajectory.actions, dtype=dtype)
        starts = np.asarray(starts, dtype=np.int64)
        h, c = model.zero_state(len(starts))
        if adapt:  # the state after transitions 0..t-1: one pass, cut at the sorted starts
            state, done = model.zero_state(1), 0
            for i in np.argsort(starts, kind="stable"):
                t = int(starts[i])
                if t > done:
                    state, done = model.run(obs[None, done:t], actions[None, done:t], state), t
                h[:, i], c[:, i] = state[0][:, 0], state[1][:, 0]
        index = torch.as_tensor(starts)
        s, state, path = obs[index], (h, c), []
        for j in range(k):  # open loop with the actions taken
            s, state = model.step(s, actions[index + j], state)
            path.append(s)
        return torch.stack(path, 1).numpy()

    def eval_rows(self) -> list[tuple[str, bool | None]]:
        return [("ReBAL", True), ("ReBAL without adaptation", False)]

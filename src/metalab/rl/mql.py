"""Meta-Q-Learning (Fakoor, Chaudhari, Soatto & Smola 2020, "Meta-Q-Learning", ICLR): TD3 with a
recurrent context, meta-trained as one multi-task TD3 and adapted to a new task off-policy by
recycling the meta-training replay, reweighted by a propensity score.

Meta-training (Sec. 3.1): TD3 (Fujimoto et al. 2018) whose actor and twin critics also see a
context, the last hidden state of a GRU over the last H (action, reward, observation) triples.
Every iteration collects episodes on a few sampled training tasks into per-task buffers and one
shared buffer, then takes ``num_train_steps`` TD3 steps on batches of the shared one.

Adaptation (Sec. 3.2-3.3), for each test task: collect a snapshot with the meta-trained policy;
fit a logistic regression telling the snapshot's contexts (label -1) from the training buffers'
(label +1); take ``snap_iter`` plain TD3 steps on the snapshot; then ``main_snap_iter`` steps on
the whole training replay with every sample's losses weighted by the propensity
beta(x) = exp(-f(x)) (f the classifier's logit), plus a proximal term lambda ||w - w_meta||^2;
evaluate; roll the weights back to the meta-trained ones.

What the official code (amazon-research/meta-q-learning) does and we keep: separate context GRUs
in the actor and the critic, each trained by its own loss (``shared_context`` is the variant with
one GRU trained by the critic, the actor reading it detached); the critic's current Q reads the
history before the transition, the target the history after it (shifted by one, the transition
itself included); left zero padding of the history, run through the GRU; polyak averaging with the
delayed actor step; adaptation with fresh Adam optimizers (torch's default rate, 1e-3), the
snapshot steps on a batch the size of the snapshot (here the snapshot itself; the code draws as
many with replacement), the weighted steps on ``sample_mult`` x ``batch_size`` samples of the
shared buffer, the classifier's training side ``snapshot / tasks + 2`` samples of each training
task's buffer; lambda fixed (``prox_coef``, the code's default) or 1 - ESS/n.

The agent acts in [-1, 1]^a and :func:`run_episode` maps its actions to the env's box, as rlkit's
``NormalizedBoxEnv`` did under the code (the point robot's box is +-0.1), so the noises are the
code's numbers in those units; the stored actions and histories are in them too.

Where we differ, deliberately: an episode's history starts all zeros (the code also puts one
random action with reward 0 and the first observation at its end, for acting only, not in the
stored "after" histories); the classifier's features come from the meta-trained actor's context at fitting time
AND when weighting (the code weights with the context of the actor being adapted, which has moved
during the snapshot steps); the snapshot is whole episodes of the deterministic policy up to
``snapshot_size`` transitions (the code: one episode). One meta-training iteration here is one
collect-then-train round; the code's burn-in schedule and its episode-length step counts are
left to the trainer.

Replay storage: every transition is stored once with its place in its episode (step t) and a
global write stamp; histories are rebuilt by index at sampling (the H rows before it, or the H
rows ending with it), rows of another episode or already overwritten in the ring masked to zero.
The code stores both histories with every transition (2 H (a + 1 + d) floats each). This is not
``metalab.rl.rollout.Replay``, which keeps every whole trajectory of a model-based run (its windows
for the dynamics model): TD3's replay is a bounded ring of single transitions with done flags.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from metalab.config import Settings, recipe_of
from metalab.errors import ConfigError


@dataclass
class MQLConfig(Settings):
    """MQL's settings; the defaults are the official code's (main.py) unless marked."""

    task: str = "point-robot"  # point-robot | cheetah-vel | cheetah-dir | ant-dir | ant-goal | humanoid-dir | walker-rand-params: the PEARL task family (metalab.rl.pearl)
    hidden: int = 300  # width of the actor's and the critics' hidden layers (ReLU)
    layers: int = 2  # their hidden layers
    use_context: bool = True  # False: plain TD3, the paper's no-context baseline
    shared_context: bool = False  # one GRU, trained by the critic, read detached by the actor
    history_length: int = 30  # H: the (action, reward, observation) triples the GRU reads
    context_hidden: int = 30  # the GRU's hidden size = the context's size
    lr: float = 3e-4  # Adam, meta-training
    gamma: float = 0.99
    tau: float = 0.005  # polyak factor of the target networks
    policy_noise: float = 0.3  # target-policy smoothing noise (actions in [-1, 1])
    noise_clip: float = 0.5  # its clip
    expl_noise: float = 0.2  # Gaussian exploration noise
    policy_freq: int = 2  # one actor step (and target update) every this many critic steps
    batch_size: int = 256
    replay_size: int = 1_000_000  # capacity of the shared buffer
    max_path_length: int = 200  # most steps of an episode
    num_initial_steps: int = 1000  # random-action steps per training task before the first update
    num_tasks_sample: int = 5  # episodes (on random training tasks) collected per iteration
    num_train_steps: int = 500  # TD3 steps per iteration
    snapshot_size: int = 2000  # most transitions of the new-task snapshot; capacity per task
    lam_csc: float = 0.5  # C of the logistic regression (smaller: stronger regularisation)
    max_iter_logistic: int = 2000
    beta_clip: float = 1.0  # the logit is clipped to >= -beta_clip, so beta <= exp(beta_clip)
    enable_beta_obs_cxt: bool = False  # classifier features: the observation and the context
    snap_iter: int = 10  # plain TD3 steps on the snapshot
    main_snap_iter: int = 100  # weighted, proximal TD3 steps on the training replay
    sample_mult: int = 5  # their batch: sample_mult x batch_size
    prox: str = "fixed"  # fixed | ess: lambda = prox_coef, or 1 - ESS/n of each batch
    prox_coef: float = 0.1  # lambda (also the fallback when 1 - ESS/n is not positive)
    adapt_lr: float = 1e-3  # the fresh Adam optimizers of the adaptation
    eval_episodes: int = 2  # per test task (the PEARL-suite configs' num_evals)
    iterations: int = 1000  # meta-training iterations of `metalab train`
    eval_every: int = 10  # iterations between evaluations on the test tasks (no adaptation)
    seed: int = 0


RECIPES: dict[str, MQLConfig] = {
    # Ours, for CPU: the 2-D point robot with PEARL's 20-step episodes, small networks, a short
    # history and horizon; 30k environment steps, one TD3 step each. (gamma 0.99, lr 1e-3, tau
    # 0.005 and H = 10 had not left the do-nothing return after 10k steps.)
    "point-robot": MQLConfig(
        task="point-robot",
        hidden=64,
        history_length=5,
        context_hidden=10,
        gamma=0.8,
        lr=3e-3,
        tau=0.01,
        max_path_length=20,
        num_initial_steps=40,
        num_tasks_sample=10,
        num_train_steps=200,
        snapshot_size=400,
        lam_csc=0.1,
        iterations=150,
        eval_every=10,
    ),
    # The code's run_script.py (cheetah_vel), to its 5e6 environment steps.
    "cheetah-vel": MQLConfig(
        task="cheetah-vel",
        lr=1e-3,
        history_length=20,
        context_hidden=15,
        expl_noise=0.3,
        policy_noise=0.3,
        policy_freq=2,
        num_initial_steps=500,
        num_tasks_sample=1,
        num_train_steps=200,
        snapshot_size=2000,
        snap_iter=10,
        main_snap_iter=100,
        lam_csc=0.1,
        beta_clip=1.0,
        sample_mult=5,
        iterations=25_000,
        eval_every=50,
    ),
}
# The same to 1% of its steps (50k after the random ones, 200 per iteration): 35-65 min on a core.
RECIPES["cheetah-vel-cpu"] = replace(RECIPES["cheetah-vel"], iterations=250, eval_every=25)


# ---------------------------------------------------------------------------------------------
# Episodes, histories and replay


@dataclass
class Episode:
    """One episode: ``obs`` and ``next_obs`` ``(T, d)``, ``actions`` ``(T, a)``, ``rewards`` and
    ``dones`` ``(T,)`` (done: terminated, not a time limit)."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    dones: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def total(self) -> float:
        return float(self.rewards.sum())


def triple(action: np.ndarray, reward: np.ndarray | float, obs: np.ndarray) -> np.ndarray:
    """One step of a history: (action, reward, observation) concatenated, the code's order."""
    reward = np.asarray(reward, dtype=np.float32).reshape(*np.shape(action)[:-1], 1)
    return np.concatenate([action, reward, obs], axis=-1).astype(np.float32)


class History:
    """The last H triples of the running episode, oldest first, zero-padded on the left: what the
    agent acts on at step t (triples of steps t-H .. t-1)."""

    def __init__(self, length: int, act_dim: int, obs_dim: int) -> None:
        self.window = np.zeros((length, act_dim + 1 + obs_dim), dtype=np.float32)

    def push(self, action: np.ndarray, reward: float, obs: np.ndarray) -> None:
        """After step t: append (a_t, r_t, s_t)."""
        if len(self.window):
            self.window[:-1] = self.window[1:]
            self.window[-1] = triple(action, reward, obs)


@dataclass
class Batch:
    """Transitions with their histories: ``hist`` the H triples before each transition (the
    current Q's context), ``next_hist`` the H ending with it (the target's), ``(B, H, a+1+d)``."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor  # (B, 1)
    next_obs: torch.Tensor
    dones: torch.Tensor  # (B, 1)
    hist: torch.Tensor
    next_hist: torch.Tensor

    def __len__(self) -> int:
        return len(self.obs)

    def to(self, dtype: torch.dtype) -> Batch:
        return Batch(*(getattr(self, f.name).to(dtype) for f in fields(self)))


class Replay:
    """A ring buffer of the transitions of whole episodes; histories are rebuilt by index (module
    docstring). ``tasks`` records each transition's task index."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, history_length: int) -> None:
        self.capacity, self.history_length = int(capacity), int(history_length)
        self.obs = np.zeros((self.capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((self.capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((self.capacity, act_dim), dtype=np.float32)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.dones = np.zeros(self.capacity, dtype=np.float32)
        self.steps = np.zeros(self.capacity, dtype=np.int64)  # t: the step in its episode
        self.stamps = np.full(self.capacity, -1, dtype=np.int64)  # global write number
        self.tasks = np.full(self.capacity, -1, dtype=np.int64)
        self.written = 0

    def __len__(self) -> int:
        return min(self.written, self.capacity)

    def add(self, episode: Episode, task: int = -1) -> None:
        for t in range(len(episode)):
            i = self.written % self.capacity
            self.obs[i], self.next_obs[i] = episode.obs[t], episode.next_obs[t]
            self.actions[i], self.rewards[i] = episode.actions[t], episode.rewards[t]
            self.dones[i], self.steps[i], self.tasks[i] = episode.dones[t], t, task
            self.stamps[i] = self.written
            self.written += 1

    def histories(self, rows: np.ndarray, after: bool) -> np.ndarray:
        """``(n, H, a+1+d)``: the triples of the H steps before each row (``after``: the H steps
        ending with it), zeros where the episode had not started or the ring overwrote them."""
        back = np.arange(self.history_length, 0, -1) - int(after)  # steps back from the row
        src = (rows[:, None] - back) % self.capacity
        valid = (back <= self.steps[rows, None]) & (
            self.stamps[src] == self.stamps[rows, None] - back
        )
        out = triple(self.actions[src], self.rewards[src], self.obs[src])
        return np.where(valid[..., None], out, np.float32(0))

    def batch(self, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows, dtype=np.int64)
        t = torch.from_numpy
        return Batch(
            t(self.obs[rows]),
            t(self.actions[rows]),
            t(self.rewards[rows, None]),
            t(self.next_obs[rows]),
            t(self.dones[rows, None]),
            t(self.histories(rows, after=False)),
            t(self.histories(rows, after=True)),
        )

    def rows(self) -> np.ndarray:
        """The stored rows, oldest first."""
        n = len(self)
        return (self.written - n + np.arange(n)) % self.capacity

    def sample(self, n: int, rng: np.random.Generator) -> Batch:
        """``n`` transitions drawn uniformly with replacement."""
        return self.batch(rng.integers(0, len(self), n))

    def all(self) -> Batch:
        return self.batch(self.rows())

    ARRAYS = ("obs", "next_obs", "actions", "rewards", "dones", "steps", "stamps", "tasks")

    def state(self) -> dict[str, Any]:
        """The filled part of the ring, in place (for checkpoints; resumes sample the same rows)."""
        n = len(self)
        return {
            "capacity": self.capacity,
            "history_length": self.history_length,
            "written": self.written,
            **{k: getattr(self, k)[:n].copy() for k in self.ARRAYS},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Replay:
        obs_dim, act_dim = state["obs"].shape[1], state["actions"].shape[1]
        replay = cls(state["capacity"], obs_dim, act_dim, state["history_length"])
        n = len(state["obs"])
        for k in cls.ARRAYS:
            getattr(replay, k)[:n] = state[k]
        replay.written = int(state["written"])
        return replay


@dataclass
class MultiTaskReplay:
    """The shared buffer every update samples, and one short buffer per training task (the code's
    ``tasks_buffer``, capacity ``snapshot_size``) that the propensity classifier samples."""

    shared: Replay
    per_task: dict[int, Replay] = field(default_factory=dict)

    @classmethod
    def create(cls, config: MQLConfig, obs_dim: int, act_dim: int) -> MultiTaskReplay:
        return cls(Replay(config.replay_size, obs_dim, act_dim, config.history_length))

    def add(self, episode: Episode, task: int, per_task_capacity: int) -> None:
        self.shared.add(episode, task)
        if task not in self.per_task:
            s = self.shared
            self.per_task[task] = Replay(
                per_task_capacity, s.obs.shape[1], s.actions.shape[1], s.history_length
            )
        self.per_task[task].add(episode, task)

    def __len__(self) -> int:
        return len(self.shared)

    def state(self) -> dict[str, Any]:
        return {
            "shared": self.shared.state(),
            "per_task": {task: r.state() for task, r in self.per_task.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MultiTaskReplay:
        per_task = {int(t): Replay.from_state(r) for t, r in state["per_task"].items()}
        return cls(Replay.from_state(state["shared"]), per_task)


# ---------------------------------------------------------------------------------------------
# The agent: TD3 with a context (Sec. 3.1)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ContextEncoder(nn.Module):
    """A GRU over the H triples from a zero state; the context is its last hidden state."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, batch_first=True)

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        return self.gru(hist)[1][0]


class Networks(nn.Module):
    """Actor, twin critics and their context GRUs; the online and the target networks are two
    of these."""

    def __init__(self, obs_dim: int, act_dim: int, c: MQLConfig) -> None:
        super().__init__()
        k = c.context_hidden if c.use_context else 0
        triple_dim = act_dim + 1 + obs_dim
        own = c.use_context and not c.shared_context
        self.critic_encoder = ContextEncoder(triple_dim, k) if c.use_context else None
        self.actor_encoder = ContextEncoder(triple_dim, k) if own else None
        self.actor = mlp([obs_dim + k, *[c.hidden] * c.layers, act_dim])
        self.q1 = mlp([obs_dim + act_dim + k, *[c.hidden] * c.layers, 1])
        self.q2 = mlp([obs_dim + act_dim + k, *[c.hidden] * c.layers, 1])

    def actor_parameters(self) -> list[nn.Parameter]:
        enc = [] if self.actor_encoder is None else list(self.actor_encoder.parameters())
        return list(self.actor.parameters()) + enc

    def critic_parameters(self) -> list[nn.Parameter]:
        enc = [] if self.critic_encoder is None else list(self.critic_encoder.parameters())
        return list(self.q1.parameters()) + list(self.q2.parameters()) + enc

    def critic_context(self, hist: torch.Tensor) -> torch.Tensor | None:
        return None if self.critic_encoder is None else self.critic_encoder(hist)

    def policy_context(self, hist: torch.Tensor) -> torch.Tensor | None:
        """The actor's context: its own GRU, or the critic's detached (``shared_context``: the
        actor must not move the critic's input to raise its own Q)."""
        if self.actor_encoder is not None:
            return self.actor_encoder(hist)
        if self.critic_encoder is not None:
            return self.critic_encoder(hist).detach()
        return None

    def pi(self, obs: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        ctx = self.policy_context(hist)
        x = obs if ctx is None else torch.cat([obs, ctx], -1)
        return torch.tanh(self.actor(x))

    def q(
        self, obs: torch.Tensor, action: torch.Tensor, ctx: torch.Tensor | None, both: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """The twin critics on (s, a, context) (``both=False``: Q1 alone)."""
        x = torch.cat([obs, action] if ctx is None else [obs, action, ctx], -1)
        return (self.q1(x), self.q2(x)) if both else self.q1(x)


@dataclass
class Proximal:
    """lambda ||w - w_meta||^2 on the actor's and the critic's parameters (Sec. 3.2)."""

    actor: list[torch.Tensor]
    critic: list[torch.Tensor]
    coef: float


def squared_distance(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    return sum(((p - q) ** 2).sum() for p, q in zip(params, anchor))


class ContextTD3(nn.Module):
    """TD3 whose actor and critics also read a GRU context of the last H triples
    (``use_context=False``: plain TD3)."""

    def __init__(self, obs_dim: int, act_dim: int, config: MQLConfig) -> None:
        super().__init__()
        if config.prox not in ("fixed", "ess"):
            raise ConfigError(f"prox must be 'fixed' or 'ess', not {config.prox!r}")
        self.config, self.obs_dim, self.act_dim = config, obs_dim, act_dim
        with torch.random.fork_rng():  # the initial weights from the config's seed alone
            torch.manual_seed(config.seed)
            self.online = Networks(obs_dim, act_dim, config)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.updates = 0  # critic steps since the optimizers were made (delays the actor)
        self.reset_optimizers(config.lr)
        self.replay: MultiTaskReplay | None = None  # meta_train's, read by evaluate_tasks
        self.adapt_info: dict[str, float] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.online.q1[0].weight.dtype

    def reset_optimizers(self, lr: float) -> None:
        """Fresh Adam optimizers (meta-training; each adaptation starts new ones)."""
        self.actor_opt = torch.optim.Adam(self.online.actor_parameters(), lr=lr, foreach=True)
        self.critic_opt = torch.optim.Adam(self.online.critic_parameters(), lr=lr, foreach=True)
        self.updates = 0

    def new_history(self) -> History:
        return History(self.config.history_length, self.act_dim, self.obs_dim)

    @torch.no_grad()
    def act(
        self,
        obs: np.ndarray,
        history: History | np.ndarray,
        noise: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """The policy's action in [-1, 1] on ``obs`` after ``history`` (``(H, a+1+d)``), plus
        Gaussian noise of std ``noise``, clipped."""
        hist = history.window if isinstance(history, History) else history
        o = torch.as_tensor(obs, dtype=self.dtype)[None]
        h = torch.as_tensor(hist, dtype=self.dtype)[None]
        action = self.online.pi(o, h)[0].cpu().numpy().astype(np.float64)
        if noise > 0:
            rng = rng if rng is not None else np.random.default_rng()
            action = action + rng.normal(0.0, noise, size=action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def randn(self, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=self.dtype)

    @torch.no_grad()
    def td_target(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        """y = r + gamma (1 - done) min(Q1', Q2')(s', a'), a' = clip(mu'(s') + clip(eps)), with
        the target networks reading the history that ends with the transition."""
        c, b = self.config, batch
        if noise is None:
            noise = self.randn(b.actions.shape) * c.policy_noise
        noise = noise.clamp(-c.noise_clip, c.noise_clip)
        next_action = (self.target.pi(b.next_obs, b.next_hist) + noise).clamp(-1.0, 1.0)
        q1, q2 = self.target.q(b.next_obs, next_action, self.target.critic_context(b.next_hist))
        return b.rewards + c.gamma * (1 - b.dones) * torch.minimum(q1, q2)

    def update(
        self,
        batch: Batch,
        weights: torch.Tensor | None = None,
        prox: Proximal | None = None,
    ) -> dict[str, float]:
        """One TD3 step: the critics on every call, the actor and the targets every
        ``policy_freq`` calls. ``weights`` ``(B,)``: per-sample weights of both losses (the
        propensity); ``prox``: the proximal term to the meta-trained weights."""
        c, b = self.config, batch.to(self.dtype)
        w = torch.ones(len(b), 1, dtype=self.dtype) if weights is None else weights.reshape(-1, 1)
        w = w.to(self.dtype)
        y = self.td_target(b)
        ctx = self.online.critic_context(b.hist)  # the history before the transition
        q1, q2 = self.online.q(b.obs, b.actions, ctx)
        critic_loss = (w * ((q1 - y) ** 2 + (q2 - y) ** 2)).mean()
        metrics = {"critic_loss": critic_loss.item()}
        if prox is not None:
            d = squared_distance(self.online.critic_parameters(), prox.critic)
            critic_loss = critic_loss + prox.coef * d
            metrics["critic_prox"] = d.item()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        if self.updates % c.policy_freq == 0:  # delayed policy update (TD3)
            action = self.online.pi(b.obs, b.hist)
            with torch.no_grad():  # the critic's GRU is not the actor's to train
                ctx = self.online.critic_context(b.hist)
            actor_loss = -(w * self.online.q(b.obs, action, ctx, both=False)).mean()
            metrics["actor_loss"] = actor_loss.item()
            if prox is not None:
                d = squared_distance(self.online.actor_parameters(), prox.actor)
                actor_loss = actor_loss + prox.coef * d
                metrics["actor_prox"] = d.item()
            self.actor_opt.zero_grad(set_to_none=True)
            self.critic_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            self.critic_opt.zero_grad(set_to_none=True)
            self.polyak()
        self.updates += 1
        return metrics

    @torch.no_grad()
    def polyak(self) -> None:
        """target <- tau online + (1 - tau) target."""
        torch._foreach_lerp_(
            list(self.target.parameters()), list(self.online.parameters()), self.config.tau
        )

    def proximal(self, coef: float) -> Proximal:
        """A proximal term anchored at the current weights."""
        actor = [p.detach().clone() for p in self.online.actor_parameters()]
        critic = [p.detach().clone() for p in self.online.critic_parameters()]
        return Proximal(actor, critic, coef)

    def context_features(self, batch: Batch, with_obs: bool = False) -> np.ndarray:
        """The classifier's features of ``batch`` under the current weights."""
        return context_features(self.online, batch, with_obs)


@torch.no_grad()
def context_features(nets: Networks, batch: Batch, with_obs: bool = False) -> np.ndarray:
    """The actor's context of each transition's history before it (the observation first when
    ``with_obs``; the observation alone without a context), float64 for scikit-learn."""
    b = batch.to(nets.q1[0].weight.dtype)
    ctx = nets.policy_context(b.hist)
    if ctx is None:
        return b.obs.cpu().numpy().astype(np.float64)
    parts = [b.obs, ctx] if with_obs else [ctx]
    return torch.cat(parts, -1).cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Propensity (Sec. 3.2)


def fit_propensity(
    train_features: np.ndarray, new_features: np.ndarray, C: float, max_iter: int = 2000
) -> LogisticRegression:
    """A logistic regression telling new-task features (label -1) from training ones (+1)."""
    x = np.concatenate([new_features, train_features])
    y = np.concatenate([-np.ones(len(new_features)), np.ones(len(train_features))])
    return LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter).fit(x, y)


def propensity_weights(
    classifier: LogisticRegression, features: np.ndarray, beta_clip: float
) -> np.ndarray:
    """beta(x) = exp(-f(x)) with f the logit of "training" clipped to >= -beta_clip; weights
    below 0.1 are set to 0 (the code's)."""
    f = np.maximum(classifier.decision_function(features), -beta_clip)
    beta = np.exp(-f)
    beta[beta < 0.1] = 0.0
    return beta


def effective_sample_size(beta: np.ndarray | torch.Tensor) -> float:
    """ESS = ||beta||_1^2 / ||beta||_2^2 (n for equal weights, 1 for a single non-zero one)."""
    beta = np.abs(np.asarray(beta, dtype=np.float64))
    denom = (beta**2).sum()
    return float(beta.sum() ** 2 / denom) if denom > 0 else 0.0


def prox_coefficient(beta: np.ndarray, config: MQLConfig) -> float:
    """lambda: ``prox_coef``, or 1 - ESS/n of the batch (the fixed one when that is not
    positive or not finite, as the code)."""
    if config.prox == "fixed":
        return config.prox_coef
    lam = 1.0 - effective_sample_size(beta) / len(beta)
    return lam if np.isfinite(lam) and lam > 1e-7 else config.prox_coef


# ---------------------------------------------------------------------------------------------
# Adaptation to a new task (Sec. 3.2-3.3) and rolling back


def checkpoint(agent: ContextTD3) -> dict[str, Any]:
    """Everything an adaptation changes: weights (online and target), optimizer states, the
    step counter and the target-noise generator (also what a training checkpoint holds of the
    agent)."""
    return copy.deepcopy(
        {
            "model": agent.state_dict(),
            "actor_opt": agent.actor_opt.state_dict(),
            "critic_opt": agent.critic_opt.state_dict(),
            "updates": agent.updates,
            "generator": agent.generator.get_state(),
        }
    )


def rollback(agent: ContextTD3, state: dict[str, Any]) -> None:
    """Restore a :func:`checkpoint` (the meta-trained agent before the next test task)."""
    state = copy.deepcopy(state)
    agent.load_state_dict(state["model"])
    agent.reset_optimizers(agent.config.lr)
    agent.actor_opt.load_state_dict(state["actor_opt"])
    agent.critic_opt.load_state_dict(state["critic_opt"])
    agent.updates = state["updates"]
    agent.generator.set_state(state["generator"])


def classifier_training_rows(train: MultiTaskReplay, n_new: int, rng: np.random.Generator) -> Batch:
    """The training side of the classifier: n_new / tasks + 2 transitions from each training
    task's buffer (the code's)."""
    per = n_new // max(1, len(train.per_task)) + 2
    batches = [r.sample(per, rng) for r in train.per_task.values() if len(r)]
    if not batches:  # no per-task buffers: the shared one
        return train.shared.sample(n_new, rng)
    return Batch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(Batch)))


def adapt(
    agent: ContextTD3,
    snapshot: Replay,
    train: MultiTaskReplay,
    config: MQLConfig | None = None,
    rng: np.random.Generator | None = None,
) -> ContextTD3:
    """Adapt ``agent`` (meta-trained) to the task of ``snapshot`` in place; the logs go to
    ``agent.adapt_info``. Roll back with :func:`checkpoint` / :func:`rollback`."""
    c = config or agent.config
    rng = rng if rng is not None else np.random.default_rng(c.seed)
    new = snapshot.all()
    # The propensity classifier on the meta-trained context (Sec. 3.2), kept frozen to weight.
    meta = copy.deepcopy(agent.online).requires_grad_(False)

    def featurize(batch: Batch) -> np.ndarray:
        return context_features(meta, batch, c.enable_beta_obs_cxt)

    train_feats = featurize(classifier_training_rows(train, len(new), rng))
    new_feats = featurize(new)
    classifier = fit_propensity(train_feats, new_feats, c.lam_csc, c.max_iter_logistic)
    prox = agent.proximal(c.prox_coef)  # anchored at the meta-trained weights
    agent.reset_optimizers(c.adapt_lr)
    # Plain TD3 on the snapshot, the whole of it as one batch, no weights, no proximal term.
    for _ in range(c.snap_iter):
        agent.update(new)
    # Weighted, proximal TD3 on the whole training replay.
    betas: list[float] = []
    lams: list[float] = []
    last: dict[str, float] = {}
    for _ in range(c.main_snap_iter):
        batch = train.shared.sample(c.sample_mult * c.batch_size, rng)
        beta = propensity_weights(classifier, featurize(batch), c.beta_clip)
        prox.coef = prox_coefficient(beta, c)
        last = agent.update(batch, torch.as_tensor(beta), prox)
        betas.append(float(beta.mean()))
        lams.append(prox.coef)
    x = np.concatenate([new_feats, train_feats])
    y = np.concatenate([-np.ones(len(new_feats)), np.ones(len(train_feats))])
    agent.adapt_info = {
        "classifier_accuracy": float(classifier.score(x, y)),
        "snapshot": float(len(new)),
        "beta_mean": float(np.mean(betas)) if betas else 0.0,
        "prox_coef": float(np.mean(lams)) if lams else c.prox_coef,
        **{f"main_{k}": v for k, v in last.items()},
    }
    return agent


_adapt = adapt  # for evaluate_tasks, whose flag ``adapt`` shadows the name


# ---------------------------------------------------------------------------------------------
# Rollouts, meta-training and evaluation


class TaskFamily(Protocol):
    """What :func:`meta_train` needs of a task family (``metalab.rl.pearl.GoalFamily``)."""

    train_tasks: tuple
    test_tasks: tuple
    max_steps: int

    def make(self, seed: int) -> Any: ...


def run_episode(
    env: Any,
    agent: ContextTD3,
    task: Any,
    rng: np.random.Generator,
    steps: int,
    noise: float = 0.0,
    random: bool = False,
) -> Episode:
    """One episode on ``task``: the agent's actions (plus ``noise``) on its running history, or
    uniform random ones. Actions are stored in the agent's units, [-1, 1], and mapped to the
    action box for the env (rlkit's ``NormalizedBoxEnv``, which MQL's code ran)."""
    obs, _ = env.reset(seed=int(rng.integers(2**31)), options={"task": task})
    obs = np.asarray(obs, dtype=np.float32)
    history = agent.new_history()
    out: dict[str, list] = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "dones")}
    low = np.asarray(env.action_space.low, dtype=np.float64)
    high = np.asarray(env.action_space.high, dtype=np.float64)
    for _ in range(steps):
        if random:
            action = rng.uniform(-1.0, 1.0, agent.act_dim).astype(np.float32)
        else:
            action = agent.act(obs, history, noise, rng)
        env_action = low + (action.astype(np.float64) + 1.0) * 0.5 * (high - low)
        next_obs, reward, terminated, truncated, _ = env.step(env_action.astype(np.float32))
        next_obs = np.asarray(next_obs, dtype=np.float32)
        for k, v in zip(out, (obs, action, reward, next_obs, float(terminated))):
            out[k].append(v)
        history.push(action, float(reward), obs)  # (a_t, r_t, s_t), the code's triple
        obs = next_obs
        if terminated or truncated:
            break
    return Episode(
        np.asarray(out["obs"], dtype=np.float32),
        np.asarray(out["actions"], dtype=np.float32),
        np.asarray(out["rewards"], dtype=np.float32),
        np.asarray(out["next_obs"], dtype=np.float32),
        np.asarray(out["dones"], dtype=np.float32),
    )


class MQL(ContextTD3):
    """Meta-Q-Learning (Fakoor et al. 2020): TD3 with a GRU context of the recent transitions,
    meta-trained as multi-task TD3 on the PEARL suite and adapted to a new task off-policy on the
    meta-training replay, reweighted by a propensity score, near the meta-trained weights.
    ``--no-use-context``: plain TD3, the paper's baseline."""

    name = "mql"
    Config = MQLConfig
    recipes = RECIPES
    # Config fields that change only the adaptation at test time (`metalab eval --test-time`).
    test_time = (
        "snapshot_size", "snap_iter", "main_snap_iter", "sample_mult", "prox", "prox_coef",
        "lam_csc", "beta_clip", "enable_beta_obs_cxt", "adapt_lr", "eval_episodes",
    )  # fmt: skip

    def __init__(self, config: MQLConfig, family: TaskFamily | None = None) -> None:
        from metalab.rl.pearl import get_goal_family

        self.family = family if family is not None else get_goal_family(config.task)
        env = self.family.make(config.seed)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        env.close()
        super().__init__(obs_dim, act_dim, config)

    @classmethod
    def recipe(cls, name: str) -> MQLConfig:
        """Our documented settings by name (``cheetah-vel``: the official code's)."""
        return recipe_of(cls, name)


def episode_steps(family: TaskFamily, config: MQLConfig) -> int:
    return min(config.max_path_length, getattr(family, "max_steps", config.max_path_length))


def meta_train(
    agent: ContextTD3,
    family: TaskFamily,
    config: MQLConfig | None = None,
    iterations: int = 1,
    rng: np.random.Generator | None = None,
) -> list[dict[str, float]]:
    """Multi-task TD3 on ``family.train_tasks`` (Sec. 3.1), continuing in ``agent.replay``: the
    first call fills it with ``num_initial_steps`` random steps per task; then each iteration
    collects ``num_tasks_sample`` noisy episodes on random training tasks and takes
    ``num_train_steps`` TD3 steps on the shared buffer. Returns one log row per iteration."""
    c = config or agent.config
    rng = rng if rng is not None else np.random.default_rng(c.seed)
    env = family.make(int(rng.integers(2**31)))
    steps = episode_steps(family, c)
    if agent.replay is None:
        agent.replay = MultiTaskReplay.create(c, agent.obs_dim, agent.act_dim)
    replay = agent.replay
    if len(replay) == 0:
        for task in family.train_tasks:
            done = 0
            while done < c.num_initial_steps:
                n = min(steps, c.num_initial_steps - done)
                replay.add(
                    run_episode(env, agent, task, rng, n, random=True), task.index, c.snapshot_size
                )
                done += n
    log = []
    tasks = family.train_tasks
    for it in range(iterations):
        returns = []
        for _ in range(c.num_tasks_sample):
            task = tasks[int(rng.integers(len(tasks)))]
            episode = run_episode(env, agent, task, rng, steps, noise=c.expl_noise)
            replay.add(episode, task.index, c.snapshot_size)
            returns.append(episode.total)
        metrics: dict[str, list[float]] = {}
        for _ in range(c.num_train_steps):
            for k, v in agent.update(replay.shared.sample(c.batch_size, rng)).items():
                metrics.setdefault(k, []).append(v)
        row = {"iteration": float(it), "return": float(np.mean(returns))}
        row.update({k: float(np.mean(v)) for k, v in metrics.items()})
        log.append(row)
    env.close()
    return log


def collect_snapshot(
    env: Any, agent: ContextTD3, task: Any, config: MQLConfig, steps: int, rng: np.random.Generator
) -> Replay:
    """Episodes of the deterministic meta-trained policy on ``task`` until ``snapshot_size``
    transitions (the last one cut short)."""
    snapshot = Replay(config.snapshot_size, agent.obs_dim, agent.act_dim, config.history_length)
    while len(snapshot) < config.snapshot_size:
        n = min(steps, config.snapshot_size - len(snapshot))
        snapshot.add(run_episode(env, agent, task, rng, n))
    return snapshot


def evaluate_tasks(
    agent: ContextTD3,
    family: TaskFamily,
    tasks: tuple | list,
    episodes: int,
    adapt: bool,
    replay: MultiTaskReplay | None = None,
    seed: int = 0,
    infos: list[dict[str, float]] | None = None,
) -> np.ndarray:
    """The mean return of ``episodes`` deterministic episodes on each task ``(len(tasks),)``;
    with ``adapt``, after adapting to the task (snapshot, classifier, updates on ``replay``,
    default ``agent.replay``), rolled back afterwards (each adaptation's ``adapt_info`` is
    appended to ``infos``). The test episodes' starts depend only on ``seed`` and the task's and
    the episode's positions, so adapted and unadapted returns are paired."""
    c = agent.config
    env = family.make(seed)
    steps = episode_steps(family, c)
    train = replay if replay is not None else agent.replay
    if adapt and (train is None or len(train) == 0):
        raise ConfigError("adaptation needs the meta-training replay: run meta_train first")
    returns = []
    for i, task in enumerate(tasks):
        state = checkpoint(agent) if adapt else None
        if adapt:
            rng = np.random.default_rng([seed, i, 1])
            snapshot = collect_snapshot(env, agent, task, c, steps, rng)
            _adapt(agent, snapshot, train, c, rng)
            if infos is not None:
                infos.append(dict(agent.adapt_info))
        starts = [np.random.default_rng([seed, i, 0, j]) for j in range(episodes)]
        returns.append(np.mean([run_episode(env, agent, task, r, steps).total for r in starts]))
        if state is not None:
            rollback(agent, state)
    env.close()
    return np.asarray(returns)

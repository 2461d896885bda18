"""Meta-learned curiosity, the inner loop (Alet, Schneider, Lozano-Pérez & Kaelbling 2020, ICLR):
a PPO agent whose reward is a *curiosity program*'s intrinsic reward combined with the extrinsic
one, trained for one lifetime; the program is scored by the lifetime's performance.

One lifetime (``run_lifetime``, the paper's "trial"): ``envs`` environments step in parallel
for ``steps`` steps each, sharing one agent and one curiosity module. After every PPO rollout of
``frames`` steps the program computes the intrinsic reward of each transition ``(s_t, a_t,
s_{t+1})`` in chunks of ``chunk`` steps, taking one training step of its own nets after each
chunk (as the official code does per curiosity update); the intrinsic reward is divided by its
running standard deviation over the lifetime, combined with the extrinsic reward
(``COMBINERS``), and the combined reward is divided by the running standard deviation of its
discounted return (VecNormalize, clipped at 10) before PPO sees it.

The score: in the empty grid room (no extrinsic reward) the number of distinct states
``(x, y, direction)`` each environment visited over the lifetime, averaged over the
environments; elsewhere the mean extrinsic return of the lifetime's finished episodes.

``Curiosity`` is ``metalab train curiosity``: ``trials`` lifetimes with seeds ``seed``,
``seed + 1``, ...; each finished trial is checkpointed, so an interrupted run resumes at the
next one. The search over programs is ``metalab.rl.curiosity_search``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import gymnasium as gym
import numpy as np
import torch

import metalab
from metalab.config import Settings, recipe_of
from metalab.errors import ConfigError
from metalab.evaluate.protocol import confidence_interval, seeds_interval
from metalab.io import atomic_write
from metalab.plots import plot_band_curves
from metalab.rl.dsl import Program, Welford
from metalab.rl.ppo import PPO, PPOSettings, Rollout
from metalab.rl.train import Loop, RLSummary

# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------


def _empty_room(size: int, max_steps: int) -> gym.Env:
    """The search environment: MiniGrid's empty room without a goal, observed as the full grid
    (object, colour, state per cell; the agent's cell holds agent, red, direction), scaled to
    [0, 1] and flattened; the env keeps ``visited``, the (x, y, direction) it ever stood in."""
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
    from minigrid.core.grid import Grid
    from minigrid.core.mission import MissionSpace
    from minigrid.minigrid_env import MiniGridEnv

    class EmptyRoom(MiniGridEnv):
        def __init__(self) -> None:
            super().__init__(
                mission_space=MissionSpace(mission_func=lambda: "explore"),
                grid_size=size, max_steps=max_steps, see_through_walls=True,
            )  # fmt: skip
            shape = (size * size * 3,)
            self.observation_space = gym.spaces.Box(0.0, 1.0, shape, np.float32)
            self.visited: set[tuple[int, int, int]] = set()
            self._walls: np.ndarray | None = None

        def _gen_grid(self, width: int, height: int) -> None:
            self.grid = Grid(width, height)
            self.grid.wall_rect(0, 0, width, height)
            self.agent_pos, self.agent_dir = (1, 1), 0
            self.mission = "explore"

        def _observe(self) -> np.ndarray:
            if self._walls is None:  # the room never changes: encode it once
                self._walls = self.grid.encode().astype(np.float32)
            grid = self._walls.copy()
            x, y = self.agent_pos
            grid[x, y] = (OBJECT_TO_IDX["agent"], COLOR_TO_IDX["red"], self.agent_dir)
            self.visited.add((int(x), int(y), int(self.agent_dir)))
            return (grid / 10.0).reshape(-1)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed, options=options)
            return self._observe(), {}

        def step(self, action):
            _, reward, terminated, truncated, info = super().step(int(action))
            return self._observe(), float(reward), terminated, truncated, info

    return EmptyRoom()


@dataclass(frozen=True)
class CuriosityEnv:
    """An environment of the protocol: how to make it, its episode length and its score."""

    make: Callable[[], gym.Env]
    description: str
    score: str  # "distinct states" | "mean return"


ENVIRONMENTS: dict[str, CuriosityEnv] = {
    "grid-15": CuriosityEnv(
        lambda: _empty_room(15, 100),
        "MiniGrid empty 15x15 room, no goal, 100-step episodes",
        "distinct states",
    ),
    "grid-30": CuriosityEnv(
        lambda: _empty_room(30, 500),
        "MiniGrid empty 30x30 room, no goal, 500-step episodes (the paper's search env)",
        "distinct states",
    ),
    "acrobot": CuriosityEnv(
        lambda: gym.make("Acrobot-v1", max_episode_steps=100),
        "gymnasium Acrobot-v1, 100-step episodes (the paper's config)",
        "mean return",
    ),
    "lunarlander": CuriosityEnv(
        lambda: gym.make("LunarLander-v3"), "gymnasium LunarLander-v3 (box2d)", "mean return"
    ),
    "hopper": CuriosityEnv(
        lambda: gym.make("Hopper-v5"), "gymnasium Hopper-v5 (MuJoCo)", "mean return"
    ),
}


def make_env(name: str) -> gym.Env:
    if name not in ENVIRONMENTS:
        raise ConfigError(f"unknown curiosity env {name!r}: use one of {', '.join(ENVIRONMENTS)}")
    try:
        return ENVIRONMENTS[name].make()
    except (ImportError, gym.error.DependencyNotInstalled) as e:
        raise ConfigError(
            f"env {name!r} needs a package that is not installed ({e}); "
            "reinstall metalab (pip install -e .), which brings minigrid and box2d"
        ) from None


# ---------------------------------------------------------------------------------------------
# Reward: normalisation and the combiner
# ---------------------------------------------------------------------------------------------


def combine_sum(intrinsic: np.ndarray, extrinsic: np.ndarray, t: np.ndarray, w: float):
    """w * intrinsic + extrinsic (the official code's combination when no combiner is given)."""
    return w * intrinsic + extrinsic


def combine_anneal(intrinsic: np.ndarray, extrinsic: np.ndarray, t: np.ndarray, w: float):
    """The DSL's IntrinsicExtrinsicWeightedNormalizedSum with weights w(1 - t) and t, t the
    normalised lifetime step: curiosity first, the task's reward later in life."""
    wi, we = w * (1.0 - t), t
    total = np.maximum(wi + we, 1e-8)
    return (wi * intrinsic + we * extrinsic) / total


COMBINERS = {"sum": combine_sum, "anneal": combine_anneal}
"""Reward combiners (intrinsic, extrinsic, normalised time, intrinsic weight) -> reward."""


# ---------------------------------------------------------------------------------------------
# One lifetime
# ---------------------------------------------------------------------------------------------


@dataclass
class LifetimeConfig(Settings):
    """How one lifetime runs: the environment, PPO and the reward pipeline."""

    env: str = "grid-15"  # grid-15 | grid-30 | acrobot | lunarlander | hopper
    envs: int = 5  # environments stepping in parallel (the paper's rollouts per trial)
    steps: int = 2500  # steps of each environment in one lifetime
    frames: int = 12  # steps per environment per PPO rollout (the official config: 12)
    chunk: int = 12  # steps per curiosity update (each covers chunk x envs transitions)
    combiner: str = "sum"  # sum | anneal (COMBINERS)
    intrinsic_weight: float = 1.0  # w in the combiner
    normalise: bool = True  # intrinsic reward / its running std; combined reward / return std
    center: bool = False  # also subtract the intrinsic reward's running mean (not the paper's)
    curiosity_lr: float = 0.005  # Adam on the program's nets (the official config)
    lr: float = 2.5e-4  # PPO
    clip: float = 0.1
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    entropy: float = 0.0
    hidden: int = 64  # PPO actor and critic width
    seed: int = 0

    def ppo(self) -> PPOSettings:
        return PPOSettings(
            lr=self.lr, clip=self.clip, epochs=self.epochs, minibatches=self.minibatches,
            gamma=self.gamma, gae_lambda=self.gae_lambda, entropy=self.entropy,
            hidden=self.hidden,
        )  # fmt: skip


@dataclass
class CuriosityConfig(LifetimeConfig):
    """One program's lifetimes (the paper's trials) on one environment."""

    program: str = "fast"  # a reference program (metalab.rl.programs) or candidate:MAX_OPS:INDEX
    trials: int = 5  # lifetimes, seeds seed, seed+1, ...


def resolve_program(name: str) -> Program:
    """A reference program by name, or ``candidate:K:I``: the I-th program of the search's
    candidate list with at most K operations (``metalab.rl.curiosity_search.candidates``)."""
    from metalab.rl.programs import REFERENCE_PROGRAMS

    if name in REFERENCE_PROGRAMS:
        return REFERENCE_PROGRAMS[name]()
    parts = name.split(":")
    if len(parts) == 3 and parts[0] == "candidate" and parts[1].isdigit() and parts[2].isdigit():
        from metalab.rl.curiosity_search import candidates

        pool = candidates(int(parts[1]))
        if int(parts[2]) >= len(pool):
            raise ConfigError(
                f"program {name!r}: there are {len(pool)} candidates with at most {parts[1]} "
                "operations (indices from 0)"
            )
        return pool[int(parts[2])]
    raise ConfigError(
        f"unknown curiosity program {name!r}: use one of {', '.join(REFERENCE_PROGRAMS)} "
        "or candidate:MAX_OPS:INDEX (from `metalab eval SEARCH_RUN`)"
    )


def check_config(c: LifetimeConfig) -> None:
    """One-line errors for lifetime settings that cannot work."""
    if c.env not in ENVIRONMENTS:
        raise ConfigError(f"unknown curiosity env {c.env!r}: use one of {', '.join(ENVIRONMENTS)}")
    if c.combiner not in COMBINERS:
        raise ConfigError(f"unknown combiner {c.combiner!r}: use one of {', '.join(COMBINERS)}")
    for name in ("envs", "steps", "frames", "chunk", "epochs", "minibatches", "hidden"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name}={getattr(c, name)}: must be at least 1")
    if c.frames % c.chunk:
        raise ConfigError(f"chunk={c.chunk} must divide frames={c.frames}")


@dataclass
class Lifetime:
    """What one lifetime gave: its score and how it got there."""

    score: float  # distinct states (grid) or mean extrinsic return of finished episodes
    episodes: int  # finished episodes over all environments
    mean_return: float | None  # mean extrinsic return of those episodes (None: none finished)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (steps per env, score so far)
    seconds: float = 0.0


def _score(kind: str, envs: list[gym.Env], returns: list[float]) -> float:
    if kind == "distinct states":
        return float(np.mean([len(env.unwrapped.visited) for env in envs]))
    return float(np.mean(returns)) if returns else float("nan")


def run_lifetime(program: Program, c: LifetimeConfig, seed: int, points: int = 20) -> Lifetime:
    """One lifetime of a PPO agent curious by ``program`` (see the module docstring); ``points``
    evenly spaced values of the score so far make the curve."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    envs = [make_env(c.env) for _ in range(c.envs)]
    kind = ENVIRONMENTS[c.env].score
    space = envs[0].action_space
    discrete = isinstance(space, gym.spaces.Discrete)
    act_dim = int(space.n) if discrete else int(space.shape[0])
    obs_dim = int(np.prod(envs[0].observation_space.shape))
    obs = np.stack([env.reset(seed=seed * 1000 + i)[0] for i, env in enumerate(envs)]).astype(
        np.float32
    )
    for i, env in enumerate(envs):
        env.action_space.seed(seed * 1000 + i)
    agent = PPO(obs_dim, act_dim, discrete, c.ppo(), generator)
    module = program.instantiate(obs_dim, act_dim, seed, torch.float32, c.curiosity_lr)
    intrinsic_stats, return_stats = Welford(), Welford()
    discounted = np.zeros(c.envs)
    combiner = COMBINERS[c.combiner]
    episode_return = np.zeros(c.envs)
    returns: list[float] = []
    curve: list[tuple[int, float]] = []
    rollouts = math.ceil(c.steps / c.frames)
    marks = {max(1, round(rollouts * (k + 1) / points)) for k in range(points)}
    T, N = c.frames, c.envs
    for r in range(rollouts):
        obs_t = np.zeros((T, N, obs_dim), np.float32)
        obs_next = np.zeros((T, N, obs_dim), np.float32)
        acts = torch.zeros((T, N) if discrete else (T, N, act_dim))
        logp, values = torch.zeros(T, N), torch.zeros(T, N)
        extrinsic, dones = np.zeros((T, N)), np.zeros((T, N))
        bootstrap = []  # (t, i, final obs) of truncated episodes
        for t in range(T):
            actions, lp, v = agent.act(torch.from_numpy(obs))
            acts[t], logp[t], values[t] = actions, lp, v
            obs_t[t] = obs
            for i, env in enumerate(envs):
                action = (
                    actions[i].item()
                    if discrete
                    else np.clip(actions[i].numpy(), space.low, space.high)
                )
                o, rew, terminated, truncated, _ = env.step(action)
                obs_next[t, i] = o
                extrinsic[t, i] = rew
                episode_return[i] += rew
                if terminated or truncated:
                    dones[t, i] = 1.0
                    returns.append(float(episode_return[i]))
                    episode_return[i] = 0.0
                    if truncated and not terminated:
                        bootstrap.append((t, i, o))
                    o, _ = env.reset()
                obs[i] = o
        # Intrinsic reward, one chunk of steps at a time, each followed by a training step.
        intrinsic = np.zeros((T, N))
        a_in = (
            acts
            if discrete
            else torch.as_tensor(np.clip(acts.numpy(), space.low, space.high), dtype=torch.float32)
        )
        for t0 in range(0, T, c.chunk):
            sl = slice(t0, t0 + c.chunk)
            s = torch.from_numpy(obs_t[sl]).reshape(-1, obs_dim)
            s_next = torch.from_numpy(obs_next[sl]).reshape(-1, obs_dim)
            a = a_in[sl].reshape(-1) if discrete else a_in[sl].reshape(-1, act_dim)
            intrinsic[sl] = module.reward(s, a, s_next).reshape(-1, N).double().numpy()
            module.update(s, a, s_next)
        if c.normalise:
            intrinsic_stats.update(intrinsic)
            std = intrinsic_stats.std
            if c.center:
                intrinsic = intrinsic - intrinsic_stats.mean
            intrinsic = intrinsic / std if std > 0 else np.sign(intrinsic)
        now = (r * T + np.arange(T)[:, None] + np.zeros((1, N))) / (rollouts * T)
        combined = combiner(intrinsic, extrinsic, now, c.intrinsic_weight)
        if c.normalise:  # VecNormalize's reward scaling by the discounted return's std
            scaled = np.zeros_like(combined)
            for t in range(T):
                discounted = discounted * c.gamma + combined[t]
                return_stats.update(discounted)
                scale = math.sqrt(return_stats.std**2 + 1e-8)
                scaled[t] = np.clip(combined[t] / scale, -10, 10)
                discounted[dones[t] > 0] = 0.0
            combined = scaled
        rewards = torch.as_tensor(combined, dtype=torch.float32)
        for t, i, o in bootstrap:  # a truncated episode goes on: bootstrap from its last state
            rewards[t, i] += c.gamma * agent.value(torch.as_tensor(o[None], dtype=torch.float32))[0]
        rollout = Rollout(
            torch.from_numpy(obs_t), acts, logp, values, rewards,
            torch.as_tensor(dones, dtype=torch.float32), agent.value(torch.from_numpy(obs)),
        )  # fmt: skip
        agent.update(rollout)
        if r + 1 in marks:
            curve.append(((r + 1) * T, _score(kind, envs, returns)))
    score = _score(kind, envs, returns)
    for env in envs:
        env.close()
    return Lifetime(
        score=score, episodes=len(returns),
        mean_return=float(np.mean(returns)) if returns else None, curve=curve,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# `metalab train curiosity`
# ---------------------------------------------------------------------------------------------


class LifetimeMethod:
    """What ``metalab train curiosity`` and ``curiosity-search`` share: named recipes, a config
    checked on creation, and a ``Loop`` (``Trainer``) that ``train_rl`` runs."""

    name: ClassVar[str]
    Config: ClassVar[type[LifetimeConfig]]
    recipes: ClassVar[dict[str, LifetimeConfig]]
    Trainer: ClassVar[type[Loop]]
    test_time: ClassVar[tuple[str, ...]] = ()
    budget: ClassVar[str]  # the setting `--resume` may raise

    def __init__(self, config: LifetimeConfig) -> None:
        self.check(config)
        self.config = config

    @classmethod
    def recipe(cls, name: str) -> LifetimeConfig:
        return recipe_of(cls, name)

    @staticmethod
    def check(config: LifetimeConfig) -> None:
        """One-line errors for settings that cannot work."""
        raise NotImplementedError

    def make_loop(self, run_dir: Path) -> Loop:
        return self.Trainer(self, run_dir)


class HistoryLoop(Loop):
    """A loop whose iterations are independent (a lifetime, a program scored), so all a resume
    needs is the rows of the finished ones."""

    def __init__(self, method: LifetimeMethod, run_dir: Path) -> None:
        self.method, self.config, self.run_dir = method, method.config, run_dir
        self.iteration = 0
        self.history: list[dict] = []

    def state(self) -> dict:
        return {
            "method": self.method.name,
            "config": asdict(self.config),
            "model": {},  # a lifetime's agent and curiosity nets end with it, as in the paper
            "iteration": self.iteration,
            "history": self.history,
            "metalab_version": metalab.__version__,
        }

    def restore(self, saved: dict) -> None:
        self.iteration, self.history = saved["iteration"], saved["history"]


class Curiosity(LifetimeMethod):
    """``metalab train curiosity``: one program's lifetimes (a reference or a search candidate)
    on one environment."""

    name: ClassVar[str] = "curiosity"
    Config: ClassVar[type[CuriosityConfig]] = CuriosityConfig
    recipes: ClassVar[dict[str, CuriosityConfig]] = {
        # The paper's search budget on its 15x15 room: 5 trials x 5 rollouts x 2500 steps.
        "grid": CuriosityConfig(env="grid-15"),
        # The search's short lifetimes (curiosity-search --recipe grid-cpu): 500 steps, 2 trials.
        "grid-short": CuriosityConfig(env="grid-15", steps=500, trials=2),
        # Transfer, with the search's PPO: Acrobot as the paper (5 x 5 x 5000 steps, 100-step
        # episodes); LunarLander at 25k steps a lifetime (the paper's budget: not stated).
        "acrobot": CuriosityConfig(env="acrobot", steps=5000),
        "lunarlander": CuriosityConfig(env="lunarlander", steps=5000),
        # MuJoCo transfer (the paper: 2048 frames, 32 minibatches, lr 3e-4, clip 0.2, 100k steps,
        # 2 trials; we take 3 for an interval).
        "hopper": CuriosityConfig(
            env="hopper",
            envs=1,
            steps=100_000,
            frames=2048,
            chunk=64,
            minibatches=32,
            epochs=10,
            lr=3e-4,
            clip=0.2,
            trials=3,
        ),  # fmt: skip
    }
    budget: ClassVar[str] = "trials"

    def __init__(self, config: CuriosityConfig) -> None:
        super().__init__(config)
        self.program = resolve_program(config.program)

    @staticmethod
    def check(config: CuriosityConfig) -> None:
        if config.trials < 1:
            raise ConfigError(f"trials={config.trials}: must be at least 1")
        resolve_program(config.program)
        check_config(config)


def trial_rows(history: list[dict]) -> dict:
    """The score over trials: mean, 95% t-interval over trials, per-trial values."""
    scores = [row["score"] for row in history]
    mean, ci = seeds_interval(scores) if scores else (float("nan"), float("nan"))
    return {"score": mean, "ci95": ci, "scores": scores, "trials": len(scores)}


class CuriosityTrainer(HistoryLoop):
    """Runs ``trials`` lifetimes, one per iteration; the checkpoint holds the finished ones."""

    def __init__(self, method: Curiosity, run_dir: Path) -> None:
        super().__init__(method, run_dir)
        self.name = f"curiosity {method.config.program}"

    @property
    def total(self) -> int:
        return self.config.trials

    def iterate(self) -> dict:
        seed = self.config.seed + self.iteration
        life = run_lifetime(self.method.program, self.config, seed)
        row = {"iteration": self.iteration, "seed": seed, **asdict(life)}
        self.iteration += 1
        self.history.append(row)
        return row

    def status(self, row: dict) -> str:
        return f"trial {row['iteration']}: {row['score']:.1f}"

    def save_curve(self) -> Path | None:
        curves = [row["curve"] for row in self.history if row["curve"]]
        if not curves:
            return None
        n = min(len(cv) for cv in curves)
        x = np.array([curves[0][k][0] for k in range(n)])
        values = np.array([[cv[k][1] for k in range(n)] for cv in curves])
        stats = [confidence_interval(values[:, k]) for k in range(n)]
        mean, half = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
        c = self.config
        return plot_band_curves(
            self.run_dir / "returns.png", {c.program: (x, mean, half)},
            "steps per environment", ENVIRONMENTS[c.env].score,
            f"{c.program} on {c.env} ({len(curves)} trials)",
        )  # fmt: skip

    def summary(self, stopped: str) -> RLSummary:
        scores = trial_rows(self.history)["score"] if self.history else None
        steps = sum(1 for _ in self.history) * self.config.steps * self.config.envs
        return RLSummary(self.run_dir, self.iteration, steps, scores, stopped)


def evaluate_curiosity_run(run_dir: Path) -> dict:
    """``metalab eval`` of a curiosity run or search: there is no test phase (a program is
    judged by its lifetimes), so this summarises the finished trials into ``eval.json``."""
    from metalab.rl.train import load_rl_checkpoint

    run_dir = Path(run_dir)
    saved = load_rl_checkpoint(run_dir / "checkpoint.pt")
    if saved["method"] == "curiosity-search":
        from metalab.rl.curiosity_search import evaluate_search

        evaluation = evaluate_search(saved)
    else:
        c = CuriosityConfig(**saved["config"])
        evaluation = {
            "method": Curiosity.name,
            "config": asdict(c),
            "protocol": lifetime_protocol(c),
            "rows": {c.program: trial_rows(saved["history"])},
        }
    atomic_write(run_dir / "eval.json", json.dumps(evaluation, indent=2) + "\n")
    return evaluation


def lifetime_protocol(c: LifetimeConfig) -> dict:
    """What a score means: the environment, the lifetime and how it is scored."""
    return {
        "env": ENVIRONMENTS[c.env].description,
        "score": ENVIRONMENTS[c.env].score,
        "envs": c.envs,
        "steps_per_env": c.steps,
        "combiner": c.combiner,
        "intrinsic_weight": c.intrinsic_weight,
        "center": c.center,
    }


Curiosity.Trainer = CuriosityTrainer  # defined after its method, which it needs

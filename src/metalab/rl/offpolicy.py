"""The meta-training loop and the test protocol of Meta-Q-Learning (:mod:`metalab.rl.mql`), with
or without its context (``--no-use-context``: the paper's TD3 baseline).

Training: each iteration is one round of :func:`~metalab.rl.mql.meta_train` (episodes on random
training tasks, then TD3 steps on the shared replay; the first one also fills the replay with
random actions), and every ``eval_every`` iterations the deterministic policy runs
``eval_episodes`` episodes on each of the family's test tasks, without adaptation. The run
directory gets what every RL run gets (:class:`~metalab.rl.train.Loop`): ``checkpoint.pt``
(agent, optimizers, replay and every random generator: a resumed run continues exactly),
``metrics.jsonl``, TensorBoard scalars and ``returns.png``, the test return over environment
steps with its 95% CI over the test tasks.

Test (``metalab eval``): two rows on the same fixed episodes of every test task, the meta-trained
policy as it is and after MQL's adaptation to each task (rolled back after each), the return of
each task averaged over its episodes, the mean over tasks with its 95% CI, and the paired
difference. Adaptation settings can be changed at test time (``MQL.test_time``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

import metalab
from metalab.errors import ConfigError
from metalab.evaluate.protocol import EVAL_SEED, confidence_interval
from metalab.evaluate.run import apply_test_time
from metalab.io import atomic_write
from metalab.plots import plot_band_curves
from metalab.rl.mql import (
    MQL,
    MQLConfig,
    MultiTaskReplay,
    checkpoint,
    evaluate_tasks,
    meta_train,
    rollback,
)
from metalab.rl.train import Loop, RLSummary


class MQLTrainer(Loop):
    """Runs MQL's meta-training in one run directory. Use :func:`metalab.rl.train.train_rl`."""

    def __init__(self, agent: MQL, run_dir: Path) -> None:
        self.agent, self.config, self.run_dir = agent, agent.config, run_dir
        self.name = agent.name if agent.config.use_context else "td3 (no context)"
        self.rng = np.random.default_rng(agent.config.seed)  # tasks, env seeds, batches
        self.iteration = 0
        self.history: list[dict] = []

    @property
    def total(self) -> int:
        return self.config.iterations

    def state(self) -> dict:
        replay = self.agent.replay
        return {
            "method": MQL.name,
            "config": asdict(self.config),
            **checkpoint(self.agent),  # model, optimizers, update count, target-noise generator
            "iteration": self.iteration,
            "history": self.history,
            "replay": None if replay is None else replay.state(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "metalab_version": metalab.__version__,
        }

    def restore(self, saved: dict) -> None:
        restore_agent(self.agent, saved)
        self.iteration, self.history = saved["iteration"], saved["history"]
        self.rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])

    def iterate(self) -> dict:
        """One meta-training round; every ``eval_every``-th (and the last) also the test tasks."""
        c, agent = self.config, self.agent
        (row,) = meta_train(agent, agent.family, c, iterations=1, rng=self.rng)
        self.iteration += 1
        row = {
            "iteration": self.iteration - 1,
            "steps": agent.replay.shared.written,
            "train_return": row.pop("return"),
            **{k: v for k, v in row.items() if k != "iteration"},
        }
        if self.iteration % c.eval_every == 0 or self.iteration == self.total:
            returns = evaluate_tasks(
                agent, agent.family, agent.family.test_tasks, c.eval_episodes, adapt=False,
                seed=EVAL_SEED,
            )  # fmt: skip
            row["return"], row["return_ci95"] = confidence_interval(returns)
        self.history.append(row)
        return row

    def status(self, row: dict) -> str:
        text = f"{row['steps']:,} steps, train {row['train_return']:.1f}"
        if "return" in row:
            text += f", test {row['return']:.1f} ± {row['return_ci95']:.1f}"
        return text

    def save_curve(self) -> Path | None:
        rows = [r for r in self.history if "return" in r]
        if not rows:
            return None
        c = self.config
        x = np.array([r["steps"] for r in rows])
        mean = np.array([r["return"] for r in rows])
        half = np.array([r["return_ci95"] for r in rows])
        curves = {f"{len(self.agent.family.test_tasks)} test tasks": (x, mean, half)}
        title = (
            f"{self.name} on {c.task}: return of the deterministic policy without adaptation "
            f"({c.eval_episodes} episodes per task, 95% CI over tasks)"
        )
        return plot_band_curves(
            self.run_dir / "returns.png", curves, "environment steps", "return", title
        )

    def summary(self, stopped: str) -> RLSummary:
        tested = [r["return"] for r in self.history if "return" in r]
        steps = self.agent.replay.shared.written if self.agent.replay is not None else 0
        return RLSummary(
            self.run_dir, self.iteration, steps, tested[-1] if tested else None, stopped
        )


def restore_agent(agent: MQL, saved: dict) -> None:
    """Load a checkpoint's agent: weights, optimizers, update count, generator and replay."""
    rollback(agent, saved)
    agent.replay = None if saved["replay"] is None else MultiTaskReplay.from_state(saved["replay"])


def load_mql(path: Path) -> tuple[MQL, dict]:
    """The meta-trained agent of an MQL checkpoint, with its replay (what adaptation reuses),
    and the checkpoint."""
    from metalab.rl.train import load_rl_checkpoint

    saved = load_rl_checkpoint(path, MQL.name)
    agent = MQL(MQLConfig(**saved["config"]))
    restore_agent(agent, saved)
    return agent, saved


def check_mql_config(config: MQLConfig) -> None:
    """One-line errors for settings that cannot work."""
    from metalab.rl.pearl import get_goal_family

    get_goal_family(config.task)
    if config.prox not in ("fixed", "ess"):
        raise ConfigError(f"prox={config.prox!r}: use fixed or ess")
    positive = ("hidden", "layers", "history_length", "context_hidden", "batch_size",
                "replay_size", "max_path_length", "num_tasks_sample", "snapshot_size",
                "sample_mult", "eval_episodes", "eval_every", "policy_freq")  # fmt: skip
    for f in fields(config):
        if f.name in positive and getattr(config, f.name) < 1:
            raise ConfigError(f"{f.name}={getattr(config, f.name)}: it must be at least 1")
    if config.num_initial_steps < 1 and config.num_train_steps > 0:
        raise ConfigError(
            f"num_initial_steps={config.num_initial_steps}: TD3 needs some random steps in the "
            "replay before its first update"
        )


def evaluate_mql_run(
    run_dir: Path, episodes: int | None = None, test_time: dict | None = None
) -> dict:
    """The meta-trained policy of ``run_dir`` on every test task, as it is and after adapting to
    each task; written to ``eval.json`` and returned (``{"protocol", "rows", "difference",
    "adaptation"}``)."""
    run_dir = Path(run_dir)
    agent, saved = load_mql(run_dir / "checkpoint.pt")
    agent.config = c = apply_test_time(agent, test_time or {})
    if episodes is not None:
        c = agent.config = c.updated(eval_episodes=episodes)
    family = agent.family
    protocol = {
        "task": c.task,
        "test_tasks": len(family.test_tasks),
        "episodes_per_task": c.eval_episodes,
        "episode_steps": min(c.max_path_length, family.max_steps),
        "use_context": c.use_context,
        "trained_iterations": saved["iteration"],
        "trained_steps": agent.replay.shared.written if agent.replay is not None else 0,
        "seed": EVAL_SEED,
        "adaptation": {k: getattr(c, k) for k in MQL.test_time if k != "eval_episodes"},
    }
    tasks = family.test_tasks
    plain = evaluate_tasks(agent, family, tasks, c.eval_episodes, adapt=False, seed=EVAL_SEED)
    infos: list[dict[str, float]] = []
    adapted = evaluate_tasks(
        agent, family, tasks, c.eval_episodes, adapt=True, seed=EVAL_SEED, infos=infos
    )
    label = "TD3+context" if c.use_context else "TD3"
    rows = {}
    for name, returns in ((f"{label}, no adaptation", plain), (f"{label}, adapted (MQL)", adapted)):
        mean, ci = confidence_interval(returns.tolist())
        rows[name] = {"return": mean, "ci95": ci, "returns": returns.tolist()}
    mean, ci = confidence_interval((adapted - plain).tolist())
    evaluation = {
        "method": MQL.name,
        "config": asdict(c),
        "protocol": protocol,
        "rows": rows,
        "difference": {"return": mean, "ci95": ci, "better": int((adapted > plain).sum())},
        "adaptation": {k: float(np.mean([i[k] for i in infos])) for k in infos[0]} if infos else {},
    }
    store(run_dir / "eval.json", evaluation, test_time or {}, episodes)
    return evaluation


def store(path: Path, evaluation: dict, test_time: dict, episodes: int | None) -> None:
    """Write ``evaluation`` into ``eval.json``: at the top level for the run's own settings, under
    ``variants["name=value,..."]`` for ``--test-time`` / ``--episodes`` changes; what was stored
    for a checkpoint trained further is dropped."""
    stored = json.loads(path.read_text()) if path.exists() else {}
    steps = evaluation["protocol"]["trained_steps"]
    if stored.get("trained_steps", stored.get("protocol", {}).get("trained_steps")) != steps:
        stored = {"trained_steps": steps}
    changes = {**test_time, **({"eval_episodes": episodes} if episodes is not None else {})}
    if changes:
        key = ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
        stored.setdefault("variants", {})[key] = evaluation
    else:
        stored = {**stored, **evaluation}
    atomic_write(path, json.dumps(stored, indent=2) + "\n")

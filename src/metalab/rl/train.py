"""The collect-fit loop of model-based meta-RL, with checkpoints and resume.

Iteration 0 collects ``random_rollouts`` rollouts of random actions; every iteration then fits
the model to all data so far and collects ``rollouts`` more with its controller, each under a
training perturbation drawn from the task family (Nagabandi et al. 2019, Alg. 1). After every
iteration the run directory gets ``checkpoint.pt`` (model, optimizer, replay and every random
generator, written atomically, so ``resume`` continues exactly), a ``metrics.jsonl`` line,
TensorBoard scalars and ``returns.png``, the return of each iteration's rollouts with its 95% CI.

:class:`Loop` is what every RL training loop shares (the budget, Ctrl-C, checkpoints, logs);
:class:`RLTrainer` is the collect-fit loop on it, ``metalab.rl.offpolicy.MQLTrainer`` the
meta-training of Meta-Q-Learning. :func:`train_rl` picks the loop by the config's type.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import metalab
from metalab.errors import CheckpointError, ConfigError
from metalab.evaluate.protocol import confidence_interval
from metalab.io import atomic_write
from metalab.plots import plot_band_curves
from metalab.rl import RL_METHODS, get_rl_method
from metalab.rl.base import RLConfig, RLMethod
from metalab.rl.rollout import RandomController, Replay, rollout
from metalab.rundir import load_checkpoint, save_checkpoint
from metalab.train import progress_bar, stop_on_sigint


@dataclass
class RLSummary:
    run_dir: Path
    iterations: int  # finished, the random iteration 0 included
    transitions: int
    last_return: float | None  # mean return of the last iteration's rollouts
    stopped: str  # "iterations" | "minutes" | "interrupted"


class Loop:
    """What every RL training loop shares: ``run`` calls ``iterate`` until ``total`` iterations,
    the ``--minutes`` budget or Ctrl-C, and after each writes a ``metrics.jsonl`` line,
    TensorBoard scalars, an atomic ``checkpoint.pt`` (``state``) and the curve (``save_curve``)."""

    name: str
    run_dir: Path
    iteration: int  # iterations finished
    history: list[dict]

    @property
    def total(self) -> int:
        raise NotImplementedError

    def iterate(self) -> dict:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def save_curve(self) -> Path | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the loop holds beyond the run (e.g. worker processes); after ``run``."""

    def status(self, row: dict) -> str:
        """The progress bar's text after ``row``."""
        return f"return {row['return']:.1f} ± {row['return_ci95']:.1f}"

    def summary(self, stopped: str) -> RLSummary:
        raise NotImplementedError

    def run(self, minutes: float | None, progress: bool) -> RLSummary:
        deadline = time.monotonic() + 60 * minutes if minutes else math.inf
        try:
            stopped = self._loop(deadline, progress)
        finally:
            self.close()
        return self.summary(stopped)

    def _loop(self, deadline: float, progress: bool) -> str:
        from torch.utils.tensorboard import SummaryWriter

        stopped = "iterations"
        bar = progress_bar("it", disable=not progress)
        with (
            stop_on_sigint() as interrupted,
            open(self.run_dir / "metrics.jsonl", "a") as log,
            SummaryWriter(str(self.run_dir / "tb"), purge_step=self.iteration or None) as writer,
            bar,
        ):
            task = bar.add_task(self.name, total=self.total, completed=self.iteration, status="")
            while self.iteration < self.total:
                if interrupted or time.monotonic() > deadline:
                    stopped = "interrupted" if interrupted else "minutes"
                    break
                row = self.iterate()
                log.write(json.dumps({"kind": "train", **row}) + "\n")
                log.flush()
                for key, value in row.items():
                    if key != "iteration" and isinstance(value, (int, float)):
                        writer.add_scalar(f"train/{key}", value, row["iteration"])
                save_checkpoint(self.state(), self.run_dir / "checkpoint.pt")
                self.save_curve()
                bar.update(task, completed=self.iteration, status=self.status(row))
        return stopped


class RLTrainer(Loop):
    """Runs one model-based method's collect-fit loop in one run directory. Use :func:`train_rl`."""

    def __init__(self, method: RLMethod, run_dir: Path) -> None:
        self.method, self.config, self.run_dir = method, method.config, run_dir
        self.name = method.name
        c = self.config
        self.env = method.family.make(c.frame_skip)
        self.optimizer = method.make_optimizer()
        self.replay = Replay()
        self.rng = np.random.default_rng(c.seed)  # perturbations, env seeds, fitting order
        self.generator = torch.Generator().manual_seed(c.seed)  # the planner's samples
        self.iteration = 0  # iterations finished; 0 = not even the random rollouts
        self.history: list[dict] = []

    @property
    def total(self) -> int:
        return self.config.iterations + 1  # iteration 0: the random rollouts

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "method": self.method.name,
            "config": asdict(self.config),
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "replay": self.replay.state(),
            "history": self.history,
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "metalab_version": metalab.__version__,
        }

    def restore(self, checkpoint: dict) -> None:
        self.method.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.iteration, self.history = checkpoint["iteration"], checkpoint["history"]
        self.replay = Replay.from_state(checkpoint["replay"])
        self.rng.bit_generator.state = checkpoint["rng"]
        self.generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["torch_rng"])

    # -- one iteration ------------------------------------------------------------------------
    def collect(self, controller, count: int) -> list:
        """``count`` rollouts under training perturbations drawn from the family."""
        c, family = self.config, self.method.family
        found = []
        for _ in range(count):
            perturbation = family.sample_train(self.rng)
            seed = int(self.rng.integers(2**31))
            trajectory = rollout(
                self.env, controller, c.episode_steps, perturbation, seed,
                perturbation.describe(family),
            )  # fmt: skip
            self.replay.add(trajectory)
            found.append(trajectory)
        return found

    def iterate(self) -> dict:
        """Iteration 0: random rollouts, then a fit; later ones: controller rollouts with the
        current model, then a fit on everything."""
        c, start = self.config, time.perf_counter()
        if self.iteration == 0:
            env = self.env
            random = RandomController(env.action_space.low, env.action_space.high, self.rng)
            collected = self.collect(random, c.random_rollouts)
        else:
            collected = self.collect(self.method.controller(self.generator), c.rollouts)
        collect_s = time.perf_counter() - start
        fit = self.method.fit(self.replay, self.optimizer, self.rng)
        returns = [t.total for t in collected]
        mean, ci = confidence_interval(returns)
        self.iteration += 1
        row = {
            "iteration": self.iteration - 1,
            "transitions": len(self.replay),
            "return": mean,
            "return_ci95": ci,
            **fit,
            "collect_s": collect_s,
            "fit_s": time.perf_counter() - start - collect_s,
        }
        self.history.append(row)
        return row

    def save_curve(self) -> Path:
        rows = self.history
        x = np.array([r["iteration"] for r in rows])
        mean = np.array([r["return"] for r in rows])
        half = np.array([r["return_ci95"] for r in rows])
        c = self.config
        title = f"{self.method.name} on {c.task}: training rollouts (iteration 0: random actions)"
        return plot_band_curves(
            self.run_dir / "returns.png", {self.method.name: (x, mean, half)},
            "iteration", f"return ({c.episode_steps} steps)", title,
        )  # fmt: skip

    def summary(self, stopped: str) -> RLSummary:
        last = self.history[-1]["return"] if self.history else None
        return RLSummary(self.run_dir, self.iteration, len(self.replay), last, stopped)


def load_rl_checkpoint(path: Path, method_name: str | None = None) -> dict:
    """Read an RL checkpoint, checking it is one of ours (and of ``method_name`` when given)."""
    return load_checkpoint(path, method_name, known=RL_METHODS)


def load_rl_method(path: Path) -> tuple[RLMethod, dict]:
    """Rebuild a trained RL method from a checkpoint (in eval mode) and return the checkpoint."""
    checkpoint = load_rl_checkpoint(path)
    cls = get_rl_method(checkpoint["method"])
    method = cls(cls.Config(**checkpoint["config"]))
    try:
        method.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit {cls.name} with its saved config: {first}"
        ) from None
    return method.eval(), checkpoint


def check_config(config: RLConfig) -> None:
    """One-line errors for settings that cannot work."""
    if config.planner not in ("random", "cem"):
        raise ConfigError(f"planner={config.planner!r}: use random or cem")
    positive = ("episode_steps", "candidates", "plan_horizon", "past", "rollouts", "epochs",
                "hidden", "layers", "future", "meta_batch", "inner_steps", "sequence", "batch")  # fmt: skip
    for name in (n for n in positive if hasattr(config, n)):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)}: it must be at least 1")
    span = config.past + getattr(config, "future", 0)
    if span > config.episode_steps:
        raise ConfigError(
            f"past + future = {span} transitions per window, but rollouts have episode_steps="
            f"{config.episode_steps}: use shorter windows or longer rollouts"
        )
    if config.random_rollouts < 2:
        raise ConfigError(
            f"random_rollouts={config.random_rollouts}: the first fit needs at least 2 rollouts "
            "(one is held out to stop early)"
        )


def train_rl(
    method_name: str,
    config: Any,
    run_dir: Path,
    *,
    minutes: float | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> RLSummary:
    """Train ``method_name`` with ``config`` in ``run_dir`` (created), or resume the run there.

    On resume the saved config wins except the budget (``iterations``; the class's ``budget``
    names another, e.g. curiosity's ``trials``), which may be raised."""
    if device not in ("auto", "cpu"):
        raise ConfigError(
            f"--device {device}: the RL methods run on the CPU (the simulator steps one "
            "environment at a time); leave --device out"
        )
    cls = get_rl_method(method_name)
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = None
    if resume:
        checkpoint = load_rl_checkpoint(checkpoint_path, method_name)
        budget = getattr(cls, "budget", "iterations")  # the one setting a resume may raise
        config = cls.Config(**{**checkpoint["config"], budget: getattr(config, budget)})
    elif checkpoint_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume to continue it or choose another --run-dir"
        )
    if isinstance(config, RLConfig):  # model-based: the collect-fit loop
        check_config(config)
        make = RLTrainer
    elif hasattr(cls, "make_loop"):  # a method with its own loop (curiosity, its search)
        cls.check(config)
        make = lambda method, path: method.make_loop(path)  # noqa: E731
    else:  # Meta-Q-Learning: off-policy meta-training
        from metalab.rl.offpolicy import MQLTrainer, check_mql_config

        check_mql_config(config)
        make = MQLTrainer
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"method": method_name, **asdict(config)}, indent=2) + "\n"
    atomic_write(run_dir / "config.json", text)
    torch.manual_seed(config.seed)
    trainer = make(cls(config), run_dir)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    return trainer.run(minutes, progress)

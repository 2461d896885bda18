"""Test protocol for the model-based meta-RL methods: returns with 95% CIs on fixed test
rollouts, and the k-step error of the model after adaptation.

Every row of a run (``RLMethod.eval_rows``: e.g. MB and MB+DE from one model) drives the robot
through the same rollouts: for each of the family's test conditions (``seen``: the training
perturbations in turn, ``unseen``: a held-out part, ``switch``: the perturbation changes
mid-episode), ``rollouts`` episodes whose environment and planner seeds are fixed by their index,
so rows and methods are compared on the same starts. The model error is measured on the row's own
rollouts (the states its controller visits): from every ``ERROR_STRIDE``-th step after the first
``past``, the model adapts to the transitions before it as the controller did, predicts ``k``
steps open loop with the actions taken, and the root mean squared error over all state dimensions
(in the environment's units) is averaged per ``k``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from metalab.errors import ConfigError
from metalab.evaluate.protocol import EVAL_SEED, confidence_interval
from metalab.evaluate.run import apply_test_time
from metalab.io import atomic_write
from metalab.rl.base import RLMethod
from metalab.rl.rollout import Trajectory, rollout
from metalab.rl.train import load_rl_method

ERROR_STRIDE = 5  # steps between the starts of k-step predictions
ERROR_STEPS = 10  # k = 1..ERROR_STEPS (the planning horizon of the CPU recipe)


def model_error(
    method: RLMethod, trajectories: list[Trajectory], adapt: bool | None, k: int = ERROR_STEPS
) -> np.ndarray:
    """RMSE of the ``1..k``-step open-loop predictions over ``trajectories``: ``(k,)``."""
    squared = []
    for traj in trajectories:
        starts = np.arange(method.config.past, len(traj) - k + 1, ERROR_STRIDE)
        if len(starts) == 0:
            continue
        predicted = method.predict_ahead(traj, starts, k, adapt)  # (S, k, d)
        truth = np.stack([traj.obs[t + 1 : t + k + 1] for t in starts])
        squared.append(((predicted - truth) ** 2).mean(-1))  # (S, k)
    return np.sqrt(np.concatenate(squared).mean(0)) if squared else np.full(k, np.nan)


def test_rollouts(
    method: RLMethod, adapt: bool | None, rollouts: int, seed: int = EVAL_SEED
) -> list[Trajectory]:
    """The fixed test rollouts of one row: ``rollouts`` per test condition."""
    c = method.config
    env = method.family.make(c.frame_skip)
    found = []
    for i, (condition, perturbation) in enumerate(
        method.family.test_conditions(rollouts, c.episode_steps)
    ):
        generator = torch.Generator().manual_seed(seed + i)
        controller = method.controller(generator, adapt)
        found.append(rollout(env, controller, c.episode_steps, perturbation, seed + i, condition))
    env.close()
    return found


def describe_conditions(method: RLMethod, rollouts: int) -> dict[str, str]:
    """Each test condition in words, e.g. ``{"seen": "bshin, bfoot, fthigh, fshin disabled in
    turn", "unseen": "ffoot disabled", ...}``."""
    family, found = method.family, {}
    for name, p in family.test_conditions(rollouts, method.config.episode_steps):
        found.setdefault(name, []).append(p.describe(family))
    return {
        name: texts[0] if len(set(texts)) == 1 else "; ".join(dict.fromkeys(texts)) + " in turn"
        for name, texts in found.items()
    }


def evaluate_rl_run(
    run_dir: Path,
    rollouts: int | None = None,
    test_time: dict | None = None,
    refused: list[str] | None = None,
) -> dict:
    """Every row of the run in ``run_dir`` on its fixed test rollouts; merged into ``eval.json``
    (keyed by row) and returned: ``{"protocol": ..., "rows": {label: {...}}}``. ``refused``: the
    image-protocol flags given on the command line, a ConfigError if any."""
    run_dir = Path(run_dir)
    if refused:
        raise ConfigError(
            f"{' and '.join(refused)}: for image episodes, and {run_dir} is an RL run "
            "(its protocol: --episodes rollouts per test condition, --test-time)"
        )
    method_name = json.loads((run_dir / "config.json").read_text())["method"]
    if method_name in ("curiosity", "curiosity-search"):
        from metalab.rl.curiosity import evaluate_curiosity_run

        if rollouts or test_time:
            raise ConfigError(
                f"{run_dir} is a curiosity run: it is scored by its own lifetimes, so "
                "--episodes and --test-time do not apply"
            )
        return evaluate_curiosity_run(run_dir)
    if method_name == "mql":
        from metalab.rl.offpolicy import evaluate_mql_run

        return evaluate_mql_run(run_dir, rollouts, test_time)
    method, checkpoint = load_rl_method(run_dir / "checkpoint.pt")
    method.config = c = apply_test_time(method, test_time or {})
    rollouts = rollouts or c.test_rollouts
    protocol = {
        "task": c.task,
        "frame_skip": c.frame_skip,
        "episode_steps": c.episode_steps,
        "rollouts_per_condition": rollouts,
        "conditions": describe_conditions(method, rollouts),
        "planner": c.planner,
        "candidates": c.candidates,
        "plan_horizon": c.plan_horizon,
        "past": c.past,
        "seed": EVAL_SEED,
        "trained_iterations": checkpoint["iteration"],
        "trained_transitions": sum(len(t["actions"]) for t in checkpoint["replay"]),
        "error": f"RMSE of k-step predictions, every {ERROR_STRIDE}th step",
    }
    rows = {}
    for label, adapt in method.eval_rows():
        trajectories = test_rollouts(method, adapt, rollouts)
        by_condition: dict[str, list[float]] = {}
        for t in trajectories:
            by_condition.setdefault(t.condition, []).append(t.total)
        row = {}
        for condition, returns in by_condition.items():
            mean, ci = confidence_interval(returns)
            row[condition] = {"return": mean, "ci95": ci, "returns": returns}
        row["error"] = model_error(method, trajectories, adapt).tolist()
        row["error_by_condition"] = {
            cond: model_error(method, [t for t in trajectories if t.condition == cond], adapt)
            .tolist()
            for cond in by_condition
        }  # fmt: skip
        rows[label] = row
    path = run_dir / "eval.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored.get("protocol") != protocol:
        stored = {}  # another protocol: start afresh rather than mix
    stored = {"method": method.name, "config": asdict(c), "protocol": protocol,
              "rows": {**stored.get("rows", {}), **rows}}  # fmt: skip
    atomic_write(path, json.dumps(stored, indent=2) + "\n")
    return stored

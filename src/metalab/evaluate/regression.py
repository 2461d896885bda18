"""Regression tasks (Finn et al. 2017, Sec. 5.1 and App. C): query MSE after 1, 5 and 10 inner steps
on K support points of fixed tasks of the run's family (sinusoids, or the ambiguous sinusoids and
lines of PLATIPUS), for a meta-trained model and, beside it, a "pretrained on all tasks" baseline
whose step size is tuned on validation tasks. The error is to the noise-free function (the
sinusoids have no noise; the ambiguous tasks' query targets do, std 0.3, which the MSE to the
targets would add, squared, to every model).

A method answers through ``regression_curve(batch, steps, lr)`` (the MSE after 0..steps steps)
and ``lr(test=True)``; a model trained without an inner step (``config.inner_steps == 0``) is the
pretrained baseline, and its step size is tuned here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metalab.evaluate.protocol import (
    EVAL_SEED,
    Result,
    answers,
    confidence_interval,
    require_answers,
)
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.regression import ARML_2D_FAMILIES, FAMILIES

REGRESSION_STEPS = (1, 5, 10)  # Finn et al. 2017, App. C: MSE after 1, 5 and 10 steps
REGRESSION_SHOTS = (5, 10, 20)  # K of App. C's table
LR_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # step sizes tried for a pretrained net


def family_tasks(
    family: str, shots: int, queries: int, tasks: int, seed: int
) -> tuple[TaskBatch, np.ndarray]:
    """``tasks`` fixed tasks of ``family`` (:data:`~metalab.tasks.regression.FAMILIES`; task i
    depends only on (seed, i)) and the noise-free targets of their query points ``(T, Q, 1)``."""
    batch, info = FAMILIES[family](shots, queries, seed=seed).fixed_set(tasks)
    return batch, info["clean"][:, shots:]


@torch.no_grad()
def evaluate_regression(
    method,
    shots: int,
    tasks: int = 600,
    steps: Sequence[int] = REGRESSION_STEPS,
    queries: int = 100,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
    lr: float | None = None,
    family: str = "sinusoid",
) -> list[Result]:
    """MSE to the noise-free function at the query points of a regression method after each of
    ``steps`` inner steps on ``shots`` support points, over ``tasks`` fixed tasks of ``family``
    (task i depends only on (seed, i)).

    ``queries`` points per task estimate each task's error; the expected MSE is the same for any
    number (Finn's code used ``shots``), more only narrow the interval."""
    batch, clean = family_tasks(family, shots, queries, tasks, seed)
    batch = TaskBatch(
        batch.support_x, batch.support_y, batch.query_x, torch.from_numpy(clean).float()
    )
    lr = method.lr(test=True) if lr is None else lr
    curve = method.regression_curve(batch.to(device), max(steps), lr).cpu().numpy()
    protocol = {
        "dataset": family,
        "metric": "mse",
        "shots": shots,
        "queries": queries,
        "episodes": tasks,
        "seed": seed,
        "inner_lr": lr,
    }
    return [Result(*confidence_interval(curve[:, k]), {**protocol, "steps": k}) for k in steps]


def tune_inner_lr(
    method,
    shots: int,
    steps: int = max(REGRESSION_STEPS),
    tasks: int = 200,
    device="cpu",
    family: str = "sinusoid",
) -> float:
    """The step size of :data:`LR_GRID` with the lowest MSE after ``steps`` steps on validation
    tasks (seed ``EVAL_SEED + 1``, never the test tasks): Finn et al.'s "tuned step size" for the
    pretrained baseline."""
    scores = {}
    for lr in LR_GRID:
        with np.errstate(invalid="ignore", over="ignore"):  # a too-large step may diverge
            mse = evaluate_regression(
                method, shots, tasks, (steps,), seed=EVAL_SEED + 1, device=device, lr=lr,
                family=family,
            )[0].mean  # fmt: skip
        scores[lr] = mse if math.isfinite(mse) else math.inf
    return min(scores, key=scores.get)


@dataclass
class RegressionComparison:
    """Rows of App. C's table, ``(model label, Result)`` for each model, K and step count, and
    the figure's arguments (:func:`metalab.plots.plot_sinusoid`) when the first model adapts."""

    rows: list[tuple[str, Result]] = field(default_factory=list)
    figure: dict | None = None


def compare_regression(
    models: Sequence[tuple[str, torch.nn.Module]],
    shots: Sequence[int] = REGRESSION_SHOTS,
    tasks: int = 600,
    queries: int = 100,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
    figure: Path | None = None,
    family: str = "sinusoid",
    steps: Sequence[int] = REGRESSION_STEPS,
) -> RegressionComparison:
    """App. C's comparison: every model of ``models`` (label, method) on the same fixed tasks of
    ``family`` for each K of ``shots`` after each of ``steps``; a model trained without an inner
    step gets the step size of :func:`tune_inner_lr` (for the largest of ``steps``). ``figure``: where Fig. 2 of the first model goes (with the second,
    if any, as the baseline at its tuned step size for K = 5), see :func:`regression_figure`."""
    out, tuned = RegressionComparison(), {}
    for label, model in models:
        require_answers(model, "regression")
        for k in shots:
            lr = None
            if model.config.inner_steps == 0:  # trained without an inner step: tune alpha
                lr = tuned[(label, k)] = tune_inner_lr(
                    model, k, max(steps), device=device, family=family
                )
            for result in evaluate_regression(
                model, k, tasks, steps, queries, seed, device, lr, family
            ):
                result.protocol.update(model=label)
                out.rows.append((label, result))
    if figure is not None:
        base_label, base = models[1] if len(models) > 1 else (None, None)
        out.figure = regression_figure(models[0][1], figure, base, tuned.get((base_label, 5)), seed)
    return out


def regression_figure(
    method, path: Path, baseline=None, baseline_lr: float | None = None, seed: int = EVAL_SEED
) -> dict | None:
    """The arguments of :func:`metalab.plots.plot_sinusoid` (Finn et al.'s Fig. 2) for a method
    meta-trained to adapt (``inner_steps > 0``) on sinusoids; else None (other families are drawn
    by :func:`metalab.plots.plot_function_samples`)."""
    if not answers(method, "regression") or method.config.inner_steps == 0:
        return None
    if method.config.data != "sinusoid":
        return None
    return {
        "method": method,
        "path": path,
        "baseline": baseline,
        "baseline_lr": baseline_lr,
        "seed": seed,
    }


REPORT_STEPS = (5, 20)  # ARML's 2-D script: the training and the test inner steps


@torch.no_grad()
def regression_errors(
    method,
    family: str | None = None,
    tasks: int = 1000,
    shots: int = 10,
    queries: int = 10,
    steps: tuple[int, ...] = REPORT_STEPS,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> list[tuple[str, Result]]:
    """ARML's 2-D protocol (Yao et al. 2020's code) for any regression method with
    ``regression_curve`` (ARML, MAML):
    ``tasks`` fixed test tasks of ``family`` (default: the method's) with ``shots`` support and
    ``queries`` query points (the code's 10 and 10), the MSE after each of ``steps`` to the
    noisy query targets (what the code averages: the paper's number) and to the noise-free
    function; mean +- 1.96 sd / sqrt(n) over all tasks and over the tasks of each family.

    Returns:
        ``(label, Result)`` rows, labelled ``"<family or all>, <noisy | noise-free> targets"``.
    """
    family = family or method.config.data
    batch, info = FAMILIES[family](shots, queries, seed=seed).fixed_set(tasks)
    clean = torch.from_numpy(info["clean"][:, shots:]).to(batch.query_y)
    lr = method.lr(test=True)
    curves = {}
    for target, y in (("noisy", batch.query_y), ("noise-free", clean)):
        scored = TaskBatch(batch.support_x, batch.support_y, batch.query_x, y).to(device)
        curves[target] = method.regression_curve(scored, max(steps), lr).double().cpu().numpy()
    groups = {"all": np.ones(tasks, bool)}
    if "family" in info:
        names = ARML_2D_FAMILIES if family == "arml-2d" else None
        for f in np.unique(info["family"]):
            groups[names[f] if names else f"family {f}"] = info["family"] == f
    protocol = {
        "dataset": family,
        "metric": "mse",
        "shots": shots,
        "queries": queries,
        "seed": seed,
        "inner_lr": lr,
    }
    rows = []
    for k in steps:
        for target, curve in curves.items():
            for group, mask in groups.items():
                stats = confidence_interval(np.nan_to_num(curve[mask, k], nan=np.inf))
                p = {**protocol, "episodes": int(mask.sum()), "steps": k, "targets": target}
                rows.append((f"{group}, {target} targets", Result(*stats, {**p, "family": group})))
    return rows

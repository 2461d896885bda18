"""The evaluation protocol: fixed seeded test episodes, mean accuracy ± 1.96·sd/√n, Lake-run scoring.

Every result carries its protocol (dataset, split, ways, shots, queries, episodes, seed), so a number
never travels without what it means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from metalab.tasks.episodes import EpisodeSampler

EVAL_SEED = 2017  # the default fixed seed of test episodes (not the training seed)


@dataclass
class Result:
    """Mean accuracy with its 95% confidence interval, both in [0, 1], and the protocol; or, when
    ``protocol["metric"] == "mse"``, a mean squared error."""

    mean: float
    ci95: float
    protocol: dict

    def __str__(self) -> str:
        if self.protocol.get("metric") == "mse":
            return f"{self.mean:.3f} ± {self.ci95:.3f}"
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}%"

    def to_dict(self) -> dict:
        return asdict(self)


def confidence_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the 95% half-width 1.96·sd/√n (sd with n-1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    sd = values.std(ddof=1) if n > 1 else 0.0
    return float(values.mean()), float(1.96 * sd / math.sqrt(n))


@torch.no_grad()
def evaluate(
    method: torch.nn.Module,
    sampler: EpisodeSampler,
    episodes: int = 600,
    device: torch.device | str = "cpu",
) -> Result:
    """Accuracy of ``method.predict`` over ``episodes`` fixed episodes of ``sampler``.

    The episodes depend only on the sampler's dataset, shape and seed (see
    :meth:`EpisodeSampler.fixed_indices`), never on how far a training stream has advanced.
    The method is put in eval mode for the call and restored afterwards.
    """
    was_training = method.training
    method.eval()
    indices = sampler.fixed_indices(episodes)
    accuracies = np.empty(episodes)
    try:
        for i in range(episodes):
            episode = sampler.episode_from_indices(indices[i]).to(device)
            logits = predict_queries(method, episode)
            accuracies[i] = (logits.argmax(-1) == episode.query_y).float().mean().item()
    finally:
        method.train(was_training)
    mean, ci = confidence_interval(accuracies)
    extra = method.protocol() if hasattr(method, "protocol") else {}
    return Result(mean, ci, {**sampler.protocol(), "episodes": episodes, **extra})


def predict_queries(method: torch.nn.Module, episode) -> torch.Tensor:
    """``method.predict_episode`` (a :class:`~metalab.methods.base.Method`), or ``predict`` on the
    support set for any other module with that call."""
    if hasattr(method, "predict_episode"):
        return method.predict_episode(episode)
    return method.predict(episode.support_x, episode.support_y, episode.query_x)


@torch.no_grad()
def evaluate_lake_runs(
    method: torch.nn.Module, runs: Sequence, device: torch.device | str = "cpu"
) -> dict:
    """Score a method on Lake's 20-way within-alphabet one-shot runs (error in %).

    Each run's 20 training images are the support set (one per class) and its 20 test images the
    queries; the prediction is the arg-max of ``method.predict``.
    """
    from metalab.tasks.lake import lake_error

    was_training = method.training
    method.eval()
    predictions = []
    try:
        for run in runs:
            support = _ink_tensor(run.train, device)
            query = _ink_tensor(run.test, device)
            labels = torch.arange(len(run.train), device=device)
            predictions.append(method.predict(support, labels, query).argmax(-1).cpu().numpy())
    finally:
        method.train(was_training)
    return lake_error(predictions, runs)


def _ink_tensor(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(images).to(device=device, dtype=torch.float32).div_(255.0)[:, None]


REGRESSION_STEPS = (1, 5, 10)  # Finn et al. 2017, App. C: MSE after 1, 5 and 10 steps
LR_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # step sizes tried for a pretrained net


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
) -> list[Result]:
    """Query MSE of a regression method after each of ``steps`` inner steps on ``shots`` support
    points, over ``tasks`` fixed sinusoid tasks (task i depends only on (seed, i)).

    ``queries`` points per task estimate each task's error; the expected MSE is the same for any
    number (Finn's code used ``shots``), more only narrow the interval."""
    from metalab.tasks.regression import SinusoidTasks

    batch, _, _ = SinusoidTasks(shots, queries, seed=seed).fixed(tasks)
    lr = method.lr(test=True) if lr is None else lr
    curve = method.regression_curve(batch.to(device), max(steps), lr).cpu().numpy()
    protocol = {
        "dataset": "sinusoid",
        "metric": "mse",
        "shots": shots,
        "queries": queries,
        "episodes": tasks,
        "seed": seed,
        "inner_lr": lr,
    }
    return [Result(*confidence_interval(curve[:, k]), {**protocol, "steps": k}) for k in steps]


def tune_inner_lr(
    method, shots: int, steps: int = max(REGRESSION_STEPS), tasks: int = 200, device="cpu"
) -> float:
    """The step size of :data:`LR_GRID` with the lowest MSE after ``steps`` steps on validation
    tasks (seed ``EVAL_SEED + 1``, never the test tasks): Finn et al.'s "tuned step size" for the
    pretrained baseline."""
    scores = {}
    for lr in LR_GRID:
        with np.errstate(invalid="ignore", over="ignore"):  # a too-large step may diverge
            mse = evaluate_regression(
                method, shots, tasks, (steps,), seed=EVAL_SEED + 1, device=device, lr=lr
            )[0].mean
        scores[lr] = mse if math.isfinite(mse) else math.inf
    return min(scores, key=scores.get)

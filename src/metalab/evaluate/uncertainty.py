"""Probabilistic regression: how well the *functions a method draws* for a task describe it.

PLATIPUS draws models from its prior given the support set and adapts each (Finn, Xu & Levine
2018, Alg. 2); LLAMA draws parameters from the Laplace posterior around the adapted ones (Grant
et al. 2018); MAML's adapted model is one point. A method answers through
``sample_functions(support_x, support_y, query_x, samples, generator) -> (draws, queries, 1)``.
On fixed tasks of a regression family (:data:`metalab.tasks.regression.FAMILIES`), with K
support points per task, this module measures:

- ``mse``: the squared error of the draws' mean to the noise-free function;
- ``best_of``: the smallest squared error of any one draw to the noise-free function: whether
  some draw found the task's function, the regression form of PLATIPUS's *coverage* (with an
  ambiguous support set, a sinusoid and a line may both fit; one point estimate picks one);
- ``nll``: the negative log-likelihood of the noisy query targets under the draws as an
  equal-weight Gaussian mixture, each component with std ``s``, chosen per model from
  :data:`NOISE_GRID` on validation tasks (seed + 1, never the test tasks), so that a point
  estimate gets its best Gaussian and a spread of draws is only rewarded where it helps;
- ``spread``: the std of the draws at the query inputs, averaged (0 for a point estimate).

:func:`active_learning` is the paper's active-learning experiment on regression [U for its
exact protocol]: starting from one support point, each round adds the candidate point where the
draws disagree most (their variance), or a random one, and scores the mean's MSE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metalab.evaluate.protocol import EVAL_SEED, Result, confidence_interval
from metalab.evaluate.regression import family_tasks
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.regression import FAMILIES

NOISE_GRID = tuple(float(s) for s in np.geomspace(0.01, 10.0, 49))  # candidate std s per draw
METRICS = {
    "mse": "MSE of the mean to the true function",
    "best_of": "best draw's MSE to the true function",
    "nll": "NLL of the noisy targets (mixture of the draws)",
    "spread": "std of the draws",
}
STRATEGIES = ("disagreement", "random")  # active learning: where the next point is asked for


@torch.no_grad()
def draw_functions(
    method, batch: TaskBatch, samples: int, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Each task's draws at its query inputs, ``(T, draws, Q, 1)`` on the CPU; the noise comes
    from one generator seeded with ``seed``, used task after task."""
    generator = torch.Generator(device=device).manual_seed(seed)
    support_x, support_y, query_x, _ = batch.to(device).tensors()
    draws = [
        method.sample_functions(support_x[t], support_y[t], query_x[t], samples, generator)
        for t in range(support_x.shape[0])
    ]
    return torch.stack(draws).double().cpu()


def mixture_nll(draws: torch.Tensor, targets: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over each task's query points of -log (1/S) sum_s N(y; f_s(x), std^2): ``draws``
    ``(T, S, Q, 1)``, ``targets`` ``(T, Q, 1)``, ``std`` ``(G,)`` -> ``(G, T)``."""
    s = std.double().view(-1, 1, 1, 1, 1)
    z = (targets[:, None].double() - draws.double())[None] / s  # (G, T, S, Q, 1)
    log_p = -0.5 * z.square() - s.log() - 0.5 * math.log(2 * math.pi)
    mixture = torch.logsumexp(log_p, dim=2) - math.log(draws.shape[1])  # (G, T, Q, 1)
    return -mixture.flatten(2).mean(2)


def calibrate_noise(draws: torch.Tensor, targets: torch.Tensor) -> float:
    """The std of :data:`NOISE_GRID` with the lowest mean :func:`mixture_nll` (validation)."""
    nll = mixture_nll(draws, targets, torch.tensor(NOISE_GRID)).mean(1)
    return NOISE_GRID[int(nll.argmin())]


def task_scores(
    draws: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor, std: float
) -> dict[str, np.ndarray]:
    """Per task ``(T,)``: each metric of :data:`METRICS` for draws ``(T, S, Q, 1)``, noisy
    ``targets`` and noise-free ``clean`` ``(T, Q, 1)``, and the mixture's component ``std``."""
    clean = clean.double()
    errors = (draws - clean[:, None]).square().flatten(2).mean(2)  # (T, S)
    return {
        "mse": (draws.mean(1) - clean).square().flatten(1).mean(1).numpy(),
        "best_of": errors.min(1).values.numpy(),
        "nll": mixture_nll(draws, targets, torch.tensor([std]))[0].numpy(),
        "spread": draws.std(1, correction=0).flatten(1).mean(1).numpy(),
    }


def evaluate_uncertainty(
    method,
    family: str,
    shots: int,
    tasks: int = 600,
    queries: int = 100,
    samples: int = 10,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> list[Result]:
    """One :class:`Result` per metric of :data:`METRICS` over ``tasks`` fixed test tasks of
    ``family`` with ``shots`` support points; the mixture's std is chosen on 200 validation
    tasks (seed + 1)."""
    val_batch, _ = family_tasks(family, shots, queries, 200, seed + 1)
    std = calibrate_noise(
        draw_functions(method, val_batch, samples, seed, device), val_batch.query_y
    )
    batch, clean = family_tasks(family, shots, queries, tasks, seed)
    draws = draw_functions(method, batch, samples, seed, device)
    scores = task_scores(draws, batch.query_y, torch.from_numpy(clean), std)
    protocol = {
        "dataset": family,
        "shots": shots,
        "queries": queries,
        "episodes": tasks,
        "seed": seed,
        "draws": draws.shape[1],
        "noise_std": std,
    }
    return [
        Result(*confidence_interval(values), {**protocol, "metric": name})
        for name, values in scores.items()
    ]


@torch.no_grad()
def active_learning(
    method,
    family: str,
    tasks: int = 100,
    rounds: int = 10,
    pool: int = 100,
    queries: int = 100,
    samples: int = 10,
    strategies: Sequence[str] = STRATEGIES,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """MSE of the draws' mean to the true function after 1, 2, ..., ``rounds`` + 1 support
    points, ``{strategy: (T, rounds + 1)}``. Each task starts from its first support point (in
    the family's support window); each round adds one of ``pool`` candidate inputs spread over
    the whole input range, with its noisy target: where the draws' variance is largest
    (``"disagreement"``) or uniformly at random (``"random"``); ``queries`` further points,
    noise-free, score the mean. The model's noise is seeded per task, the same for every
    strategy."""
    batch, info = FAMILIES[family](1, pool + queries, seed=seed).fixed_set(tasks)
    clean = torch.from_numpy(info["clean"][:, 1 + pool :]).double()
    curves = {s: np.zeros((tasks, rounds + 1)) for s in strategies}
    for t in range(tasks):
        pool_x, pool_y = batch.query_x[t, :pool].to(device), batch.query_y[t, :pool].to(device)
        every_x = batch.query_x[t].to(device)
        for strategy in strategies:
            # Each (task, strategy) starts from the same noise: their first rounds are equal.
            generator = torch.Generator(device=device).manual_seed(seed + 7919 * t)
            choice = np.random.default_rng([seed, t])
            x, y = batch.support_x[t].to(device), batch.support_y[t].to(device)
            left = list(range(pool))
            for k in range(rounds + 1):
                draws = method.sample_functions(x, y, every_x, samples, generator).double().cpu()
                mean = draws[:, pool:].mean(0)
                curves[strategy][t, k] = float((mean - clean[t]).square().mean())
                if k == rounds:
                    break
                if strategy == "disagreement":
                    variance = draws[:, :pool].var(0, correction=0).flatten()[left]
                    pick = left.pop(int(variance.argmax()))
                else:
                    pick = left.pop(int(choice.integers(len(left))))
                x, y = (
                    torch.cat([x, pool_x[pick : pick + 1]]),
                    torch.cat([y, pool_y[pick : pick + 1]]),
                )
    return curves


@dataclass
class UncertaintyComparison:
    """Every model's :func:`evaluate_uncertainty` rows ``(label, Result)`` on ``family`` with
    ``shots`` support points, its active-learning curves ``{label: {strategy: (T, rounds +
    1)}}``, and the arguments of :func:`metalab.plots.plot_function_samples` (or None)."""

    family: str
    shots: int
    rows: list[tuple[str, Result]] = field(default_factory=list)
    active: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    figure: dict | None = None


def compare_uncertainty(
    models: Sequence[tuple[str, torch.nn.Module]],
    family: str,
    shots: int,
    tasks: int = 600,
    queries: int = 100,
    samples: int = 10,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
    active_tasks: int = 0,
    figure: Path | None = None,
) -> UncertaintyComparison:
    """:func:`evaluate_uncertainty` and :func:`active_learning` (``active_tasks`` tasks; 0 for
    none) for each ``(label, model)``; a model that draws one function is scored with random
    queries only (its draws cannot disagree). ``figure``: where the draws of every model on a
    few test tasks go (:func:`metalab.plots.plot_function_samples`)."""
    out = UncertaintyComparison(family, shots)
    if figure is not None:
        out.figure = {"path": figure, "models": list(models), "family": family, "shots": shots,
                      "samples": samples, "seed": seed}  # fmt: skip
    for label, model in models:
        results = evaluate_uncertainty(model, family, shots, tasks, queries, samples, seed, device)
        for result in results:
            result.protocol.update(model=label)
            out.rows.append((label, result))
        if active_tasks:
            strategies = STRATEGIES if results[0].protocol["draws"] > 1 else ("random",)
            out.active[label] = active_learning(
                model, family, active_tasks, samples=samples, strategies=strategies,
                seed=seed, device=device,
            )  # fmt: skip
    return out

"""Memorisation tests (Yin et al. 2020): meta-test error on NEW tasks of a non-mutually-exclusive
family, where a model that memorised the training tasks ignores the support set and fails.

NME sinusoids (:class:`~metalab.tasks.nme.NMESinusoidTasks`): every model answers fixed test
tasks (task i depends only on (seed, i)) through its own ``predict(batch) -> (T, P, 1)``, as its
notebook tests it (the MAML family: 100 SGD steps on the support set; the CNP family: the mean of
sampled predictions). Two errors per task: to the noisy query targets (the notebooks' number; a
perfect model scores the noise variance, 0.01) and to the noise-free function.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from metalab.evaluate.protocol import EVAL_SEED, Result, confidence_interval
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.nme import NMESinusoidTasks

METRICS = {"mse": "MSE (noisy targets)", "mse_clean": "MSE (noise-free)"}


def evaluate_nme_sinusoid(
    predict: Callable[[TaskBatch], torch.Tensor],
    protocol: dict,
    tasks: int = 600,
    shots: int = 5,
    points: int = 200,
    seed: int = EVAL_SEED,
    notebook: bool = False,
    **test_set,
) -> list[Result]:
    """Both errors of ``predict`` on ``tasks`` fixed NME sinusoid test tasks with ``shots``
    support and ``points`` query points (:meth:`NMESinusoidTasks.test_set`, which takes the
    rest of the keywords); ``protocol``: how the model answers (steps, learning rate, samples),
    stored with the results. ``notebook=True``: the MAML notebook's own test tasks instead
    (:meth:`NMESinusoidTasks.notebook_test_set`, at most 100 meaningful, 5 support points).
    """
    if notebook:  # the notebook's own 100 tasks (5 support, 200 query points)
        batch, info = NMESinusoidTasks.notebook_test_set(tasks, seed)
    else:
        batch, info = NMESinusoidTasks.test_set(tasks, shots, points, seed, **test_set)
    with torch.no_grad():
        pred = predict(batch).detach().cpu().double().numpy()
    if pred.shape != tuple(batch.query_y.shape):
        raise ValueError(f"predict gave {pred.shape}; the queries are {tuple(batch.query_y.shape)}")
    errors = {
        "mse": ((pred - batch.query_y.double().numpy()) ** 2).mean((1, 2)),
        "mse_clean": ((pred - info["clean"]) ** 2).mean((1, 2)),
    }
    base = {
        "dataset": "nme-sinusoid",
        "shots": shots,
        "queries": points,
        "episodes": tasks,
        "seed": seed,
        **protocol,
    }
    return [
        Result(*confidence_interval(np.nan_to_num(e, nan=np.inf)), {**base, "metric": m})
        for m, e in errors.items()
    ]


def report_nme(method, run_dir, results: list[Result], title: str | None = None) -> None:
    """Print ``results`` of :func:`evaluate_nme_sinusoid` as a table and merge them into
    ``run_dir/eval.json``."""
    from metalab.reports import memorization_table, print_tables, save_eval

    run_dir = Path(run_dir)
    print_tables(memorization_table(title or f"{method.name} — {run_dir.name}", results))
    save_eval(run_dir / "eval.json", results, None, {"method": method.name})


def report_glyphs(
    method, run_dir, *, episodes: int | None, device, data_root=None, seed: int = EVAL_SEED
) -> list[Result]:
    """Rotated-glyph regression (:class:`~metalab.tasks.nme.RotatedGlyphTasks`, our substitute
    for the pose task): MSE of the scaled angle on ``episodes`` (default 600) fixed tasks of the
    TEST characters (new characters, new canonical angles) after 0, 5 and ``eval_inner_steps``
    steps on ``eval_shots`` support drawings; the labels have no noise. Printed and merged into
    ``run_dir/eval.json``."""
    from metalab.data.datasets import load_dataset
    from metalab.tasks.nme import RotatedGlyphTasks

    c = method.config
    data = load_dataset("omniglot", c.split, "test", c.image_size, data_root)
    tasks = 600 if episodes is None else episodes
    batch, _ = RotatedGlyphTasks(data, c.eval_shots, c.eval_queries, seed=seed).fixed_set(tasks)
    method.to(device)
    lr = c.eval_inner_lr or c.inner_lr
    results = []
    for steps in sorted({0, 5, c.eval_inner_steps}):
        with torch.no_grad():
            errors = []
            for t in range(tasks):
                b = [x[t].to(device) for x in batch.tensors()]
                out = method.answer(b[0], b[1], b[2], steps, lr)
                errors.append((out - b[3]).square().mean().item())
        protocol = {
            "dataset": "rotated-glyphs (substitute)",
            "shots": c.eval_shots,
            "queries": c.eval_queries,
            "episodes": tasks,
            "seed": seed,
            "steps": steps,
            "inner_lr": lr,
            "metric": "mse_clean",
        }
        results.append(Result(*confidence_interval(errors), protocol))
    report_nme(method, run_dir, results)
    return results

"""Figures written beside a run (matplotlib, headless)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch


@functools.cache
def _pyplot():
    """matplotlib.pyplot on the headless Agg backend, chosen once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(*args, **kwargs):
    """A new ``(figure, axes)``: ``plt.subplots(*args, **kwargs)`` on the Agg backend."""
    return _pyplot().subplots(*args, **kwargs)


def _save(fig, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` at 110 dpi and close it."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


@torch.no_grad()
def plot_sinusoid(
    method,
    path: Path,
    baseline=None,
    baseline_lr: float | None = None,
    shots: int = 5,
    tasks: int = 3,
    seed: int = 2017,
) -> Path:
    """Finn et al. 2017's Fig. 2 for a few fixed test tasks: the ground truth, the ``shots``
    support points, the network before adaptation and after 1 and 10 steps, and (if given) the
    pretrained ``baseline`` after 10 steps at its step size ``baseline_lr``."""
    from metalab.tasks.regression import SinusoidTasks

    batch, amplitude, phase = SinusoidTasks(shots, 1, seed=seed).fixed(tasks)
    grid = torch.linspace(-5, 5, 300)[:, None]
    fig, axes = _figure(1, tasks, figsize=(4.2 * tasks, 3.4), sharey=True, squeeze=False)
    for t, ax in enumerate(axes[0]):
        sx, sy = batch.support_x[t], batch.support_y[t]
        ax.plot(grid, amplitude[t] * np.sin(grid.numpy() - phase[t]), "r", label="ground truth")
        params = method.params()
        ax.plot(grid, method.forward_with(params, grid), ":", color="tab:green", label="pre-update")
        for steps, style in ((1, "--"), (10, "-")):
            adapted = method.adapt(sx, sy, steps=steps)
            ax.plot(
                grid,
                method.forward_with(adapted, grid),
                style,
                color="tab:green",
                label=f"{steps} grad step{'s' if steps > 1 else ''}",
            )
        if baseline is not None:
            adapted = baseline.adapt(sx, sy, steps=10, lr=baseline_lr)
            ax.plot(
                grid,
                baseline.forward_with(adapted, grid),
                "-",
                color="tab:blue",
                alpha=0.7,
                label="pretrained, 10 steps",
            )
        ax.plot(sx[:, 0], sy[:, 0], "^", color="purple", label=f"{shots} points used")
        ax.set_title(f"A = {amplitude[t]:.2f}, phase = {phase[t]:.2f}")
        ax.set_xlim(-5, 5)
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"MAML on sinusoids, K = {shots} (test tasks, seed {seed})")
    return _save(fig, path)


def plot_optimizer_curves(
    path: Path, family: str, curves: dict[str, torch.Tensor], lrs: dict
) -> Path:
    """Mean loss vs step with a 95% confidence band, log scale, one line per optimizer
    (``curves``: ``{name: (problems, T + 1)}``; ``lrs``: each one's learning rate, None for the
    learned optimizer "LSTM", drawn thicker)."""
    fig, ax = _figure(figsize=(6, 4))
    for opt, curve in curves.items():
        values = curve.cpu().double().numpy()
        n = values.shape[0]
        mean = values.mean(0)
        half = 1.96 * values.std(0, ddof=1) / math.sqrt(n) if n > 1 else 0 * mean
        steps = np.arange(values.shape[1])
        label = opt if lrs[opt] is None else f"{opt} (lr {lrs[opt]:.0e})"
        ax.plot(steps, mean, label=label, lw=2 if opt == "LSTM" else 1)
        ax.fill_between(steps, np.maximum(mean - half, 1e-12), mean + half, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{family}: {values.shape[0]} test problems, mean and 95% CI")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_instances(path: Path, ours: dict, paper: dict, title: str) -> Path:
    """Accuracy against instance: ours with 95% bands (``{name: [(mean, ci95) per instance]}``),
    the paper's rows dashed in the same colour (``ours`` names start with the model's paper name:
    ``"MANN (ours)"``)."""
    from metalab.evaluate.sequences import TABLE_INSTANCES

    colours = {"MANN": "C0", "LSTM": "C1", "Feedforward": "C2", "Human": "0.5"}
    fig, ax = _figure(figsize=(6.5, 4.2))
    for name, stats in ours.items():
        k = np.arange(1, len(stats) + 1)
        mean, half = (100 * np.array([s[i] for s in stats]) for i in (0, 1))
        colour = colours.get(name.split(" ")[0])
        ax.plot(k, mean, marker="o", lw=2, color=colour, label=name)
        ax.fill_between(k, mean - half, mean + half, color=colour, alpha=0.2)
    for name, row in paper.items():
        if name in colours:
            ax.plot(
                TABLE_INSTANCES,
                row,
                ls="--",
                marker=".",
                lw=1,
                color=colours[name],
                label=f"{name} (paper)",
            )
    ax.set_xlabel("instance of the class in the episode")
    ax.set_ylabel("% correct")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_gates(
    runs: list[dict[str, np.ndarray]], path: Path, title: str = "meta-lstm gates"
) -> Path:
    """Ravi & Larochelle's gate figure: input and forget gate values over the T updates, one line
    per learner layer, mean ± standard deviation over episodes. ``runs``: one
    ``{"input/conv1": (T,), ..., "forget/linear": (T,)}`` per episode
    (:func:`metalab.evaluate.optimization.gate_statistics`)."""
    fig, axes = _figure(1, 2, figsize=(10, 3.6))
    for ax, kind in zip(axes, ("input", "forget")):
        for key in (k for k in runs[0] if k.startswith(kind)):
            values = np.stack([r[key] for r in runs])  # (episodes, T)
            mean, sd = values.mean(0), values.std(0)
            steps = np.arange(1, values.shape[1] + 1)
            ax.plot(steps, mean, marker="o", ms=3, label=key.split("/")[1])
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
        ax.set_xlabel("learner update t")
        ax.set_title(f"{kind} gate")
    axes[0].set_ylabel("mean gate value over the layer")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


@torch.no_grad()
def plot_function_samples(
    path: Path,
    models: list[tuple[str, torch.nn.Module]],
    family: str,
    shots: int,
    samples: int = 10,
    tasks: int = 4,
    seed: int = 2017,
) -> Path:
    """PLATIPUS's Fig. 1-2 / LLAMA's sinusoid figure for a few fixed test tasks of ``family``:
    the true function, the ``shots`` support points, and each model's draws
    (``sample_functions``; thin lines) with their mean (thick), one colour per model."""
    from metalab.tasks.regression import FAMILIES

    stream = FAMILIES[family](shots, 1, seed=seed)
    batch, info = stream.fixed_set(tasks)
    grid = torch.linspace(*stream.family.x_range, 300)[:, None]
    # ARML's 2-D tasks (input (x, y)): the models read the grid on the line y = 1.
    inputs = torch.cat([grid, torch.ones_like(grid)], 1) if stream.input_dim == 2 else grid
    fig, axes = _figure(1, tasks, figsize=(4.2 * tasks, 3.4), sharey=True, squeeze=False)
    for t, ax in enumerate(axes[0]):
        sx, sy = batch.support_x[t], batch.support_y[t]
        ax.plot(grid, stream.function(info, t, inputs.numpy()), "k", lw=2, label="true function")
        for m, (label, model) in enumerate(models):
            generator = torch.Generator().manual_seed(seed + t)
            draws = model.sample_functions(sx, sy, inputs, samples, generator)[..., 0]
            colour = f"C{m}"
            for d in draws:
                ax.plot(grid, d, color=colour, lw=0.7, alpha=0.45)
            ax.plot(
                grid,
                draws.mean(0),
                color=colour,
                lw=2,
                label=f"{label} ({len(draws)} draw{'s' if len(draws) > 1 else ''})",
            )
        ax.plot(sx[:, 0], sy[:, 0], "^", color="purple", ms=8, label=f"{shots} points used")
        ax.set_xlim(*stream.family.x_range)
        ax.set_ylim(-7, 7)
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"{family} regression, K = {shots}: the functions each model draws (test tasks)")
    return _save(fig, path)


def plot_mean_curves(
    path: Path, curves: dict[str, np.ndarray], x: np.ndarray, xlabel: str, ylabel: str, title: str
) -> Path:
    """Mean over rows with a 95% confidence band, one line per entry of ``curves``
    (``{label: (rows, len(x))}``), log scale."""
    fig, ax = _figure(figsize=(6, 4))
    for label, values in curves.items():
        n = values.shape[0]
        mean = values.mean(0)
        half = 1.96 * values.std(0, ddof=1) / math.sqrt(n) if n > 1 else 0 * mean
        ax.plot(x, mean, marker="o", ms=3, label=label)
        ax.fill_between(x, np.maximum(mean - half, 1e-12), mean + half, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_nme_fits(path: Path, batch, info: dict, predictions: dict, tasks: int = 4) -> Path:
    """The NME sinusoid notebooks' figure (Yin et al. 2020) for the first ``tasks`` test tasks of
    :meth:`metalab.tasks.nme.NMESinusoidTasks.test_set`: the noise-free curve, the support
    points and each model's prediction at the query points, one colour per model.

    Args:
        path: the PNG to write.
        batch: the test tasks (a TaskBatch: support ``(T, K, 21)``, query ``(T, P, 21)``).
        info: :meth:`~metalab.tasks.nme.NMESinusoidTasks.test_set`'s ``amplitude``, ``index``
            and ``clean`` (the noise-free query targets ``(T, P, 1)``).
        predictions: ``{label: (T, P, 1)}`` arrays, one per model.
        tasks: how many tasks to draw.
    """
    n = min(tasks, batch.tasks)
    shots = batch.support_x.shape[1]
    fig, axes = _figure(1, n, figsize=(4.2 * n, 3.4), sharey=True, squeeze=False)
    for t, ax in enumerate(axes[0]):
        x = batch.query_x[t, :, 0].cpu().numpy()
        order = np.argsort(x)
        ax.plot(x[order], info["clean"][t, order, 0], "k", lw=2, label="true function")
        for m, (label, values) in enumerate(predictions.items()):
            ax.plot(x[order], np.asarray(values)[t, order, 0], color=f"C{m}", lw=2, label=label)
        sx, sy = batch.support_x[t, :, 0].cpu(), batch.support_y[t, :, 0].cpu()
        ax.plot(sx, sy, "^", color="purple", ms=8, label=f"{shots} context points")
        ax.set_title(
            f"A = {info['amplitude'][t]:.2f}, one-hot index {info['index'][t]}", fontsize=9
        )
        ax.set_ylim(-6, 6)
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"NME sinusoid test tasks, {shots} context points (index uninformative)")
    return _save(fig, path)


def plot_knowledge_graph(
    path: Path,
    assignment: np.ndarray,
    families: list[str],
    fits: list[dict] | None = None,
    title: str = "ARML: task families on the meta-knowledge graph",
) -> Path:
    """ARML's meta-knowledge graph (Yao et al. 2020): ``assignment`` ``(families, vertices)``,
    the mean prototype-to-vertex soft assignment of each family's test tasks, as a heatmap;
    with ``fits`` (:func:`metalab.methods.arml.family_fits`: ``family``, ``x``, ``true``,
    ``pred``, ``slice`` and optional ``support_x``/``support_y`` each), one panel per family
    (three to a row) with the true function and the adapted fit along that slice."""
    fits = fits or []
    rows, cols = max(1, math.ceil(len(fits) / 3)), min(len(fits), 3)
    fig = _pyplot().figure(figsize=(5.0 + 3.4 * cols, 3.2 * rows))
    grid = fig.add_gridspec(rows, 1 + cols, width_ratios=[1.6] + [1] * cols)
    ax = fig.add_subplot(grid[:, 0])
    image = ax.imshow(assignment, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(assignment.shape[1]), [f"v{v + 1}" for v in range(assignment.shape[1])])
    ax.set_yticks(range(len(families)), families, fontsize=8)
    ax.set_xlabel("meta-knowledge graph vertex")
    ax.set_title("mean prototype -> vertex assignment", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    for i, fit in enumerate(fits):
        ax = fig.add_subplot(grid[i // 3, 1 + i % 3])
        ax.plot(fit["x"], fit["true"], "k", lw=2, label="true function")
        ax.plot(fit["x"], fit["pred"], color="C1", lw=1.5, label="ARML, adapted")
        if "support_x" in fit:
            ax.plot(fit["support_x"], fit["support_y"], "^", color="purple", ms=6, label="support")
        ax.set_title(f"{fit['family']} ({fit['slice']})", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_band_curves(
    path: Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Lines with a shaded 95% band on a linear scale: ``{label: (x, mean, half_width)}`` (e.g.
    the return of each training iteration of an RL run, or one curve per method over seeds)."""
    fig, ax = _figure(figsize=(6, 4))
    for label, (x, mean, half) in curves.items():
        ax.plot(x, mean, marker="o", ms=3, label=label)
        ax.fill_between(x, mean - half, mean + half, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)

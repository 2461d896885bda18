"""Figures written beside a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metalab.tasks.regression import SinusoidTasks

    batch, amplitude, phase = SinusoidTasks(shots, 1, seed=seed).fixed(tasks)
    grid = torch.linspace(-5, 5, 300)[:, None]
    fig, axes = plt.subplots(1, tasks, figsize=(4.2 * tasks, 3.4), sharey=True, squeeze=False)
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

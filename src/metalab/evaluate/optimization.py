"""Evaluating learned optimizers: loss curves against tuned hand-designed optimizers
(Andrychowicz et al. 2016, :mod:`metalab.methods.l2o`) and the meta-learner LSTM's gate values
over its updates (Ravi & Larochelle 2017, :mod:`metalab.methods.meta_lstm`).

Baselines (SGD, RMSprop, Adam, NAG) use torch.optim's update rules and default constants, with the
learning rate tuned on VALIDATION problems of the same family over a log grid (best mean final
loss); test problems (seed :data:`TEST_SEED`, independent of the training seed) are only used for
the reported curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from metalab.errors import ConfigError
from metalab.evaluate.protocol import EVAL_SEED, confidence_interval, eval_mode
from metalab.plots import plot_gates, plot_optimizer_curves
from metalab.reports import optimization_table, print_tables, save_eval
from metalab.tasks.episodes import Episode
from metalab.tasks.optimization import (
    GENERALISATION,
    Problems,
    ProblemSampler,
    get_family,
    trajectory,
)

if TYPE_CHECKING:
    from metalab.methods.l2o import L2O
    from metalab.methods.meta_lstm import MetaLSTM

TEST_SEED = 2016  # fixed test problems: independent of the training seed
LR_GRID = tuple(float(x) for x in 10.0 ** np.arange(-4.0, 1.01, 0.5))  # 1e-4 .. 10
BASELINES = ("sgd", "rmsprop", "adam", "nag")
GATE_EPISODES = 8  # fixed test episodes of the meta-LSTM's gate figure


# -- hand-designed optimizers as update rules ---------------------------------------------------
def baseline_update(name: str, lr: torch.Tensor):
    """torch.optim's SGD, RMSprop, Adam and SGD(momentum=0.9, nesterov=True) as functional
    update rules with one learning rate per problem, ``lr (n, 1)``; default constants."""

    def sgd(g, s, t):
        return -lr * g, s

    def rmsprop(g, s, t):
        v = 0.99 * (0.0 if s is None else s) + 0.01 * g * g
        return -lr * g / (v.sqrt() + 1e-8), v

    def adam(g, s, t):
        m, v = (0.0, 0.0) if s is None else s
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
        return -lr * m_hat / (v_hat.sqrt() + 1e-8), (m, v)

    def nag(g, s, t):
        buf = g if s is None else 0.9 * s + g
        return -lr * (g + 0.9 * buf), buf

    rules = {"sgd": sgd, "rmsprop": rmsprop, "adam": adam, "nag": nag}
    if name not in rules:
        raise ConfigError(f"unknown baseline {name!r}: use one of {sorted(rules)}")
    return rules[name]


@torch.no_grad()
def baseline_curves(problems: Problems, name: str, lrs, steps: int | None = None) -> torch.Tensor:
    """Loss curves of baseline ``name`` at every learning rate in ``lrs`` on every problem, all in
    one batch: ``(len(lrs), n, T + 1)``."""
    steps = problems.family.steps if steps is None else steps
    n = problems.n
    lr = torch.tensor(lrs, device=problems.device).repeat_interleave(n)[:, None]
    curves = trajectory(problems.repeat(len(lrs)), steps, baseline_update(name, lr))
    return curves.view(len(lrs), n, -1)


def tune_lr(problems: Problems, name: str, lrs=LR_GRID) -> float:
    """The learning rate of ``lrs`` with the lowest mean final loss on ``problems`` (validation
    problems; diverged runs count as infinite)."""
    final = baseline_curves(problems, name, lrs)[:, :, -1].mean(1)
    final = torch.nan_to_num(final, nan=math.inf)
    return float(lrs[int(final.argmin())])


# -- the protocol -------------------------------------------------------------------------------
def optimizer_curves(
    method: L2O, family: str, count: int, device, data_root=None
) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """Loss curves ``(count, T + 1)`` of the learned optimizer ("LSTM") and of every baseline at
    its tuned learning rate, on ``count`` fixed test problems of ``family``; and those rates."""
    c = method.config
    fam = get_family(family)
    val = ProblemSampler(fam, "val", c.seed, 1, 1, data_root).fixed(c.val_episodes)
    test = ProblemSampler(fam, "test", TEST_SEED, 1, 1, data_root).fixed(count)
    val, test = val.to(device), test.to(device)
    with eval_mode(method):
        curves, lrs = {"LSTM": method.curves(test)}, {"LSTM": None}
    for opt in BASELINES:
        lrs[opt] = tune_lr(val, opt)
        curves[opt] = baseline_curves(test, opt, [lrs[opt]])[0]
    return curves, lrs


def summarise(curves: dict[str, torch.Tensor], lrs: dict, steps: int) -> dict:
    """Per optimizer: its learning rate, the loss statistics with 95% intervals, the mean curve,
    and for each baseline the LSTM's paired difference on the same test problems."""
    stats = {opt: _statistics(curve, steps) for opt, curve in curves.items()}
    out = {
        opt: {
            "lr": lrs[opt],
            "loss": {k: _ci(v) for k, v in stats[opt].items()},
            "mean_curve": curves[opt].mean(0).tolist(),
        }
        for opt in curves
    }
    for opt in BASELINES:  # paired over the same test problems: a tighter comparison
        out[opt]["lstm_minus_this"] = {k: _ci(stats["LSTM"][k] - v) for k, v in stats[opt].items()}
    return out


def report_optimizers(
    method: L2O, run_dir, *, episodes: int | None, device, data_root=None
) -> bool:
    """Loss-vs-step curves on fixed test problems of the run's family (and, for ``mnist``, the
    paper's generalisation variants): the LSTM against SGD, RMSprop, Adam and NAG with learning
    rates tuned on ``val_episodes`` validation problems. Writes ``l2o_<family>.png`` and
    ``eval.json`` into ``run_dir`` and prints a table. ``episodes``: test problems per family
    (default 256 quadratics, 20 networks)."""
    c, run_dir = method.config, Path(run_dir)
    method.to(device)
    results = {}
    for name in GENERALISATION[c.data]:
        family = get_family(name)
        count = episodes or (20 if family.is_mnist else 256)
        curves, lrs = optimizer_curves(method, name, count, device, data_root)
        plot_optimizer_curves(run_dir / f"l2o_{name}.png", name, curves, lrs)
        results[name] = summarise(curves, lrs, family.steps)
    protocol = {
        "test_problems": episodes or "256 quadratics / 20 networks",
        "test_seed": TEST_SEED,
        "val_problems": c.val_episodes,
        "lr_grid": list(LR_GRID),
        "checkpoint": "best.pt",
    }
    save_eval(run_dir / "eval.json", [], None, {}, extra={"protocol": protocol, "results": results})
    print_tables(optimization_table(results))
    return True


def _statistics(curve: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Per test problem: the loss at step 100 (and at the last step), and the mean loss over steps
    1..T -- the quantity the LSTM is trained to minimise (Eq. 2 with w_t = 1, divided by T)."""
    out = {f"step {t}": curve[:, t] for t in sorted({100, steps})}
    out[f"mean 1..{steps}"] = curve[:, 1:].mean(1)
    return out


def _ci(values: torch.Tensor) -> dict[str, float]:
    mean, half = confidence_interval(values.cpu().double().numpy())
    return {"mean": mean, "ci95": half}


# -- the meta-learner LSTM's gates ----------------------------------------------------------------
def gate_statistics(method: MetaLSTM, episodes: list[Episode]) -> list[dict[str, np.ndarray]]:
    """:meth:`~metalab.methods.meta_lstm.MetaLSTM.gate_values` of every episode, in eval mode."""
    with eval_mode(method):
        return [method.gate_values(e) for e in episodes]


def report_gates(
    method: MetaLSTM, run_dir, *, episodes: int | None, device, data_root=None
) -> bool:
    """Write ``gates.png`` (Ravi & Larochelle's gate figure, on :data:`GATE_EPISODES` fixed test
    episodes) into ``run_dir``, then let the standard few-shot table run (False)."""
    from metalab.data.datasets import load_dataset

    c = method.config
    test_set = load_dataset(c.data, c.split, "test", c.image_size, data_root)
    sampler = type(method).sampler(test_set, c.ways, c.shots, c.eval_queries, seed=EVAL_SEED)
    indices = sampler.fixed_indices(GATE_EPISODES)
    chosen = [sampler.episode_from_indices(ix).to(device) for ix in indices]
    title = f"meta-lstm gates, {c.data} {c.ways}-way {c.shots}-shot ({len(chosen)} test episodes)"
    plot_gates(gate_statistics(method, chosen), Path(run_dir) / "gates.png", title)
    return False

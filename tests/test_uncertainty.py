"""Scoring the functions a regression method draws (metalab.evaluate.uncertainty): the mixture
likelihood against its closed form, the noise calibration, the per-task scores' invariants, and
`metalab eval` of a PLATIPUS run beside a MAML run on the ambiguous tasks, active learning
included."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from metalab.errors import ConfigError
from metalab.evaluate import evaluate_run
from metalab.evaluate.uncertainty import (
    METRICS,
    NOISE_GRID,
    calibrate_noise,
    mixture_nll,
    task_scores,
)
from metalab.methods.maml import MAML
from metalab.methods.platipus import PLATIPUS
from metalab.reports import show_evaluation
from metalab.train import train


def test_mixture_nll_is_the_gaussian_mixture_density():
    """For one draw it is the Gaussian NLL; for several, -log of the mean of their densities,
    computed here point by point in float64."""
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(3, 4, 6, 1, generator=g, dtype=torch.float64)
    targets = torch.randn(3, 6, 1, generator=g, dtype=torch.float64)
    std = torch.tensor([0.2, 1.5], dtype=torch.float64)
    got = mixture_nll(draws, targets, std)
    assert got.shape == (2, 3)
    for i, s in enumerate(std.tolist()):
        density = torch.exp(-0.5 * ((targets[:, None] - draws) / s) ** 2) / (
            s * math.sqrt(2 * math.pi)
        )
        expected = -density.mean(1).log().flatten(1).mean(1)
        torch.testing.assert_close(got[i], expected)
        one = mixture_nll(draws[:, :1], targets, std[i : i + 1])[0]
        gauss = 0.5 * ((targets - draws[:, 0]) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(one, gauss.flatten(1).mean(1))


def test_calibration_finds_the_noise_of_the_targets():
    """A model that draws the true function gets the std of the targets' noise (0.3, to within
    one step of the grid), and a model whose draws are off gets a wider one."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(200, 50, 1, generator=g, dtype=torch.float64)
    targets = clean + 0.3 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    step = NOISE_GRID[1] / NOISE_GRID[0]
    assert 0.3 / step <= calibrate_noise(clean[:, None], targets) <= 0.3 * step
    assert calibrate_noise(clean[:, None] + 1.0, targets) > 0.9


def test_task_scores_invariants():
    """Identical draws: no spread, the best draw is the mean. One exact draw among wrong ones:
    the best draw's error is 0 while the mean's is not."""
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(5, 20, 1, generator=g, dtype=torch.float64)
    same = (clean + 0.5)[:, None].expand(5, 4, 20, 1)
    scores = task_scores(same, clean, clean, 0.3)
    assert set(scores) == set(METRICS)
    np.testing.assert_allclose(scores["spread"], 0, atol=1e-12)
    np.testing.assert_allclose(scores["best_of"], scores["mse"])
    np.testing.assert_allclose(scores["mse"], 0.25)
    mixed = torch.stack([clean, clean + 2, clean - 3], 1)
    scores = task_scores(mixed, clean, clean, 0.3)
    np.testing.assert_allclose(scores["best_of"], 0, atol=1e-12)
    np.testing.assert_allclose(scores["mse"], (1 / 3) ** 2)
    assert (scores["spread"] > 1).all()


@pytest.fixture(scope="module")
def ambiguous_runs(tmp_path_factory):
    """A PLATIPUS and a MAML run on the ambiguous tasks (a few seconds each), and a sinusoid
    run."""
    root = tmp_path_factory.mktemp("ambiguous")
    small = dict(episodes=150, meta_batch=10, lr=3e-3, backend="vmap")
    platipus = PLATIPUS.recipe("ambiguous-regression").updated(**small, samples=2)
    train("platipus", platipus, root / "platipus", progress=False)
    train(
        "maml", MAML.recipe("ambiguous-regression").updated(**small), root / "maml", progress=False
    )
    sinusoid = MAML.recipe("sinusoid").updated(episodes=5, meta_batch=2)
    train("maml", sinusoid, root / "sinusoid", progress=False)
    return root


def test_eval_scores_the_draws_and_active_learning(ambiguous_runs, capsys):
    """`metalab eval` of a PLATIPUS run with a MAML baseline: both models' scores on the same
    tasks (10 draws vs one point), active learning for both (both strategies for PLATIPUS, random
    for MAML), starting from the same point; more points help; figures and eval.json written."""
    root = ambiguous_runs
    ev = evaluate_run(
        root / "platipus", episodes=12, baseline=root / "maml", active_learning=6, shots=[5],
        test_time={"eval_inner_steps": "2"},
    )  # fmt: skip
    # The MSE table of a family other than sinusoids: after 1 step and the test steps, which
    # --test-time set for the baseline too.
    steps = {(m, r.protocol["steps"]) for m, r in ev.regression.rows}
    assert {s for _, s in steps} == {1, 2} and len({m for m, _ in steps}) == 2
    rows = {(m, r.protocol["metric"]): r for m, r in ev.uncertainty.rows}
    labels = sorted({m for m, _ in rows})
    assert len(labels) == 2 and len(rows) == 2 * len(METRICS)
    platipus, maml = sorted(labels, key=lambda m: not m.startswith("platipus"))
    assert (
        rows[platipus, "nll"].protocol["draws"] == 10 and rows[maml, "nll"].protocol["draws"] == 1
    )
    assert rows[platipus, "spread"].mean > 0 and rows[maml, "spread"].mean == 0
    assert rows[maml, "best_of"].mean == pytest.approx(rows[maml, "mse"].mean)
    assert rows[platipus, "best_of"].mean <= rows[platipus, "mse"].mean
    for r in rows.values():
        assert math.isfinite(r.mean) and r.protocol["episodes"] == 12 and r.protocol["shots"] == 5
    assert set(ev.uncertainty.active[platipus]) == {"disagreement", "random"}
    assert set(ev.uncertainty.active[maml]) == {"random"}
    curves = ev.uncertainty.active[platipus]
    assert curves["random"].shape == (6, 11)
    np.testing.assert_allclose(curves["disagreement"][:, 0], curves["random"][:, 0])
    for by_strategy in ev.uncertainty.active.values():
        for values in by_strategy.values():
            assert values[:, -1].mean() < values[:, 0].mean()  # 11 points tell more than 1
    show_evaluation(ev)
    assert "active learning" in capsys.readouterr().out
    for figure in ("ambiguous-draws.png", "ambiguous-active.png"):
        assert (root / "platipus" / figure).stat().st_size > 10_000
    stored = json.loads((root / "platipus" / "eval.json").read_text())
    assert {r["protocol"].get("metric") for r in stored["results"]} >= set(METRICS)
    assert len(stored["active_learning"][f"{platipus}, disagreement"]["mse"]) == 11


def test_a_baseline_of_another_family_is_refused(ambiguous_runs):
    with pytest.raises(ConfigError, match="same task family"):
        evaluate_run(ambiguous_runs / "platipus", episodes=4, baseline=ambiguous_runs / "sinusoid")

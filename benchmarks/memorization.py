"""Meta-learning without memorisation (Yin et al. 2020) on the NME sinusoid: every evaluated
MR-MAML / CNP run side by side with the official notebooks' numbers, and one figure of their fits
on the same test tasks.

    METALAB_DATA=../shared/data python benchmarks/memorization.py RUN_DIR... [--figure PNG]

Each RUN_DIR is an `mr-maml` or `cnp` run on `nme-sinusoid` that `metalab eval` has scored (its
eval.json). Rows: the notebook's measure for the family (MAML family: MSE to the noisy targets
after 100 steps on 5 support points; CNP family: MSE to the noise-free curve with 5 and 10
context points), mean ± 95% CI over the run's 600 test tasks; runs of one recipe with several
seeds get a last row with the mean and spread of the seeds. The figure draws each model's fit
on the first four test tasks of the MAML notebook's protocol (one set of tasks for every model, so
the CNPs are shown on tasks with indices 0..15 rather than their own 5..15). For MR-MAML runs a
column gives the score on the MAML notebook's own 100 test tasks
(`NMESinusoidTasks.notebook_test_set`), where it was evaluated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from metalab.evaluate.protocol import EVAL_SEED
from metalab.plots import plot_nme_fits
from metalab.rundir import load_method
from metalab.tasks.nme import NMESinusoidTasks

LABELS = {
    ("mr-maml", "none"): "MAML",
    ("mr-maml", "activation"): "MR-MAML(A)",
    ("mr-maml", "weights"): "MR-MAML(W)",
    ("cnp", "none"): "CNP",
    ("cnp", "activation"): "MR-CNP(A)",
    ("cnp", "weights"): "MR-CNP(W)",
}
NOTEBOOK = {  # the official notebooks' outputs [R] (the shared PAPERS.md §13)
    "MAML": (0.515,),
    "MR-MAML(A)": (0.150,),
    "MR-MAML(W)": (0.162,),
    "CNP": (0.967, 0.819),
    "MR-CNP(A)": (0.043, 0.035),
    "MR-CNP(W)": (0.066, 0.055),
}


def scores(run: Path, method: str) -> list[dict]:
    """The notebook's measure(s) from ``run/eval.json``: MAML family at 100 steps (noisy
    targets), CNP family at K = 5 and 10 (noise-free), 600-task rows."""
    rows = json.loads((run / "eval.json").read_text())["results"]
    if method == "mr-maml":
        keep = [
            r
            for r in rows
            if r["protocol"].get("steps") == 100
            and r["protocol"]["metric"] == "mse"
            and "tasks" not in r["protocol"]
        ]
    else:
        keep = [r for r in rows if r["protocol"]["metric"] == "mse_clean"]
    by_shots = {r["protocol"]["shots"]: r for r in keep if r["protocol"]["episodes"] >= 600}
    return [by_shots[k] for k in sorted(by_shots)]  # the latest evaluation of each K


def notebook_tasks(run: Path) -> str:
    """The MR-MAML score on the notebook's own 100 test tasks, if evaluated."""
    rows = json.loads((run / "eval.json").read_text())["results"]
    found = [r for r in rows if r["protocol"].get("tasks") == "the notebook's"]
    return f"{found[-1]['mean']:.3f} ± {found[-1]['ci95']:.3f}" if found else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--figure", type=Path, default=None, help="where the fits figure goes")
    args = parser.parse_args()

    table = Table(title="NME sinusoid, meta-test MSE (mean ± 95% CI over 600 tasks)")
    for column in ("model", "run", "seed", "measure", "ours", "notebook's tasks", "notebook"):
        table.add_column(column, justify="left" if column in ("model", "run") else "right")
    by_model: dict[str, list[list[float]]] = {}
    fits, batch, info = {}, None, None
    for run in args.runs:
        config = json.loads((run / "config.json").read_text())
        method, reg = config["method"], config["regularizer"]
        label = LABELS[(method, reg)]
        found = scores(run, method)
        for k, r in enumerate(found):
            p = r["protocol"]
            measure = "noisy, 100 steps" if method == "mr-maml" else f"noise-free, K={p['shots']}"
            table.add_row(
                label, run.name, str(config["seed"]), measure,
                f"{r['mean']:.3f} ± {r['ci95']:.3f}",
                notebook_tasks(run) if method == "mr-maml" else "-", f"{NOTEBOOK[label][k]:.3f}",
            )  # fmt: skip
        by_model.setdefault(label, []).append([r["mean"] for r in found])
        if args.figure is not None and label not in fits:
            model, _ = load_method(run / "best.pt")
            batch, info = NMESinusoidTasks.test_set(4, 5, 200, EVAL_SEED)
            if method == "mr-maml":
                out = [model.answer(*(t[i] for t in batch.tensors()[:3])) for i in range(4)]
                fits[label] = torch.stack(out).detach().numpy()
            else:
                fits[label] = model.predict_tasks(batch).detach().numpy()
    for label, values in by_model.items():
        if len(values) > 1:
            v = np.array(values)
            cells = " / ".join(f"{m:.3f} (sd {s:.3f})" for m, s in zip(v.mean(0), v.std(0, ddof=1)))
            table.add_row(label, f"{len(values)} seeds", "-", "mean of seeds", cells, "", "")
    Console(width=200).print(table)
    if args.figure is not None:
        plot_nme_fits(args.figure, batch, info, fits)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()

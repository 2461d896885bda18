"""ARML's 2-D regression protocol (Yao et al. 2020's code: 1000 fixed tasks, 10 support and 10
query points, MSE to the noisy targets after 5 and 20 steps) for several runs side by side, e.g.
ARML and MAML trained on `arml-2d`, beside the paper's numbers.

    METALAB_DATA=../shared/data python benchmarks/arml_2d.py RUN_DIR... [--tasks 1000]

Prints one row per run and step: all tasks (noisy and noise-free targets) and each family
(noisy), mean ± 1.96 sd / sqrt(n).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from metalab.evaluate.regression import REPORT_STEPS, regression_errors
from metalab.rundir import load_method
from metalab.tasks.regression import ARML_2D_FAMILIES

PAPER = {"arml": 0.438, "maml": 2.292}  # 10-shot MSE (Table 1 of the paper, [P])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = Table(title=f"arml-2d, 10-shot MSE over {args.tasks} fixed tasks (± 95% CI)")
    for column in ("run", "steps", "all, noisy", "all, noise-free", *ARML_2D_FAMILIES, "paper"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in args.runs:
        method, saved = load_method(run / "best.pt")
        rows = regression_errors(method, tasks=args.tasks, steps=REPORT_STEPS)
        for k in REPORT_STEPS:
            found = {label: r for label, r in rows if r.protocol["steps"] == k}

            def cell(label: str, found=found) -> str:
                return f"{found[label].mean:.3f} ± {found[label].ci95:.3f}"

            table.add_row(
                f"{saved['method']} {run.name}", str(k), cell("all, noisy targets"),
                cell("all, noise-free targets"),
                *(cell(f"{f}, noisy targets") for f in ARML_2D_FAMILIES),
                f"{PAPER.get(saved['method'], '')}",
            )  # fmt: skip
    Console(width=200).print(table)


if __name__ == "__main__":
    main()

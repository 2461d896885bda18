"""Why Lake's 20 runs are easier than within-alphabet trials for a trained model, alphabet by
alphabet: his runs use drawers 1-8 only and one set of 20 characters per alphabet; our trials
draw both from all. Scoring the same model on trials restricted to drawers 1-8, and on trials
of exactly the runs' 20 characters (found by matching the runs' drawings with the archive's)
with all drawer pairs, separates the drawers' share of the gap from the characters'.

    METALAB_DATA=../shared/data python benchmarks/lake_gap.py RUN_DIR [--trials 1000]

Prints, for each alphabet of Lake's runs, the model's error on his runs, on trials from all 20
drawers, on trials from drawers 1-8 (both 50 per alphabet at 1000 trials) and on trials of the
runs' characters (50 per alphabet), with 95% CIs; then the four over those 10 alphabets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from metalab.data.datasets import load_dataset
from metalab.data.root import data_root
from metalab.evaluate.lake import evaluate_lake_runs
from metalab.evaluate.oneshot import within_alphabet_by_alphabet
from metalab.evaluate.protocol import confidence_interval
from metalab.rundir import load_method
from metalab.tasks.lake import load_runs, run_alphabets

LAKE_DRAWERS = tuple(range(8))  # drawers 1-8, the only ones in all_runs.zip


def run_characters(zip_path: Path, test) -> np.ndarray:
    """The classes of ``test`` (Lake split, 28 px) whose drawings Lake's runs show."""
    owner = {}
    for c in range(test.num_classes):
        for i in test.class_index[c, : test.counts[c]]:
            owner[test.images[i, 0].numpy().tobytes()] = c
    classes = {
        owner[image.tobytes()] for run in load_runs(zip_path, size=28) for image in run.train
    }
    return np.array(sorted(classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--lake-runs", type=Path, help="default: <data root>/omniglot/all_runs.zip")
    args = parser.parse_args()
    root = data_root()
    zip_path = args.lake_runs or root / "omniglot" / "all_runs.zip"
    method, _ = load_method(args.run_dir / "best.pt")
    size = method.config.image_size
    test = load_dataset("omniglot", "lake", "test", size)
    lake = evaluate_lake_runs(
        method, load_runs(zip_path, size=size), "cpu", run_alphabets(zip_path, root)
    )
    _, every = within_alphabet_by_alphabet(method, test, args.trials)
    _, early = within_alphabet_by_alphabet(method, test, args.trials, drawers=LAKE_DRAWERS)
    runs_characters = test.subset(run_characters(zip_path, test), f"{test.name}/runs-characters")
    _, same = within_alphabet_by_alphabet(method, runs_characters, args.trials // 2)
    print(f"{args.run_dir}: error %, {args.trials} trials over 20 alphabets\n")
    print(
        "| alphabet | Lake's 2 runs | trials, drawers 1–20 | trials, drawers 1–8 "
        "| trials of the runs' 20 characters, drawers 1–20 |"
    )
    print("|---|---:|---:|---:|---:|")
    columns: list[list[float]] = [[], [], [], []]
    for name in sorted(lake["per_alphabet"]):
        runs_error = lake["per_alphabet"][name]
        cells = [f"{runs_error:.1f}"]
        columns[0].append(runs_error)
        for column, results in zip(columns[1:], (every, early, same)):
            r = results[name]
            column.append(100 * (1 - r.mean))
            cells.append(f"{100 * (1 - r.mean):.1f} ± {100 * r.ci95:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    means = [np.mean(c) for c in columns]
    cis = [confidence_interval(np.array(c))[1] for c in columns]
    print(
        "| **the 10 alphabets** | "
        + " | ".join(f"**{m:.2f}** ± {ci:.2f}" for m, ci in zip(means, cis))
        + " |"
    )
    print("\n(± on the last row: 95% CI over the 10 alphabets' means)")


if __name__ == "__main__":
    main()

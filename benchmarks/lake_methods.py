"""Issue 13, part 4: every method that answers 20-way one-shot, on Lake's two measures, at one
time budget. Each row trains its method's ``--split lake`` recipe (background alphabets only: 25 to
train on, with rotations, 5 held out) for the same wall-clock minutes, picks ``best.pt`` by
within-alphabet trials on the held-out background alphabets, and scores it on Lake's 20 official
runs and on 1000 within-alphabet trials (50 per evaluation alphabet), as ``lake_levers.py`` does.

Equal minutes, not equal episodes: one method's step is not another's (on a 2-core CPU a
second-order MAML step of 16 tasks takes as long as 8 ProtoNet episodes), and what a user of the
machine gets from each method in the same time is the question. Training uses the GPU when there
is one. Runs live under ``--runs``: a row trained before is scored again without training, and one
whose training was interrupted starts over (a time budget does not resume exactly). Prints a
Markdown table and writes it, with every figure, to ``<runs>/methods.json``. ``--one-to-one``
scores the trained rows again with the transductive one-to-one decision (each run's or trial's 20
queries assigned to 20 different characters at once).

    METALAB_DATA=../shared/data python benchmarks/lake_methods.py --minutes 10 [--rows maml,gnn]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from lake_levers import (  # the sibling script: benchmarks/ is on sys.path when run
    measure_rows,
    parse_rows,
    record_name,
    score,
)

from metalab.methods import get_method
from metalab.train import train

# row -> (method, recipe, changes to it, episodes between validations). The intervals gave two to
# seven validations in 10 minutes on a 2-core AVX2 EPYC (CPU-2), plus one at the stop; each is 200
# within-alphabet trials of the held-out alphabets and counts against the minutes.
ROWS: dict[str, tuple[str, str, dict, int]] = {
    "protonet": ("protonet", "lake", {}, 300),
    "matching": ("matching", "lake", {}, 500),
    "gnn": ("gnn", "lake", {}, 300),
    "siamese": ("siamese", "lake", {}, 1500),
    "maml": ("maml", "omniglot-20w1s", {"split": "lake"}, 60),
    "meta-lstm": (
        "meta-lstm",
        "omniglot-5w1s",
        {"split": "lake", "ways": 20, "eval_ways": 20},
        400,
    ),
    "koch": ("siamese", "koch", {}, 100),
}


def run_row(
    name: str, runs: Path, minutes: float, lake_runs: Path, trials: int, decision: str
) -> dict:
    """Row ``name``, trained and scored (or read back from ``runs/<name>.json``, or the
    decision's record)."""
    run_dir = runs / name
    record, trained = runs / record_name(name, decision), runs / f"{name}.train.json"
    if record.exists():
        return json.loads(record.read_text())
    first = runs / record_name(name, "argmax")
    if not trained.exists() and first.exists():  # scored before: its record says how it trained
        kept = {k: v for k, v in json.loads(first.read_text()).items() if k in TRAINED}
        trained.write_text(json.dumps(kept) + "\n")
    if not trained.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        trained.write_text(json.dumps(train_row(name, run_dir, minutes)) + "\n")
    scores = score(run_dir, lake_runs, trials, decision=decision)
    row = {"row": name, **json.loads(trained.read_text()), **scores}
    record.write_text(json.dumps(row, indent=2) + "\n")
    return row


TRAINED = ("what", "train_seconds", "episodes", "best_val")  # what train_row returns


def train_row(name: str, run_dir: Path, minutes: float) -> dict:
    """Train row ``name`` for ``minutes`` into ``run_dir``; what it was and what it took."""
    method, recipe, changes, val_every = ROWS[name]
    config = (
        get_method(method)
        .recipe(recipe)
        .updated(
            **changes,
            episodes=10**7,  # the minutes end training
            val_protocol="within-alphabet",
            val_episodes=200,
            val_every=val_every,
        )
    )
    start = time.perf_counter()
    summary = train(method, config, run_dir, minutes=minutes, progress=False)
    return {
        "what": f"{method} --recipe {recipe}"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in changes.items()),
        "train_seconds": time.perf_counter() - start,
        "episodes": summary.episodes,
        "best_val": summary.best_val,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | recipe | episodes | val (held-out) | Lake's 20 runs: error ± SEM (runs / alphabets) | within-alphabet: error ± 95% CI |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | `{r['what']}` | {r['episodes']:,} | {100 * r['best_val']:.1f}%"
            f" | {r['lake_error']:.2f}% ± {r['lake_sem_runs']:.2f} / {r['lake_sem_alphabets']:.2f}"
            f" | {100 * (1 - r['within_acc']):.2f}% ± {100 * r['within_ci']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of every row")
    parser.add_argument("--runs", type=Path, default=Path("runs/lake-methods"))
    # koch is left out by default: 38.9M weights at 105 px, a GPU's budget
    args = parse_rows(parser, ROWS, default=[name for name in ROWS if name != "koch"])
    runs = args.runs / f"{args.minutes:g}min"
    measure_rows(
        args,
        runs,
        lambda name: run_row(name, runs, args.minutes, args.lake_runs, args.trials, args.decision),
        table,
        "methods.json",
        f"{args.minutes:g} min of training per row, seed 0",
    )


if __name__ == "__main__":
    main()

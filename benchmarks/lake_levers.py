"""Issue 13's ablation: each lever for one-shot learning of new alphabets, one row each, on
Lake's two measures: his 20 official runs and 1000 within-alphabet trials (50 per evaluation
alphabet), both with their uncertainty.

Every row trains ProtoNet with ``--recipe lake`` (background alphabets only: 25 to train on, with
rotations, 5 held out for validation) at the same episode budget and seed, changing one thing;
the test-time rows evaluate the base row's model with a test-time setting. Runs live under
``--runs`` and are resumed or reused, so the script can be stopped and started again. Prints a
Markdown table and writes it, with every figure, to ``<runs>/levers.json``. ``--one-to-one``
scores the same models with the transductive one-to-one decision (each run's or trial's 20
queries assigned to 20 different characters at once), into ``<row>.one-to-one.json``.

    METALAB_DATA=../shared/data python benchmarks/lake_levers.py --episodes 1500 [--rows base,within]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metalab.data.root import data_root
from metalab.evaluate import evaluate_run
from metalab.methods.protonet import ProtoNet
from metalab.train import train

# name -> (what changes, training changes or the name of the row whose model it evaluates,
# test-time settings); a test-time value "choose" is picked on the validation alphabets.
ROWS: dict[str, tuple[str, dict | str, dict]] = {
    "base": ("Conv4-64, 28 px, random-character episodes", {}, {}),
    "within": ("+ half the episodes within one alphabet (20-way)", {"alphabet_episodes": 0.5}, {}),
    "affine": ("+ Koch's affine distortions (p = 0.5 each)", {"augment": 0.5}, {}),
    "stroke": ("+ stroke-width changes (p = 0.5)", {"stroke": 0.5}, {}),
    "affine-stroke": ("+ both distortions", {"augment": 0.5, "stroke": 0.5}, {}),
    "56px": ("56 px input (flatten: 576-d)", {"image_size": 56}, {}),
    "56px-mean": (
        "56 px input, global mean pooling (64-d)",
        {"image_size": 56, "pooling": "mean"},
        {},
    ),
    "wide": ("Conv4-128", {"hidden": 128}, {}),
    "resnet12": (
        "ResNet-12 (32-80-160-320), mean pooling",
        {"encoder": "resnet12", "hidden": 32, "pooling": "mean"},
        {},
    ),
    "trainval": (
        "trained on all 30 background alphabets (trainval)",
        {"train_part": "trainval"},
        {},
    ),
    "tta": ("test time: 8 distorted copies in each prototype", "base", {"support_augment": 8}),
    "finetune": (
        "test time: 10 SGD steps on the support set, step size chosen on validation",
        "base",
        {"finetune_steps": 10, "finetune_lr": "choose"},
    ),
    "affine-stroke-tta": (
        "both distortions in training, 8 distorted copies at test",
        "affine-stroke",
        {"support_augment": 8},
    ),
}
FINETUNE_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the grid "choose" searches
VAL_TRIALS = 100  # within-alphabet trials on the held-out background alphabets, per value


def choose(run_dir: Path, test_time: dict) -> tuple[dict, dict]:
    """``test_time`` with each "choose" value replaced by the best of its grid on validation:
    within-alphabet trials on the upright characters of the five held-out background alphabets
    (never the evaluation alphabets). Returns the settings and the validation score of each."""
    from metalab.data.datasets import load_dataset
    from metalab.evaluate import evaluate_within_alphabet
    from metalab.evaluate.run import apply_test_time
    from metalab.rundir import load_method
    from metalab.tasks.oneshot import AlphabetTrials

    open_ = [k for k, v in test_time.items() if v == "choose"]
    if not open_:
        return test_time, {}
    (name,) = open_  # one at a time: the grid below is finetune_lr's
    method, _ = load_method(run_dir / "best.pt")
    val = AlphabetTrials.unrotated(
        load_dataset("omniglot", "lake", "val", method.config.image_size)
    )
    fixed = {k: v for k, v in test_time.items() if k != name}
    scores = {}
    for value in FINETUNE_LRS:
        method.config = apply_test_time(method, {**fixed, name: value})
        scores[value] = evaluate_within_alphabet(method, val.dataset, trials=VAL_TRIALS).mean
    best = max(scores, key=scores.get)
    return {**fixed, name: best}, {str(k): v for k, v in scores.items()}


def run_row(
    name: str, runs: Path, episodes: int, lake_runs: Path, trials: int, decision: str
) -> dict:
    what, changes, test_time = ROWS[name]
    run_dir = runs / (changes if isinstance(changes, str) else name)
    record = runs / record_name(name, decision)
    if record.exists():
        return json.loads(record.read_text())
    seconds = None
    if isinstance(changes, dict):
        config = ProtoNet.recipe("lake").updated(episodes=episodes, val_every=500, **changes)
        start = time.perf_counter()
        train(
            "protonet", config, run_dir, resume=(run_dir / "checkpoint.pt").exists(), progress=False
        )
        seconds = time.perf_counter() - start
        first = runs / record_name(name, "argmax")
        if decision != "argmax" and first.exists():  # trained then: this call only resumed it
            seconds = json.loads(first.read_text())["train_seconds"]
    else:
        run_row(changes, runs, episodes, lake_runs, trials, decision)
    test_time, validation = choose(run_dir, test_time)
    row = {
        "row": name,
        "what": what,
        "train_seconds": seconds,
        **score(run_dir, lake_runs, trials, test_time, decision),
        "test_time": test_time,
        "validation": validation,
        "episodes": episodes,
    }
    record.write_text(json.dumps(row, indent=2) + "\n")
    return row


def score(
    run_dir: Path,
    lake_runs: Path,
    trials: int,
    test_time: dict | None = None,
    decision: str = "argmax",
) -> dict:
    """The run's ``best.pt`` on both measures: Lake's 20 runs (error %, SEMs over runs and over
    alphabets, per alphabet) and ``trials`` within-alphabet trials (accuracy, 95% CI, per
    alphabet), each query answered on its own or, with ``decision="one-to-one"``, each run's and
    trial's at once; with the seconds it took and the threads it had."""
    start = time.perf_counter()
    ev = evaluate_run(
        run_dir,
        [],
        lake_runs=lake_runs,
        within_alphabet=trials,
        test_time=test_time,
        decision=decision,
    )
    (within,) = [r for r in ev.results if r.protocol.get("protocol") == "within-alphabet"]
    return {
        "eval_seconds": time.perf_counter() - start,
        "lake_error": ev.lake["mean_error"],  # percent, as are the SEMs
        "lake_sem_runs": ev.lake["sem"],
        "lake_sem_alphabets": ev.lake.get("sem_alphabets"),
        "within_acc": within.mean,
        "within_ci": within.ci95,
        "within_by_alphabet": {a: r.mean for a, r in (ev.within_by_alphabet or {}).items()},
        "lake_by_alphabet": ev.lake.get("per_alphabet"),
        "threads": torch.get_num_threads(),
        "decision": decision,
    }


def record_name(row: str, decision: str) -> str:
    """The file a row's scores are kept in: ``<row>.json``, or ``<row>.<decision>.json`` for a
    decision other than the arg-max."""
    return f"{row}.json" if decision == "argmax" else f"{row}.{decision}.json"


def table(rows: list[dict]) -> str:
    lines = [
        "| row | lever | Lake's 20 runs: error ± SEM (runs / alphabets) | within-alphabet: error ± 95% CI | train |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        train_time = f"{r['train_seconds'] / 60:.1f} min" if r["train_seconds"] else "—"
        sem_a = r["lake_sem_alphabets"]
        lines.append(
            f"| {r['row']} | {r['what']} | {r['lake_error']:.2f}% ± {r['lake_sem_runs']:.2f}"
            f" / {sem_a:.2f} | {100 * (1 - r['within_acc']):.2f}% ± {100 * r['within_ci']:.2f} | {train_time} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1500, help="training budget of every row")
    parser.add_argument("--runs", type=Path, default=Path("runs/levers"))
    args = parse_rows(parser, ROWS, default=list(ROWS))
    runs = args.runs / f"{args.episodes}ep"
    measure_rows(
        args,
        runs,
        lambda name: run_row(name, runs, args.episodes, args.lake_runs, args.trials, args.decision),
        table,
        "levers.json",
        f"ProtoNet --recipe lake, {args.episodes:,} episodes, seed 0",
    )


def parse_rows(
    parser: argparse.ArgumentParser, rows: dict, default: list[str]
) -> argparse.Namespace:
    """Parse ``parser``'s arguments plus what both Lake scripts take: ``--rows`` (checked against
    ``rows``), ``--trials``, ``--report``, ``--one-to-one`` (as ``args.decision``) and
    ``--lake-runs`` (resolved under the data root)."""
    parser.add_argument(
        "--rows", default=",".join(default), help="comma-separated, of: " + ", ".join(rows)
    )
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument(
        "--report", action="store_true", help="only print the table of the rows already measured"
    )
    parser.add_argument(
        "--lake-runs", type=Path, default=None, help="default: <data root>/omniglot/all_runs.zip"
    )
    parser.add_argument(
        "--one-to-one",
        action="store_true",
        help="score with the transductive one-to-one decision (trained rows are reused)",
    )
    args = parser.parse_args()
    args.decision = "one-to-one" if args.one_to_one else "argmax"
    args.rows = args.rows.split(",")
    if unknown := [name for name in args.rows if name not in rows]:
        parser.error(f"unknown rows {unknown}: use {', '.join(rows)}")
    args.lake_runs = args.lake_runs or data_root() / "omniglot" / "all_runs.zip"
    return args


def measure_rows(
    args: argparse.Namespace,
    runs: Path,
    measure: Callable[[str], dict],
    table: Callable[[list[dict]], str],
    out: str,
    what: str,
) -> None:
    """Measure each of ``args.rows`` with ``measure(name)`` (or, with ``--report``, read those
    already measured), print each row as it lands and then ``table`` of all, and write them to
    ``runs/out`` (``out`` with the decision in its name, as :func:`record_name`)."""
    runs.mkdir(parents=True, exist_ok=True)
    if args.decision != "argmax":
        what += f"; {args.decision} decision (transductive)"
    if args.report:
        records = [runs / record_name(name, args.decision) for name in args.rows]
        print(table([json.loads(r.read_text()) for r in records if r.exists()]))
        return
    rows = []
    for name in args.rows:
        rows.append(measure(name))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{what}; {torch.get_num_threads()} threads\n")
    print(table(rows))
    (runs / record_name(Path(out).stem, args.decision)).write_text(
        json.dumps(rows, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

"""Train and test MANN, the LSTM and the feed-forward baseline on the three configurations of
Santoro et al. 2016 (Table 1: 5 classes, one-hot labels; Table 2: 5 and 15 classes, string labels):
nine runs under one time budget, as parallel processes (issue 6).

Every run is ``metalab train mann --recipe <recipe> --model <model> --minutes M`` followed by
``metalab eval`` on fixed test episodes of the 423 held-out characters (1000 by default). At the end
the per-instance tables are printed as markdown (ours beside the paper's rows) with the training
speed in episodes per second, written to ``<run-root>/mann_table.md``, and one figure per
configuration (``<run-root>/<recipe>.png``) plots accuracy against instance for the three models.

    python benchmarks/mann_table.py --minutes 8 --jobs 9 --device cuda --run-root runs/mann-table
    OMP_NUM_THREADS=1 python benchmarks/mann_table.py --minutes 0.3 --jobs 3 --device cpu

Each process gets ``OMP_NUM_THREADS=1`` unless the variable is already set (parallel CPU jobs
otherwise fight over cores). ``--lr`` overrides the recipes' paper learning rate (1e-4), which
learns little in minutes. ``best.pt`` is picked on validation characters, never on test episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"  # this checkout's metalab, installed or not
RECIPES = ("omniglot-onehot-5", "omniglot-string-5", "omniglot-string-15")
MODELS = ("mann", "lstm", "ff")
LABEL = {"mann": "MANN", "lstm": "LSTM", "ff": "Feedforward"}
COLUMNS = (1, 2, 3, 4, 5, 10)  # instances, as in the paper's tables
ORDINALS = ("1st", "2nd", "3rd", "4th", "5th", "10th")


def run_one(recipe: str, model: str, args: argparse.Namespace) -> dict:
    """Train one run (resumed if its directory holds one), then evaluate it."""
    name = f"{recipe}-{model}"
    run_dir = args.run_root / name
    common = ["--device", args.device, "--no-progress"]
    train = [sys.executable, "-m", "metalab", "train", "mann", "--recipe", recipe]
    train += ["--model", model, "--run-dir", str(run_dir), "--minutes", str(args.minutes)]
    if args.lr is not None:
        train += ["--lr", str(args.lr)]
    if args.seed is not None:
        train += ["--seed", str(args.seed)]
    if (run_dir / "checkpoint.pt").exists():
        train.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    status: dict = {"run": name}
    started = time.monotonic()
    with open(args.run_root / f"{name}.log", "w") as log:
        status["train_rc"] = _call(train + common, log, env, 60 * args.minutes + 300)
        status["train_s"] = round(time.monotonic() - started)
        if status["train_rc"] == 0:
            evaluate = [sys.executable, "-m", "metalab", "eval", str(run_dir)]
            evaluate += ["--episodes", str(args.episodes), *common]
            status["eval_rc"] = _call(evaluate, log, env, args.eval_timeout)
    print(json.dumps(status), flush=True)
    return status


def _call(command: list[str], log, env: dict, timeout: float) -> int:
    """Run ``command`` with its output in ``log``; 124 if it ran past ``timeout`` seconds."""
    try:
        return subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
        ).returncode
    except subprocess.TimeoutExpired:
        return 124


def speed(run_dir: Path) -> tuple[int, float]:
    """Training episodes done (optimizer steps x episodes per step) and episodes per second
    (the mean of the logged rates; NaN for a run too short to log one)."""
    import torch

    config = json.loads((run_dir / "config.json").read_text())
    steps = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["episode"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    rate = sum(r["episodes_per_s"] for r in train) / len(train) if train else float("nan")
    return steps * config["meta_batch"], rate * config["meta_batch"]


def summary(args: argparse.Namespace) -> str:
    """Markdown tables, one per configuration; also writes a figure per configuration."""
    from metalab.plots import plot_instances

    lines = [
        f"Training budget {args.minutes:g} min per run, device {args.device}, "
        f"{args.episodes} test episodes per run (mean ± 95% CI over episodes, % correct).",
        "",
    ]
    for recipe in RECIPES:
        header = f"| model | {' | '.join(ORDINALS)} | train episodes | ep/s |"
        body, curves, paper = [], {}, {}
        for model in MODELS:
            run_dir = args.run_root / f"{recipe}-{model}"
            path = run_dir / "eval.json"
            if not path.exists():
                body.append(f"| {LABEL[model]} (ours) | " + " | ".join("–" for _ in COLUMNS))
                body[-1] += " | – | – |"
                continue
            stored = json.loads(path.read_text())
            paper = stored["paper"]
            instance = stored["results"]["instance"]
            stats = [(v["mean"], v["ci95"]) for _, v in sorted(instance.items(), key=_by_int)]
            curves[f"{LABEL[model]} (ours)"] = stats
            cells = [
                f"{100 * stats[k - 1][0]:.1f} ± {100 * stats[k - 1][1]:.1f}"
                if k <= len(stats)
                else "–"
                for k in COLUMNS
            ]
            episodes, rate = speed(run_dir)
            body.append(
                f"| {LABEL[model]} (ours) | " + " | ".join(cells) + f" | {episodes} | {rate:.0f} |"
            )
        for name, row in paper.items():
            body.append(f"| {name} (paper) | " + " | ".join(f"{v:.1f}" for v in row) + " | | |")
        lines += [f"### {recipe}", "", header, "|" + "---|" * (len(COLUMNS) + 3), *body, ""]
        if curves:
            plot_instances(args.run_root / f"{recipe}.png", curves, paper, recipe)
    return "\n".join(lines)


def _by_int(item):
    return int(item[0])


def main() -> None:
    sys.path.insert(0, str(SRC))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per run")
    parser.add_argument("--jobs", type=int, default=3, help="runs at once")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--run-root", type=Path, default=Path("runs/mann-table"))
    parser.add_argument("--episodes", type=int, default=1000, help="test episodes per run")
    parser.add_argument("--lr", type=float, help="override the recipes' learning rate (1e-4)")
    parser.add_argument("--seed", type=int, help="training seed (default: the recipes' 0)")
    parser.add_argument("--only", help="comma-separated recipes (default: all three)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--summary", action="store_true", help="only print the tables")
    parser.add_argument("--eval-timeout", type=float, default=900, help="seconds per evaluation")
    args = parser.parse_args()
    recipes = args.only.split(",") if args.only else list(RECIPES)
    models = args.models.split(",")
    unknown = sorted(set(recipes) - set(RECIPES)) + sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown {unknown}: recipes {list(RECIPES)}, models {list(MODELS)}")
    args.run_root.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        runs = [(r, m) for r in recipes for m in models]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda rm: run_one(*rm, args), runs))
    table = summary(args)
    (args.run_root / "mann_table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

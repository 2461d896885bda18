"""Train and test the metric-based family side by side under one time budget: the Omniglot tables
of benchmarks/RESULTS.md (issue 4).

Every run is ``metalab train <method> --recipe <recipe> --minutes M`` followed by ``metalab eval``
on the fixed test episodes (1000 per protocol, 15 queries), Lake's 20 runs and the other one-shot
protocols that apply; runs go in parallel (``--jobs``), each in its own process. The evaluations
are merged into ``<out>/<run>/eval.json`` and a summary is printed at the end.

    python benchmarks/metric_table.py --minutes 6 --jobs 16 --device cuda --out /tmp/table
    python benchmarks/metric_table.py --only matching-5w1s --minutes 10 --jobs 1   # CPU

Nothing here is tuned on test episodes or Lake's runs: recipes are fixed before the runs, and
``best.pt`` is chosen on validation episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LAKE_RUNS = "omniglot/all_runs.zip"

# name: (method, recipe, evaluations); each evaluation is extra `metalab eval` arguments.
STANDARD = [[]]  # the method's default table (the 5/20-way x 1/5-shot it supports)
LAKE = [["--lake-runs", "{data}/" + LAKE_RUNS], ["--within-alphabet"]]
MNIST = [["--data", "mnist"]]
RUNS: dict[str, tuple[str, str, list[list[str]]]] = {
    "matching-5w1s": ("matching", "omniglot-5w1s", STANDARD + MNIST),
    "matching-5w5s": ("matching", "omniglot-5w5s", STANDARD),
    "matching-20w1s": ("matching", "omniglot-20w1s", STANDARD),
    "matching-20w5s": ("matching", "omniglot-20w5s", STANDARD),
    "matching-5w1s-fce": ("matching", "omniglot-5w1s-fce", STANDARD),
    "matching-lake": ("matching", "lake", LAKE),
    "gnn-5w1s": ("gnn", "omniglot-5w1s", STANDARD),
    "gnn-5w5s": ("gnn", "omniglot-5w5s", STANDARD + [["--shots", "5", "--labelled", "1"]]),
    "gnn-20w1s": ("gnn", "omniglot-20w1s", STANDARD),
    "gnn-20w5s": ("gnn", "omniglot-20w5s", STANDARD),
    "gnn-semi": ("gnn", "omniglot-semi", [["--ways", "5", "--shots", "5"]]),
    "gnn-active": ("gnn", "omniglot-active", [["--ways", "5", "--shots", "5"]]),
    "gnn-lake": ("gnn", "lake", LAKE),
    "siamese": ("siamese", "omniglot", STANDARD + MNIST),
    "siamese-lake": ("siamese", "lake", LAKE + [["--verification"]]),
    "siamese-koch": ("siamese", "koch", LAKE + [["--verification"]] + MNIST),
}


def run_one(name: str, args: argparse.Namespace) -> dict:
    method, recipe, evaluations = RUNS[name]
    run_dir = args.out / name
    started = time.monotonic()
    common = ["--device", args.device, "--no-progress"]
    train = [sys.executable, "-m", "metalab", "train", method, "--recipe", recipe]
    train += ["--run-dir", str(run_dir), "--minutes", str(args.minutes), *common]
    if (run_dir / "checkpoint.pt").exists():
        train.append("--resume")
    status = {"run": name, "method": method, "recipe": recipe}
    with open(args.out / f"{name}.log", "w") as log:
        code = _call(train, log, 60 * args.minutes + 300)
        status["train_s"] = round(time.monotonic() - started)
        status["train_rc"] = code
        for extra in evaluations if code == 0 else []:
            extra = [a.format(data=args.data) for a in extra]
            evaluate = [sys.executable, "-m", "metalab", "eval", str(run_dir), *extra, *common]
            if "--lake-runs" not in extra and "--verification" not in extra:
                evaluate += ["--trials" if "--within-alphabet" in extra else "--episodes"]
                evaluate += [str(args.trials if "--within-alphabet" in extra else args.episodes)]
            status.setdefault("eval_rc", []).append(_call(evaluate, log, args.eval_timeout))
    status["total_s"] = round(time.monotonic() - started)
    print(json.dumps(status), flush=True)
    if args.report is not None:  # the small files, e.g. to bring back from a lent machine
        keep = args.report / name
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "status.json").write_text(json.dumps(status) + "\n")
        for path in [args.out / f"{name}.log", *run_dir.glob("*.json*")]:
            shutil.copy(path, keep)
    return status


def _call(command: list[str], log, timeout: float) -> int:
    """Run ``command`` with its output in ``log``; 124 if it ran past ``timeout`` seconds."""
    try:
        return subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    except subprocess.TimeoutExpired:
        return 124


def summary(out: Path) -> None:
    """One line per result: run, protocol, accuracy ± CI (or Lake's error ± SEM)."""
    for name in RUNS:
        path = out / name / "eval.json"
        if not path.exists():
            continue
        stored = json.loads(path.read_text())
        episodes = "?"
        for row in stored["results"]:
            p = row["protocol"]
            episodes = p.get("trained_episodes", episodes)
            what = p.get("protocol") or (
                f"{p.get('dataset')} {p.get('ways')}w{p.get('shots')}s"
                + (f" labelled={p['labelled']}" if "labelled" in p else "")
            )
            print(f"{name:20s} {what:45s} {100 * row['mean']:6.2f} ± {100 * row['ci95']:.2f}")
        if "lake" in stored:
            lake = stored["lake"]
            print(
                f"{name:20s} {'Lake 20 runs, error':45s} {lake['mean_error']:6.2f} ± {lake['sem']:.2f}"
            )
        print(f"{name:20s} trained episodes: {episodes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--episodes", type=int, default=1000, help="test episodes per protocol")
    parser.add_argument("--trials", type=int, default=400, help="within-alphabet trials")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/metric-table"))
    parser.add_argument("--data", default=os.environ.get("METALAB_DATA", "."), help="data root")
    parser.add_argument("--summary", action="store_true", help="only print the summary of --out")
    parser.add_argument("--report", type=Path, help="copy each run's logs and JSON files here")
    parser.add_argument("--eval-timeout", type=float, default=600, help="seconds per evaluation")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        names = args.only.split(",") if args.only else list(RUNS)
        unknown = sorted(set(names) - set(RUNS))
        if unknown:
            parser.error(f"unknown runs {unknown}: use some of {sorted(RUNS)}")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda n: run_one(n, args), names))
    summary(args.out)


if __name__ == "__main__":
    main()

"""Meta-Q-Learning (Fakoor et al. 2020) on the PEARL suite: TD3 with and without its context, each
before and after MQL's adaptation, grouped over seeds, from the runs' `metalab eval` results
(metalab.rl.offpolicy).

    python benchmarks/mql.py RUN_DIR... [--markdown] [--curves PNG] [--variant prox=ess]

Each RUN_DIR is an `mql` run that `metalab eval RUN_DIR` has scored (its eval.json). Runs with the
same settings but different seeds are one group; a cell is the mean over seeds of each seed's mean
return over the test tasks, ± the 95% CI over seeds (Student's t; with one seed, 1.96 sd / sqrt(n)
over its test tasks). "adapted - not" pairs each seed's two rows task by task, "context - no
context" pairs the two groups' seeds by seed number. The paper's claims to check: TD3 with context
>> TD3 without; adaptation >= no adaptation. ``--curves`` draws each group's test return without
adaptation over training (environment steps), mean over seeds ± 95% CI over seeds (one seed:
its 95% CI over the test tasks). ``--variant`` takes the adapted rows from a `metalab eval RUN --test-time ...` evaluation (stored
in eval.json under that name, e.g. ``prox=ess``) instead of the run's own settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metalab.evaluate.protocol import confidence_interval, seeds_interval
from metalab.reports import print_rows

SEEDLESS = ("seed",)  # config fields that do not make another group


def label(config: dict) -> str:
    return "TD3+context" if config["use_context"] else "TD3 (no context)"


def collect(runs: list[Path], variant: str | None = None) -> dict[str, dict]:
    """``{group label: {"seeds": {seed: eval.json}, "runs": [run dirs]}}``."""
    groups: dict[str, dict] = {}
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        evaluation = json.loads((run / "eval.json").read_text())
        if variant and variant not in evaluation.get("variants", {}):
            raise SystemExit(f"{run} has no {variant} evaluation: metalab eval {run} --test-time "
                             + variant.replace(",", " --test-time "))  # fmt: skip
        key = json.dumps({k: v for k, v in config.items() if k not in SEEDLESS}, sort_keys=True)
        group = groups.setdefault(key, {"label": label(config), "seeds": {}, "runs": []})
        group["seeds"][config["seed"]] = evaluation
        group["runs"].append(run)
    return {g["label"]: g for g in groups.values()}


def cell(per_seed: list[np.ndarray], signed: bool = False) -> str:
    """Mean over seeds of each seed's mean over tasks ± 95% CI (over tasks for one seed)."""
    if len(per_seed) == 1:
        mean, half = confidence_interval(per_seed[0])
    else:
        mean, half = seeds_interval([float(np.mean(v)) for v in per_seed])
    return f"{mean:+.1f} ± {half:.1f}" if signed else f"{mean:.1f} ± {half:.1f}"


def adapted_evaluation(evaluation: dict, variant: str | None) -> dict:
    """The evaluation whose adapted row counts: the run's own, or a `--test-time` variant's."""
    return evaluation["variants"][variant] if variant else evaluation


def returns(evaluation: dict, adapted: bool, variant: str | None = None) -> np.ndarray:
    if adapted:
        evaluation = adapted_evaluation(evaluation, variant)
    rows = list(evaluation["rows"].values())
    return np.asarray(rows[1 if adapted else 0]["returns"])


def table(groups: dict, variant: str | None = None) -> tuple[list[str], list[list[str]]]:
    header = ["row", "seeds", "steps", "no adaptation", "adapted (MQL)", "adapted - not",
              "seeds better", "classifier acc."]  # fmt: skip
    body = []
    for name, group in groups.items():
        evals = [group["seeds"][s] for s in sorted(group["seeds"])]
        plain = [returns(e, False) for e in evals]
        adapted = [returns(e, True, variant) for e in evals]
        diff = [a - p for a, p in zip(adapted, plain)]
        better = sum(float(np.mean(d)) > 0 for d in diff)
        accuracy = np.mean(
            [adapted_evaluation(e, variant)["adaptation"]["classifier_accuracy"] for e in evals]
        )
        steps = {e["protocol"]["trained_steps"] for e in evals}
        body.append([name, str(len(evals)), "/".join(f"{s:,}" for s in sorted(steps)),
                     cell(plain), cell(adapted), cell(diff, signed=True), f"{better}/{len(evals)}",
                     f"{accuracy:.2f}"])  # fmt: skip
    return header, body


def context_gain(groups: dict, variant: str | None = None) -> tuple[list[str], list[list[str]]]:
    """TD3+context minus TD3 without, paired by seed number, both rows."""
    with_, without = groups.get("TD3+context"), groups.get("TD3 (no context)")
    if with_ is None or without is None:
        return [], []
    seeds = sorted(set(with_["seeds"]) & set(without["seeds"]))
    body = []
    for adapted in (False, True):
        diff = [
            returns(with_["seeds"][s], adapted, variant)
            - returns(without["seeds"][s], adapted, variant)
            for s in seeds
        ]
        ahead = sum(float(np.mean(d)) > 0 for d in diff)
        name = "adapted (MQL)" if adapted else "no adaptation"
        body.append([name, str(len(seeds)), cell(diff, signed=True), f"{ahead}/{len(seeds)}"])
    return ["context - no context", "seeds", "return", "seeds ahead"], body


def curves(groups: dict, path: Path) -> None:
    """Each group's test return without adaptation over environment steps, mean over seeds ±
    95% CI over seeds (Student's t), from each run's metrics.jsonl."""
    from metalab.plots import plot_band_curves

    lines = {}
    for name, group in groups.items():
        by_steps: dict[int, list[float]] = {}
        over_tasks: dict[int, float] = {}  # one seed: its own 95% CI over the test tasks
        for run in group["runs"]:
            for line in (run / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if "return" in row:
                    by_steps.setdefault(row["steps"], []).append(row["return"])
                    over_tasks[row["steps"]] = row["return_ci95"]
        n = len(group["runs"])
        x = np.array([s for s in sorted(by_steps) if len(by_steps[s]) == n])
        stats = [
            seeds_interval(by_steps[s]) if n > 1 else (by_steps[s][0], over_tasks[s]) for s in x
        ]
        seeds = f"{n} seeds" if n > 1 else "1 seed, 95% CI over test tasks"
        lines[f"{name} ({seeds})"] = (
            x, np.array([m for m, _ in stats]), np.array([h for _, h in stats]),
        )  # fmt: skip
    task = next(iter(next(iter(groups.values()))["seeds"].values()))["protocol"]["task"]
    plot_band_curves(path, lines, "environment steps", "test return (no adaptation)",
                     f"MQL on {task}: test tasks, mean over seeds ± 95% CI over seeds")  # fmt: skip
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--curves", type=Path)
    parser.add_argument(
        "--variant", help="the adapted rows of `metalab eval --test-time` runs, e.g. prox=ess"
    )
    args = parser.parse_args()
    groups = collect(args.runs, args.variant)
    p = next(iter(next(iter(groups.values()))["seeds"].values()))["protocol"]
    title = (
        f"{p['task']}: {p['test_tasks']} test tasks x {p['episodes_per_task']} episodes of "
        f"{p['episode_steps']} steps; return ± 95% CI over seeds"
        + (f"; adapted with {args.variant}" if args.variant else "")
    )
    print_rows(title, *table(groups, args.variant), args.markdown)
    header, body = context_gain(groups, args.variant)
    if body:
        print_rows("The same test tasks, TD3+context minus TD3 (paired by seed)", header, body,
                   args.markdown)  # fmt: skip
    if args.curves:
        curves(groups, args.curves)


if __name__ == "__main__":
    main()

"""Meta-learned curiosity (Alet et al. 2020): curiosity programs compared on one protocol, and a
search's summary, from `metalab train curiosity` / `curiosity-search` run directories
(metalab.rl.curiosity, metalab.rl.curiosity_search).

    python benchmarks/curiosity.py RUN_DIR... [--markdown] [--curves PNG]

Curiosity runs are grouped by protocol (everything in config.json but the program and the
trials); each group is one table: a program's score is the mean over its trials (lifetimes with
seeds seed, seed+1, ...) ± the 95% t-interval over trials, and "vs none" pairs its trials with
no_curiosity's by seed (mean difference ± t-interval, trials ahead). The score is the number of
distinct states visited per environment on the grid room, the mean extrinsic episode return
elsewhere. A `curiosity-search` run prints its ten best programs, the regressor's rank
correlation and the mean score before and after the regressor took over. ``--curves`` draws each
program's score over the lifetime (mean ± 95% t-interval over trials), one panel per group.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from metalab.evaluate.protocol import seeds_interval
from metalab.reports import print_rows
from metalab.rl.curiosity import CuriosityConfig

PER_PROGRAM = ("program", "trials", "seed")  # config fields that do not change the protocol


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open() if line.strip()]


def collect(runs: list[Path]) -> tuple[dict[str, dict], list[Path]]:
    """``({protocol key: {"config": ..., "programs": {name: [trial rows]}}}, [search runs])``."""
    groups: dict[str, dict] = {}
    searches = []
    for run in runs:
        if not (run / "config.json").is_file():
            print(f"skipped {run}: not a run directory", file=sys.stderr)
            continue
        config = json.loads((run / "config.json").read_text())
        if config["method"] == "curiosity":  # settings added since the run have their defaults
            config = {**asdict(CuriosityConfig()), **config}
        if config["method"] == "curiosity-search":
            searches.append(run)
            continue
        key = json.dumps({k: v for k, v in config.items() if k not in PER_PROGRAM}, sort_keys=True)
        group = groups.setdefault(key, {"config": config, "programs": {}})
        rows = rows_of(run)
        if rows:  # a run that has not finished a lifetime yet has nothing to show
            group["programs"].setdefault(config["program"], []).extend(rows)
    return groups, searches


def title_of(config: dict) -> str:
    from metalab.rl.curiosity import ENVIRONMENTS

    env = ENVIRONMENTS[config["env"]]
    return (
        f"{env.description}: {env.score} per lifetime of {config['envs']} envs x "
        f"{config['steps']} steps (combiner {config['combiner']}"
        f"{', intrinsic centred' if config['center'] else ''}), mean ± 95% t-interval "
        "over trials"
    )


def group_table(group: dict, markdown: bool) -> None:
    programs = group["programs"]
    base = {r["seed"]: r["score"] for r in programs.get("no_curiosity", [])}
    body = []
    for name, trials in sorted(
        programs.items(), key=lambda kv: -np.mean([r["score"] for r in kv[1]])
    ):
        mean, half = seeds_interval([r["score"] for r in trials])
        paired = [r["score"] - base[r["seed"]] for r in trials if r["seed"] in base]
        versus = ""
        if name != "no_curiosity" and len(paired) > 1:
            d, dh = seeds_interval(paired)
            versus = f"{d:+.1f} ± {dh:.1f} ({sum(p > 0 for p in paired)}/{len(paired)})"
        minutes = np.mean([r["seconds"] for r in trials]) / 60
        body.append([name, f"{mean:.1f} ± {half:.1f}", str(len(trials)), versus, f"{minutes:.1f}"])
    header = ["program", "score", "trials", "vs none (ahead)", "min/trial"]
    print_rows(title_of(group["config"]), header, body, markdown)


def search_table(run: Path, markdown: bool) -> None:
    from metalab.rl.curiosity import evaluate_curiosity_run

    evaluation = evaluate_curiosity_run(run)
    p, q = evaluation["protocol"], evaluation["predictor"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    title = (
        f"Search {run}: {p['scored']} of {p['candidates']} candidates, {p['trials_per_program']} "
        f"lifetimes of {p['envs']} envs x {p['steps_per_env']} steps each on {p['env']}; "
        f"mean score {fmt(q['warmup_mean'])} over the random warm-up, "
        f"{fmt(q['ordered_mean'])} once the regressor ordered (rank correlation "
        f"{fmt(q['spearman'])} on its picks, {fmt(q['warmup_loo_spearman'])} leave-one-out on "
        "the warm-up)"
    )
    body = [
        [name, row["program"], f"{row['score']:.1f} ± {row['ci95']:.1f}"]
        for name, row in evaluation["rows"].items()
    ]
    print_rows(title, ["name", "program", "score"], body, markdown, right=2)


def curves(groups: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups.values()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 programs, each its own colour
        for name, trials in sorted(group["programs"].items()):
            n = min(len(r["curve"]) for r in trials)
            x = np.array([p[0] for p in trials[0]["curve"][:n]])
            stats = [seeds_interval([r["curve"][k][1] for r in trials]) for k in range(n)]
            mean, half = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            ax.plot(x, mean, label=name)
            ax.fill_between(x, mean - half, mean + half, alpha=0.15)
        c = group["config"]
        ax.set(title=f"{c['env']}, {c['envs']} x {c['steps']} steps", xlabel="steps per env")
        ax.set_ylabel("distinct states so far" if c["env"].startswith("grid") else "mean return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--curves", type=Path, help="write the lifetime curves to this PNG")
    args = parser.parse_args()
    groups, searches = collect(args.runs)
    for group in groups.values():
        group_table(group, args.markdown)
    for run in searches:
        search_table(run, args.markdown)
    if args.curves and groups:
        curves(groups, args.curves)


if __name__ == "__main__":
    main()

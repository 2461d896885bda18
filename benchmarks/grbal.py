"""Model-based meta-RL under changing dynamics (GrBAL / ReBAL, Nagabandi, Clavera et al. 2019):
every row of every evaluated run, grouped over seeds, on the fixed test rollouts of
`metalab eval` (metalab.rl.evaluate).

    python benchmarks/grbal.py RUN_DIR... [--markdown] [--curves PNG]

Each RUN_DIR is an RL run that `metalab eval RUN_DIR` has scored (its eval.json). Runs of the same
method and settings but different seeds are one group; a group's cell is the mean over seeds of
each seed's mean test return, ± the 95% CI over seeds (Student's t: t sd / sqrt(seeds), t = 4.30
for three seeds; with one seed, 1.96 sd / sqrt(n) over that seed's rollouts). Columns: the test conditions (seen = the training perturbations,
unseen = a held-out part, switch = the perturbation changes halfway), then the 1- and 10-step
model RMSE on the row's own test rollouts. The paper's claim to check, on the unseen
perturbations: GrBAL >= ReBAL > MB+DE > MB (figures only; no numbers to compare).
``--curves`` draws each group's training return per iteration (its rollouts of all seeds, ± 95% CI).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metalab.evaluate.protocol import confidence_interval, seeds_interval
from metalab.reports import print_rows

SEEDLESS = ("seed", "test_rollouts")  # config fields that do not make another group


def group_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in SEEDLESS}, sort_keys=True)


def method_label(config: dict) -> str:
    extra = " (learned psi)" if config.get("learn_inner_lr") else ""
    return {"mb": "MB", "grbal": "GrBAL", "rebal": "ReBAL"}[config["method"]] + extra


def mean_ci(values: list[float], t: bool = True) -> tuple[float, float]:
    """The mean and the half-width of its 95% interval: Student's t over a few seeds, 1.96 sd /
    sqrt(n) over many rollouts."""
    return seeds_interval(values) if t else confidence_interval(values)


def collect(runs: list[Path]) -> tuple[dict, dict]:
    """``{group: {row label: {condition: [per-seed mean], ...}}}`` and the protocol."""
    groups: dict[str, dict] = {}
    protocol = None
    paired.clear()
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        ev = json.loads((run / "eval.json").read_text())
        protocol = protocol or ev["protocol"]
        rows = groups.setdefault(group_key(config), {"label": method_label(config), "rows": {},
                                                     "runs": []})  # fmt: skip
        rows["runs"].append(run)
        for label, row in ev["rows"].items():
            label = (
                label.replace("GrBAL", method_label(config))
                if config["method"] == "grbal"
                else label
            )
            cells = rows["rows"].setdefault(label, {})
            for condition, cell in row.items():
                if isinstance(cell, dict) and "returns" in cell:
                    cells.setdefault(condition, []).append(cell["returns"])
                    paired.setdefault(label, {}).setdefault(config["seed"], {})[condition] = (
                        np.array(cell["returns"])
                    )
            cells.setdefault("error", []).append(row["error"])
    return groups, protocol


# {row label: {seed: {condition: returns by rollout index}}}: every row's test rollouts share
# their environment and planner seeds (by index), so rows of the same training seed pair up.
paired: dict[str, dict[int, dict[str, np.ndarray]]] = {}


def differences(protocol: dict, baseline: str = "MB") -> tuple[list[str], list[list[str]]]:
    """Each row minus ``baseline``, paired by training seed and test rollout: per condition and
    over all, the mean over seeds of each seed's mean difference ± its t interval over seeds (one
    seed: over its rollouts), and in how many seeds the row was ahead."""
    conditions = [*protocol["conditions"], "all"]
    header = ["row - " + baseline, "seeds", *conditions, "seeds ahead (all)"]
    body = []
    base = paired.get(baseline, {})
    for label, by_seed in paired.items():
        seeds = sorted(set(by_seed) & set(base))
        if label == baseline or not seeds:
            continue
        out = [label, str(len(seeds))]
        for c in conditions:
            pick = (lambda d: np.concatenate(list(d.values()))) if c == "all" else (lambda d: d[c])  # noqa: E731, B023
            deltas = [float(np.mean(pick(by_seed[s]) - pick(base[s]))) for s in seeds]
            mean, ci = mean_ci(deltas)
            if len(seeds) == 1:  # one seed: the interval over its paired rollouts
                mean, ci = mean_ci(list(pick(by_seed[seeds[0]]) - pick(base[seeds[0]])), t=False)
            out.append(f"{mean:+.1f} ± {ci:.1f}")
        out.append(f"{sum(d > 0 for d in deltas)}/{len(seeds)}")
        body.append(out)
    return header, body


def table(groups: dict, protocol: dict) -> tuple[list[str], list[list[str]]]:
    conditions = list(protocol["conditions"])
    header = ["row", "seeds", *conditions, "1-step RMSE", "10-step RMSE"]
    body = []
    for group in groups.values():
        for label, cells in group["rows"].items():
            seeds = len(cells["error"])
            out = [label, str(seeds)]
            for c in conditions:
                per_seed = [float(np.mean(r)) for r in cells[c]]
                mean, ci = mean_ci(per_seed) if seeds > 1 else mean_ci(cells[c][0], t=False)
                out.append(f"{mean:.1f} ± {ci:.1f}")
            errors = np.array(cells["error"])
            out += [f"{errors[:, 0].mean():.3f}", f"{errors[:, -1].mean():.3f}"]
            body.append(out)
    return header, body


def curves(groups: dict, path: Path) -> None:
    """Each group's training return per iteration: the mean over all seeds' rollouts of that
    iteration ± 1.96 sd / sqrt(rollouts), from the rollouts kept in each run's checkpoint."""
    from metalab.plots import plot_band_curves
    from metalab.rl.train import load_rl_checkpoint

    lines = {}
    for group in groups.values():
        per_iteration: dict[int, list[float]] = {}
        for run in group["runs"]:
            checkpoint = load_rl_checkpoint(run / "checkpoint.pt")
            c = checkpoint["config"]
            totals = [float(np.sum(t["rewards"])) for t in checkpoint["replay"]]
            chunks = [totals[: c["random_rollouts"]]]
            rest = totals[c["random_rollouts"] :]
            chunks += [rest[i : i + c["rollouts"]] for i in range(0, len(rest), c["rollouts"])]
            for i, chunk in enumerate(chunks):
                per_iteration.setdefault(i, []).extend(chunk)
        x = np.array(sorted(per_iteration))
        stats_ = [mean_ci(per_iteration[i], t=False) for i in x]
        label = f"{group['label']} ({len(group['runs'])} seeds)"
        lines[label] = (x, np.array([m for m, _ in stats_]), np.array([h for _, h in stats_]))
    plot_band_curves(path, lines, "iteration (0: random actions)", "return of a training rollout",
                     "training rollouts under the training perturbations, all seeds: mean ± 95% CI")  # fmt: skip
    print(f"figure: {path}")


def show(title: str, header: list[str], body: list[list[str]], markdown: bool) -> None:
    print_rows(title, header, body, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--curves", type=Path)
    args = parser.parse_args()
    groups, protocol = collect(args.runs)
    header, body = table(groups, protocol)
    title = (f"{protocol['task']}, {protocol['rollouts_per_condition']} test rollouts per "
             f"condition of {protocol['episode_steps']} steps (frame skip {protocol['frame_skip']}), "
             f"{protocol['trained_transitions']:,} training transitions; return ± 95% CI")  # fmt: skip
    legend = "; ".join(
        f"{c}: " + ("the training perturbations in turn" if c == "seen" else text)
        for c, text in protocol["conditions"].items()
    )
    title = f"{title}. {legend}"
    show(title, header, body, args.markdown)
    header, body = differences(protocol)
    if body:
        show("The same rollouts, each row minus MB (paired by seed and rollout)", header, body,
             args.markdown)  # fmt: skip
    if args.curves:
        curves(groups, args.curves)


if __name__ == "__main__":
    main()

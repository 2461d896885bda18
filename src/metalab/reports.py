"""Tables of results: printed with rich, saved as JSON beside the run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from metalab.evaluate import Result, RunEvaluation
from metalab.io import atomic_write

TRANSDUCTIVE = (
    "transductive: answers use the batch statistics of each episode's queries (batch norm on the "
    "batch at hand), so a query's answer depends on the other queries"
)
ONE_TO_ONE = (
    "one-to-one, transductive: each run's or trial's queries are answered at once, every one a "
    "different character (the test's layout; a person answers one drawing at a time)"
)


def _decided(decision: str | None) -> str:
    """The suffix of a row, and of its eval.json key, answered by a transductive decision rule."""
    return f" ({decision}, transductive)" if decision and decision != "argmax" else ""


def results_table(title: str, results: list[Result]) -> Table:
    """One row per protocol: accuracy as mean ± 95% CI in percent; a transductive method's rows
    say so."""
    table = Table(title=title)
    for column in ("dataset", "ways", "shots", "queries", "episodes", "accuracy (95% CI)"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in results:
        p = r.protocol
        dataset = p["dataset"] + (f" ({p['protocol']})" if "protocol" in p else "")
        if "labelled" in p:
            dataset += f" ({p['labelled']} labelled per class)"
        if p.get("decision"):
            dataset += _decided(p["decision"])
            table.caption = ONE_TO_ONE
        elif p.get("transductive"):
            dataset += " (transductive)"
            table.caption = TRANSDUCTIVE
        if p.get("protocol") == "verification":  # same/different pairs, not episodes
            row = (dataset, "2", "-", "-", f"{p['pairs']} pairs", r)
        else:
            episodes = p.get("episodes", f"{p['images']} images" if "images" in p else "-")
            row = (dataset, p["ways"], p["shots"], p["queries"], episodes, r)
        table.add_row(*map(str, row))
    return table


def regression_table(title: str, rows: list[tuple[str, Result]]) -> Table:
    """One row per (model, K, steps): mean squared error ± 95% CI over the test tasks."""
    table = Table(title=title)
    for column in ("model", "K", "steps", "inner lr", "tasks", "query pts", "MSE (95% CI)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, r in rows:
        p = r.protocol
        row = (model, p["shots"], p["steps"], f"{p['inner_lr']:g}", p["episodes"], p["queries"], r)
        table.add_row(*map(str, row))
    return table


def memorization_table(title: str, results: list[Result]) -> Table:
    """NME regression (:mod:`metalab.evaluate.memorization`): one row per way of answering (the
    protocol's other keys), both errors as mean ± 95% CI over the test tasks."""
    from metalab.evaluate.memorization import METRICS

    table = Table(title=title)
    for column in ("answers by", "K", "tasks", "query pts", *METRICS.values()):
        table.add_column(column, justify="left" if column == "answers by" else "right")
    rows: dict[tuple[str, int], dict[str, Result]] = {}
    shared = {"dataset", "shots", "queries", "episodes", "seed", "metric"}
    for r in results:
        how = ", ".join(f"{k} {v}" for k, v in r.protocol.items() if k not in shared)
        rows.setdefault((how, r.protocol["shots"]), {})[r.protocol["metric"]] = r
    for (how, _), found in rows.items():
        p = next(iter(found.values())).protocol
        cells = (p["shots"], p["episodes"], p["queries"])
        table.add_row(how or "-", *map(str, cells), *(str(found.get(m, "-")) for m in METRICS))
    return table


def uncertainty_table(title: str, rows: list[tuple[str, Result]]) -> Table:
    """One row per model: every metric of :data:`metalab.evaluate.uncertainty.METRICS`
    (mean ± 95% CI over the test tasks), with the draws and the mixture's std."""
    from metalab.evaluate.uncertainty import METRICS

    table = Table(
        title=title, caption=f"mixture std s chosen on validation tasks; {METRICS['best_of']}"
    )
    for column in ("model", "K", "draws", "s", "tasks", *METRICS.values()):
        table.add_column(column, justify="left" if column == "model" else "right")
    by_model: dict[str, dict[str, Result]] = {}
    for model, r in rows:
        by_model.setdefault(model, {})[r.protocol["metric"]] = r
    for model, found in by_model.items():
        p = next(iter(found.values())).protocol
        cells = (p["shots"], p["draws"], f"{p['noise_std']:.3g}", p["episodes"])
        table.add_row(model, *map(str, cells), *(str(found[m]) for m in METRICS))
    return table


def active_table(title: str, active: dict, rounds: tuple[int, ...] = (0, 1, 2, 4, 10)) -> Table:
    """Active learning: MSE of the mean (± 95% CI) after 1 + r points for r in ``rounds``, per
    model and strategy (``{model: {strategy: (tasks, rounds + 1)}}``)."""
    from metalab.evaluate.protocol import confidence_interval

    table = Table(title=title)
    table.add_column("model")
    table.add_column("next point")
    for r in rounds:
        table.add_column(f"{1 + r} point{'s' if r else ''}", justify="right")
    for model, curves in active.items():
        for strategy, values in curves.items():
            cells = [confidence_interval(values[:, r]) for r in rounds if r < values.shape[1]]
            table.add_row(model, strategy, *(f"{m:.3f} ± {h:.3f}" for m, h in cells))
    return table


def sub_dataset_table(title: str, grid) -> Table:
    """Per-sub-dataset accuracy (:class:`metalab.evaluate.multi.SubDatasetTable`): a row per group,
    a column per filter, each cell mean ± 95% CI in percent, with the mean of each row, of each
    column (the paper's "average per filter") and of all; a mean's ± is its cells' in quadrature."""
    p = grid.protocol
    substitute = OMNI_ART_MULTI if p["dataset"].startswith("omni-art-multi") else ""
    table = Table(
        title=f"{title}: {p['ways']}-way {p['shots']}-shot per sub-dataset, "
        f"{p['episodes']} episodes each (accuracy, 95% CI)",
        caption=SUB_DATASET_CAPTION + substitute,
    )
    table.add_column("group")
    for column in [*grid.columns, "mean"]:
        table.add_column(column.title() if column != "-" else "accuracy", justify="right")

    def cell(mean: float, ci: float) -> str:
        return f"{100 * mean:.2f} ± {100 * ci:.2f}%"

    by_row = grid.row_means()
    for row in grid.rows:
        found = [grid.cells.get((row, c)) for c in grid.columns]
        table.add_row(row, *("-" if r is None else str(r) for r in found), cell(*by_row[row]))
    by_column = grid.column_means()
    table.add_row("mean", *(cell(*by_column[c]) for c in grid.columns), cell(*grid.overall()))
    return table


SUB_DATASET_CAPTION = "means: plain means of the cells, ± the cells' 95% CIs added in quadrature"
OMNI_ART_MULTI = (
    "; omni-art-multi is our substitute for ARML's Art-Multi (Omniglot alphabet groups x filters): "
    "no paper number is comparable"
)


def _sub_dataset_tables(results: list[Result]) -> list:
    from metalab.evaluate.multi import sub_dataset_tables

    return sub_dataset_tables(results)


def _merged_sub_datasets(eval_json: Path, grids: list) -> dict:
    """The ``sub_datasets`` entry of ``eval.json``: the stored summaries, with those of ``grids``
    added or replaced (keyed ``"5-way 1-shot"``), so evaluating another shot keeps the first."""
    stored = json.loads(eval_json.read_text()).get("sub_datasets", {}) if eval_json.exists() else {}
    stored = stored if isinstance(stored, dict) else {}
    for grid in grids:
        stored[f"{grid.protocol['ways']}-way {grid.protocol['shots']}-shot"] = grid.to_dict()
    return stored


def lake_table(title: str, lake: dict) -> Table:
    """Lake's one-shot runs: mean error over runs in percent, ± SEM over runs and over alphabets
    (Lake et al.'s ±: 10 alphabets x 2 runs)."""
    table = Table(title=title, caption=ONE_TO_ONE if lake.get("decision") else None)
    for column in (
        "run set",
        "runs",
        "error",
        "± SEM runs",
        "± SEM alphabets",
        "at Lake's precision",
    ):
        table.add_column(column, justify="left" if column == "run set" else "right")
    mean = lake["mean_error"]
    one_decimal = math.floor(mean * 10 + 0.5) / 10  # half up, as 38.75 -> 38.8 in Lake's table
    table.add_row(
        lake.get("source", "Lake runs") + _decided(lake.get("decision")),
        str(lake["runs"]),
        f"{mean:.2f}%",
        _sem(lake.get("sem")),
        _sem(lake.get("sem_alphabets")),
        f"{one_decimal:.1f}%",
    )
    return table


def lake_alphabet_table(title: str, lake: dict) -> Table:
    """Lake's one-shot runs by alphabet: each alphabet's runs and their mean error in percent."""
    table = Table(title=title)
    for column in ("alphabet", "runs", "error"):
        table.add_column(column, justify="left" if column == "alphabet" else "right")
    runs_of: dict[str, list[str]] = {}
    for run, alphabet in lake["run_alphabets"].items():
        runs_of.setdefault(alphabet, []).append(run)
    for alphabet, error in lake["per_alphabet"].items():
        table.add_row(alphabet, ", ".join(runs_of[alphabet]), f"{error:.2f}%")
    return table


def within_alphabet_table(title: str, by_alphabet: dict[str, Result], lake: dict | None) -> Table:
    """Within-alphabet one-shot trials by alphabet (accuracy ± 95% CI over its trials), beside the
    error on Lake's runs of the same alphabet where Lake's run set has it."""
    lake_errors = (lake or {}).get("per_alphabet", {})
    table = Table(title=title)
    columns = ["alphabet", "trials", "accuracy (95% CI)", "error"]
    if lake_errors:
        columns.append("Lake's runs: error")
    for column in columns:
        table.add_column(column, justify="left" if column == "alphabet" else "right")
    for alphabet, result in by_alphabet.items():
        row = [alphabet, str(result.protocol["episodes"]), str(result)]
        row.append(f"{100 * (1 - result.mean):.2f}%")
        if lake_errors:
            error = lake_errors.get(alphabet)
            row.append("-" if error is None else f"{error:.2f}%")
        table.add_row(*row)
    return table


def embedding_baselines_table(title: str, results: list[Result]) -> Table:
    """The embedding baselines of CACTUs (:mod:`metalab.evaluate.embedding`): a row per baseline,
    a column per protocol (N-way K-shot), each cell accuracy mean ± 95% CI in percent; the
    dataset, queries, episodes and seed shared by the cells in the title."""
    columns: dict[tuple[int, int], None] = {}
    rows: dict[str, dict[tuple[int, int], Result]] = {}
    for r in results:
        key = (r.protocol["ways"], r.protocol["shots"])
        columns.setdefault(key)
        rows.setdefault(r.protocol["baseline"], {})[key] = r
    shared = {
        k: sorted({str(r.protocol.get(k)) for r in results})
        for k in ("dataset", "queries", "episodes", "seed")
    }
    table = Table(
        title=f"{title}: embedding baselines on {', '.join(shared['dataset'])}, "
        f"{'/'.join(shared['queries'])} queries per class, "
        f"{'/'.join(shared['episodes'])} episodes (seed {'/'.join(shared['seed'])}), "
        "accuracy (95% CI)",
        caption="logistic regression: L2, C = 1, lbfgs; MLP: a fixed number of full-batch Adam "
        "steps (no early stopping on the queries); cluster matching: k-means of the "
        "meta-training embeddings",
    )
    table.add_column("baseline")
    for ways, shots in columns:
        table.add_column(f"{ways}-way {shots}-shot", justify="right")
    for baseline, found in rows.items():
        k = next(iter(found.values())).protocol.get("clusters")
        label = baseline if k is None else f"{baseline} (k = {k})"
        table.add_row(label, *(str(found[key]) if key in found else "-" for key in columns))
    return table


def _sem(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(*tables: Table) -> None:
    """Print to stdout; a pipe or file gets wide tables rather than rich's 80 columns."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    for table in tables:
        console.print(table)


def print_rows(
    title: str, header: list[str], body: list[list[str]], markdown: bool = False, right: int = 1
) -> None:
    """A table of text cells as rich prints it, or as markdown (for RESULTS.md); columns from
    ``right`` on are right-aligned."""
    if markdown:
        print(f"\n{title}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * right + "---:|" * (len(header) - right))
        for row in body:
            print("| " + " | ".join(row) + " |")
        return
    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="right" if i >= right else "left")
    for row in body:
        table.add_row(*row)
    print_tables(table)


def save_eval(
    path: Path, results: list[Result], lake: dict | None, meta: dict, *, extra: dict | None = None
) -> None:
    """Merge results into ``eval.json`` (same protocol -> replaced), written atomically; Lake's
    runs under ``"lake"``, or ``"lake (one-to-one, transductive)"`` when so decided.

    ``extra``: top-level entries that replace the stored ones whole, such as a method's own
    ``{"protocol": ..., "results": {...}}`` (loss curves, accuracy per instance)."""
    stored = json.loads(path.read_text()) if path.exists() else {"results": []}
    rows = stored.get("results")
    rows = rows if isinstance(rows, list) else []  # a method's own results are not Result rows
    keep = {json.dumps(r.protocol, sort_keys=True) for r in results}
    merged = [r for r in rows if json.dumps(r["protocol"], sort_keys=True) not in keep]
    stored["results"] = merged + [r.to_dict() for r in results]
    if lake is not None:
        stored["lake" + _decided(lake.get("decision"))] = lake
    stored.update(meta)
    stored.update(extra or {})
    atomic_write(path, json.dumps(stored, indent=2) + "\n")


def show_evaluation(evaluation: RunEvaluation) -> None:
    """Print what `metalab eval` measured (results, Lake's runs overall and by alphabet, regression
    MSE), draw its figure, and merge the numbers into the run's ``eval.json``."""
    ev = evaluation
    rows = ev.regression.rows if ev.regression is not None else []
    tables = [results_table(ev.title, ev.results)] if ev.results else []
    sub_tables = _sub_dataset_tables(ev.results)
    tables += [sub_dataset_table(ev.title, t) for t in sub_tables]
    if ev.lake is not None:
        tables.append(lake_table(ev.lake_title, ev.lake))
        if "per_alphabet" in ev.lake:
            tables.append(lake_alphabet_table("the same runs by alphabet", ev.lake))
    if ev.within_by_alphabet:
        decision = next(iter(ev.within_by_alphabet.values())).protocol.get("decision")
        title = "within-alphabet trials by alphabet (20-way one-shot, two drawers)"
        title += _decided(decision)
        tables.append(within_alphabet_table(title, ev.within_by_alphabet, ev.lake))
    if rows:
        tables.append(regression_table(ev.title, rows))
    u = ev.uncertainty
    if u is not None:
        rows = rows + u.rows
        tables.append(uncertainty_table(f"the functions each model draws, K = {u.shots}", u.rows))
        if u.active:
            title = "active learning: MSE of the mean to the true function as points are added"
            tables.append(active_table(title, u.active))
    print_tables(*tables)
    if ev.regression is not None and ev.regression.figure is not None:
        from metalab.plots import plot_sinusoid

        print(f"figure: {plot_sinusoid(**ev.regression.figure)}")
    extra = {}
    if u is not None:
        curves = _uncertainty_figures(u, ev.eval_json)
        if curves:  # a run evaluated without --active-learning keeps the curves it has
            extra["active_learning"] = curves
    if ev.within_by_alphabet:
        by_alphabet = {a: {"mean": r.mean, "ci95": r.ci95, "trials": r.protocol["episodes"]}
                       for a, r in ev.within_by_alphabet.items()}  # fmt: skip
        extra["within_alphabet_by_alphabet" + _decided(decision)] = by_alphabet
    if sub_tables and ev.eval_json is not None:
        extra["sub_datasets"] = _merged_sub_datasets(ev.eval_json, sub_tables)
    if ev.eval_json is not None:
        save_eval(ev.eval_json, ev.results + [r for _, r in rows], ev.lake, ev.meta, extra=extra)


def _uncertainty_figures(u, eval_json: Path | None) -> dict:
    """Draw the uncertainty figures beside ``eval_json`` (the draws; active learning) and return
    the active-learning curves' means and 95% CIs per model and strategy, for ``eval.json``."""
    from metalab.evaluate.protocol import confidence_interval
    from metalab.plots import plot_function_samples, plot_mean_curves

    if u.figure is not None:
        print(f"figure: {plot_function_samples(**u.figure)}")
    curves = {f"{m}, {s}": v for m, by in u.active.items() for s, v in by.items()}
    if curves and eval_json is not None:
        points = 1 + np.arange(next(iter(curves.values())).shape[1])
        path = eval_json.parent / f"{u.family}-active.png"
        title = f"active learning on {u.family} tasks: MSE of the mean, 95% CI over tasks"
        print(f"figure: {plot_mean_curves(path, curves, points, 'points seen', 'MSE', title)}")
    return {
        label: {"points": list(range(1, v.shape[1] + 1)),
                "mse": [list(confidence_interval(v[:, r])) for r in range(v.shape[1])]}
        for label, v in curves.items()
    }  # fmt: skip


def show_training_figures(run_dir: Path) -> None:
    """After `metalab train`, from the best weights of a method meta-trained on regression tasks:
    Finn et al.'s Fig. 2 (``sinusoid.png``) for sinusoids, else the functions the model draws
    (``<family>-draws.png``); nothing for other methods."""
    from metalab.evaluate.protocol import EVAL_SEED, answers
    from metalab.evaluate.regression import regression_figure
    from metalab.plots import plot_function_samples, plot_sinusoid
    from metalab.rundir import load_method

    run_dir = Path(run_dir)
    method, _ = load_method(run_dir / "best.pt")
    figure = regression_figure(method, run_dir / "sinusoid.png")
    c = method.config
    if figure is not None:
        path = plot_sinusoid(**figure)
    elif answers(method, "regression") and c.inner_steps > 0:
        path = plot_function_samples(
            run_dir / f"{c.data}-draws.png", [(method.name, method)], c.data, c.eval_shots,
            seed=EVAL_SEED,
        )  # fmt: skip
    else:
        return
    print(f"figure: {path} (the full table: metalab eval {run_dir})")


def optimization_table(results: dict) -> Table:
    """Learned optimizer vs tuned baselines (:mod:`metalab.evaluate.optimization`): per family,
    statistic and optimizer, the loss (mean ± 95% CI) and the LSTM's paired difference."""
    table = Table(title="l2o: loss on fixed test problems (mean ± 95% CI)")
    for col in ("family", "loss at", "optimizer", "lr", "loss", "LSTM − this (paired)"):
        table.add_column(col)
    for family, by_opt in results.items():
        for opt, row in by_opt.items():
            for stat, v in row["loss"].items():
                lr = "-" if row["lr"] is None else f"{row['lr']:.0e}"
                d = row.get("lstm_minus_this", {}).get(stat)
                paired = "-" if d is None else f"{d['mean']:+.4g} ± {d['ci95']:.2g}"
                table.add_row(family, stat, opt, lr, f"{v['mean']:.4g} ± {v['ci95']:.2g}", paired)
    return table


def instance_table(title: str, ours: dict, paper: dict, episodes: int) -> Table:
    """% correct at the k-th instance (:mod:`metalab.evaluate.sequences`): ours (mean ± 95% CI,
    ``{name: [(mean, ci95) per instance]}``) and the paper's rows, at the 1st..5th and 10th."""
    from metalab.evaluate.sequences import TABLE_INSTANCES

    columns = [k for k in TABLE_INSTANCES if k <= len(next(iter(ours.values())))]
    table = Table(title=f"{title}\n% correct at the k-th instance ({episodes} test episodes)")
    table.add_column("model")
    for k in columns:
        table.add_column(_ordinal(k), justify="right")
    for name, stats in ours.items():
        table.add_row(
            name, *(f"{100 * stats[k - 1][0]:.1f} ± {100 * stats[k - 1][1]:.1f}" for k in columns)
        )
    for name, row in paper.items():
        table.add_row(f"{name} (paper)", *(f"{row[TABLE_INSTANCES.index(k)]:.1f}" for k in columns))
    return table


def _ordinal(k: int) -> str:
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(k % 10 if k > 20 else k, "th")
    return f"{k}{suffix}"


_CHECKSUM_WORDS = {
    "ok": "official",
    "missing": "-",
    "unverified": "no known checksum",
    "repacked": "repacked copy (accepted on content)",
    "corrupt": "DIFFERS: delete it and fetch again",
}


def data_check_table(title: str, rows: list[dict], content: dict[str, str]) -> tuple[Table, int]:
    """`metalab data check`: each file (:func:`metalab.data.download.check_files` rows), whether
    it is present, its checksum verdict and its content check; and how many are missing or bad."""
    table = Table(title=title)
    for column in ("file", "present", "checksum", "content"):
        table.add_column(column)
    bad = 0
    for row in rows:
        verdict = content.get(row["path"], "")
        bad += row["status"] in ("missing", "corrupt") or verdict.startswith("BAD")
        present = "yes" if row["present"] else "MISSING"
        table.add_row(row["path"], present, _CHECKSUM_WORDS[row["status"]], verdict)
    return table, bad


def coverage_table(title: str, rows: list[tuple[str, list[Result]]]) -> Table:
    """Ambiguous attribute tasks (:mod:`metalab.evaluate.coverage`): one row per model with
    every metric of its ``METRICS`` (mean ± 95% CI over the test tasks); a substitute for
    PLATIPUS's CelebA experiment, with no paper number beside it."""
    from metalab.evaluate.coverage import METRICS

    table = Table(
        title=title,
        caption="omniglot-attributes: synthetic attributes on Omniglot, our substitute for "
        "CelebA (no paper number); coverage counts the 3 pairs some draw is consistent with",
    )
    for column in ("model", "K", "draws", "tasks", *METRICS.values()):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, results in rows:
        found = {r.protocol["metric"]: r for r in results}
        p = next(iter(found.values())).protocol
        cells = []
        for name in METRICS:
            r = found[name]
            percent = name in ("accuracy", "covers_hidden")
            cells.append(f"{100 * r.mean:.1f} ± {100 * r.ci95:.1f}%" if percent else str(r))
        table.add_row(model, str(p["shots"]), str(p["draws"]), str(p["tasks"]), *cells)
    return table


def rl_table(title: str, evaluation: dict) -> Table:
    """`metalab eval` of an RL run: per row, the mean return ± 95% CI of each test condition and
    the model's 1- and k-step prediction error (metalab.rl.evaluate)."""
    p = evaluation["protocol"]
    conditions = list(p["conditions"])
    k = len(next(iter(evaluation["rows"].values()))["error"])
    table = Table(
        title=f"{title}: {p['task']}, {p['rollouts_per_condition']} rollouts per condition of "
        f"{p['episode_steps']} steps (frame skip {p['frame_skip']}), trained on "
        f"{p['trained_transitions']:,} transitions; return ± 95% CI"
    )
    table.add_column("row")
    for condition in conditions:
        table.add_column(f"{condition}: {p['conditions'][condition]}", justify="right")
    table.add_column("1-step RMSE", justify="right")
    table.add_column(f"{k}-step RMSE", justify="right")
    for label, row in evaluation["rows"].items():
        cells = [f"{row[c]['return']:.1f} ± {row[c]['ci95']:.1f}" for c in conditions]
        table.add_row(label, *cells, f"{row['error'][0]:.3f}", f"{row['error'][-1]:.3f}")
    return table


def mql_table(title: str, evaluation: dict) -> Table:
    """`metalab eval` of an MQL run: the test tasks' mean return ± 95% CI without and with the
    adaptation, their paired difference and what the adaptation saw (metalab.rl.offpolicy)."""
    p, d, a = evaluation["protocol"], evaluation["difference"], evaluation["adaptation"]
    table = Table(
        title=f"{title}: {p['task']}, {p['test_tasks']} test tasks x {p['episodes_per_task']} "
        f"episodes of {p['episode_steps']} steps, trained {p['trained_steps']:,} steps; "
        "return ± 95% CI over tasks"
    )
    for column in ("row", "return", "adapted - not", "classifier acc.", "mean beta", "lambda"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for i, (label, row) in enumerate(evaluation["rows"].items()):
        extra = ["", "", "", ""]
        if i == 1:
            extra = [
                f"{d['return']:+.1f} ± {d['ci95']:.1f} ({d['better']}/{p['test_tasks']} better)",
                f"{a.get('classifier_accuracy', float('nan')):.2f}",
                f"{a.get('beta_mean', float('nan')):.2f}",
                f"{a.get('prox_coef', float('nan')):.2f}",
            ]
        table.add_row(label, f"{row['return']:.1f} ± {row['ci95']:.1f}", *extra)
    return table


def curiosity_table(title: str, evaluation: dict) -> Table:
    """`metalab eval` of a curiosity run (its program's score over trials) or of a search (the
    best programs found, with the regressor's rank correlation)."""
    p = evaluation["protocol"]
    life = f"{p['envs']} envs x {p['steps_per_env']} steps"
    if evaluation["method"] == "curiosity":
        ((name, row),) = evaluation["rows"].items()
        table = Table(title=f"{title}: {p['env']}; {p['score']} per lifetime of {life}, "
                      "mean ± 95% t-interval over trials")  # fmt: skip
        for column in ("program", "score", "trials", "per trial"):
            table.add_column(column, justify="left" if column == "program" else "right")
        per = ", ".join(f"{x:.1f}" for x in row["scores"])
        table.add_row(name, f"{row['score']:.1f} ± {row['ci95']:.1f}", str(row["trials"]), per)
        return table
    q = evaluation["predictor"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    rho = (f"{fmt(q['spearman'])} on its picks, {fmt(q['warmup_loo_spearman'])} leave-one-out "
           "on the random warm-up")  # fmt: skip
    table = Table(title=f"{title}: {p['scored']} of {p['candidates']} candidates scored on "
                  f"{p['env']}, {p['trials_per_program']} lifetimes of {life} each; regressor "
                  f"rank correlation {rho}")  # fmt: skip
    for column in ("name", "program", "score"):
        table.add_column(column, justify="right" if column == "score" else "left")
    for name, row in evaluation["rows"].items():
        table.add_row(name, row["program"], f"{row['score']:.1f} ± {row['ci95']:.1f}")
    return table


def show_training(method: str, summary) -> None:
    """After `metalab train` of an episodic method: what the run did, its figures, how to
    resume."""
    best = ""
    if summary.best_val is not None:  # an accuracy, or another score (l2o: minus a loss)
        score = summary.best_val
        best = f", best val {100 * score:.2f}%" if 0 <= score <= 1 else f", best val {score:.4g}"
    print(f"{summary.run_dir}: {summary.episodes} episodes ({summary.stopped}){best}")
    show_training_figures(summary.run_dir)
    if summary.stopped == "interrupted":
        print(f"resume with: metalab train {method} --run-dir {summary.run_dir} --resume")


def show_rl_training(method: str, summary) -> None:
    """After `metalab train` of an RL method: what the run did, its curve, how to resume."""
    label = {"curiosity": "mean score", "curiosity-search": "best score"}.get(method, "last return")
    last = "" if summary.last_return is None else f", {label} {summary.last_return:.1f}"
    print(
        f"{summary.run_dir}: {summary.iterations} iterations, {summary.transitions} transitions "
        f"({summary.stopped}){last}; curve: {summary.run_dir / 'returns.png'}"
    )
    if summary.stopped == "interrupted":
        print(f"resume with: metalab train {method} --run-dir {summary.run_dir} --resume")


def show_rl_evaluation(run_dir: Path, evaluation: dict) -> None:
    """`metalab eval` of an RL run: the table, and where eval.json is."""
    tables = {"mql": mql_table, "curiosity": curiosity_table, "curiosity-search": curiosity_table}
    table = tables.get(evaluation["method"], rl_table)
    print_tables(table(str(run_dir), evaluation))
    print(f"saved: {Path(run_dir) / 'eval.json'}")


def bench_rows(result: dict) -> None:
    """`metalab bench`: one row per variant (median step, interquartile range, the first step,
    peak memory and the step's share of it (peak minus the memory held before the first step),
    ratios to the first variant and to the FLOP floor), then what did not run."""
    s = result["settings"]
    title = (
        f"{result['machine']}, {result['threads']} threads, torch {result['torch']}: MAML step, "
        f"{s['tasks']} tasks {s['ways']}-way {s['shots']}-shot {s['queries']} queries, "
        f"{s['inner_steps']} inner step(s), Conv4-{s['filters']}; {result['gflop_per_step']:.1f} "
        f"GFLOP per step, fp32 GEMM {result['gemm_gflops']:.0f} GFLOP/s, floor "
        f"{result['floor_ms']:.0f} ms; {s['repeats']} paired rounds, each variant in its own "
        f"process; memory: {result['memory']}"
    )
    rows = result["rows"]
    first = next(iter(rows), "")
    body = [
        [v, f"{r['median_ms']:,.0f}", f"{r['iqr_ms']:,.0f}", f"{r['first_ms'] / 1000:,.1f}",
         f"{r['peak_mib']:,.0f}", f"{r['peak_mib'] - r['base_mib']:,.0f}",
         f"{r['x_first']:.2f}", f"{r['x_floor']:.2f}"]
        for v, r in rows.items()
    ]  # fmt: skip
    header = ["variant", "median ms", "IQR ms", "first s", "peak MiB", "step MiB", f"x {first}",
              "x floor"]  # fmt: skip
    print_rows(title, header, body)
    for v, why in {**result["failed"], **result["skipped"]}.items():
        print(f"{v}: not measured ({why})")

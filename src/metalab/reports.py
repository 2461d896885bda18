"""Tables of results: printed with rich, saved as JSON beside the run."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from metalab.evaluate import Result


def results_table(title: str, results: list[Result]) -> Table:
    """One row per protocol: accuracy as mean ± 95% CI in percent."""
    table = Table(title=title)
    for column in ("dataset", "ways", "shots", "queries", "episodes", "accuracy (95% CI)"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in results:
        p = r.protocol
        dataset = p["dataset"] + (f" ({p['protocol']})" if "protocol" in p else "")
        if "labelled" in p:
            dataset += f" ({p['labelled']} labelled per class)"
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


def lake_table(title: str, lake: dict) -> Table:
    """Lake's one-shot runs: mean error over runs (± SEM, as Lake et al. report), in percent."""
    table = Table(title=title)
    for column in ("run set", "runs", "error", "± SEM", "at Lake's precision"):
        table.add_column(column, justify="left" if column == "run set" else "right")
    sem = f"{lake['sem']:.2f}" if lake.get("sem") is not None else "-"
    mean = lake["mean_error"]
    one_decimal = math.floor(mean * 10 + 0.5) / 10  # half up, as 38.75 -> 38.8 in Lake's table
    table.add_row(
        lake.get("source", "Lake runs"),
        str(lake["runs"]),
        f"{mean:.2f}%",
        sem,
        f"{one_decimal:.1f}%",
    )
    return table


def print_tables(*tables: Table) -> None:
    """Print to stdout; a pipe or file gets wide tables rather than rich's 80 columns."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    for table in tables:
        console.print(table)


def save_eval(path: Path, results: list[Result], lake: dict | None, meta: dict) -> None:
    """Merge results into ``eval.json`` (same protocol -> replaced), written atomically."""
    stored = json.loads(path.read_text()) if path.exists() else {"results": []}
    keep = {json.dumps(r.protocol, sort_keys=True) for r in results}
    merged = [r for r in stored["results"] if json.dumps(r["protocol"], sort_keys=True) not in keep]
    stored["results"] = merged + [r.to_dict() for r in results]
    if lake is not None:
        stored["lake"] = lake
    stored.update(meta)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(stored, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)

"""Per-sub-dataset few-shot accuracy, as ARML's Art-Multi tables (Yao et al. 2020, the shared
PAPERS.md §9): every sub-dataset scored on its own test episodes, then averaged per filter and
per group.

Choices:

* Each sub-dataset (:attr:`~metalab.data.fewshot.FewShotDataset.groups`) is its own test set:
  :data:`SUB_DATASET_EPISODES` = 600 fixed episodes by default (Finn's 600 test tasks; ARML's code
  runs 1000 per sub-dataset through ``--test_dataset``), seeded by the test seed and the
  sub-dataset alone (:meth:`~metalab.tasks.episodes.EpisodeSampler.fixed_indices` on the
  sub-dataset's classes), so a cell never changes when another sub-dataset is added or removed.
* Queries: what ``metalab eval`` asks (15 per class by default). ARML's code tests with K queries
  per class, which only widens the intervals.
* A sub-dataset named ``"row/column"`` (``"g2/blur"``) is the cell (group ``g2``, filter
  ``blur``) of a table; a name without ``/`` is a row of a one-column table.
* A mean over cells is the plain mean of their accuracies (equal episodes in each), as the
  paper's "average per filter"; its ± is that of a mean of independent estimates,
  ``sqrt(sum ci_i^2) / n`` (the cells' test episodes are drawn independently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.evaluate.fewshot import evaluate
from metalab.evaluate.protocol import Result

SUB_DATASET_EPISODES = 600
# Datasets made of sub-datasets: `metalab eval` scores them per sub-dataset, by default on the
# run's own (eval_ways, eval_shots) only.
SUB_DATASET_DATA = ("omni-art-multi",)
# The keys a per-sub-dataset Result adds to its protocol.
SUB_DATASET_KEYS = ("sub_dataset", "group", "filter")


def evaluate_sub_datasets(
    method: torch.nn.Module,
    dataset: FewShotDataset,
    ways: int,
    shots: int,
    queries: int,
    episodes: int = SUB_DATASET_EPISODES,
    seed: int = 0,
    device: torch.device | str = "cpu",
    labelled: int | None = None,
) -> list[Result]:
    """Accuracy of ``method`` on ``episodes`` fixed ``ways``-way ``shots``-shot episodes of each
    sub-dataset of ``dataset``, in sub-dataset order.

    Episodes come from ``type(method).sampler`` (a :class:`~metalab.methods.base.Method`) or a
    plain :class:`~metalab.tasks.episodes.EpisodeSampler`; each result's protocol names its
    ``sub_dataset`` and, for ``"row/column"`` names, its ``group`` (row) and ``filter`` (column).

    Raises:
        ConfigError: ``dataset`` has no sub-datasets.
    """
    from metalab.tasks.episodes import EpisodeSampler

    if dataset.groups is None or dataset.group_names is None:
        raise ConfigError(
            f"{dataset.name} has no sub-datasets: per-sub-dataset evaluation is for datasets "
            "such as omni-art-multi"
        )
    make = getattr(type(method), "sampler", None)
    results = []
    for g in np.unique(dataset.groups):
        name = dataset.group_names[g]
        part = dataset.subset(np.flatnonzero(dataset.groups == g), f"{dataset.name}/{name}")
        if make is not None:
            sampler = make(part, ways, shots, queries, seed=seed, labelled=labelled)
        else:
            sampler = EpisodeSampler(part, ways, shots, queries, seed=seed, labelled=labelled)
        result = evaluate(method, sampler, episodes, device)
        row, _, column = name.partition("/")
        result.protocol.update(sub_dataset=name, group=row, filter=column or "-")
        results.append(result)
    return results


def mean_of(results: list[Result]) -> tuple[float, float]:
    """The plain mean of ``results``' accuracies and its 95% half-width, the cells' intervals
    added in quadrature: ``sqrt(sum ci_i^2) / n``."""
    if not results:
        raise ValueError("no results to average")
    n = len(results)
    mean = sum(r.mean for r in results) / n
    return mean, math.sqrt(sum(r.ci95**2 for r in results)) / n


@dataclass
class SubDatasetTable:
    """The per-sub-dataset results of one protocol as a grid: a row per group, a column per filter.

    Attributes:
        protocol: what the cells share (dataset, ways, shots, queries, episodes, ...).
        rows: the groups, in first-seen order.
        columns: the filters, in first-seen order.
        cells: ``(row, column) -> Result``.
    """

    protocol: dict
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Result]

    def column_means(self) -> dict[str, tuple[float, float]]:
        """Mean ± 95% CI of each column (per filter: the paper's averages)."""
        return {c: mean_of([self.cells[r, c] for r in self.rows if (r, c) in self.cells])
                for c in self.columns}  # fmt: skip

    def row_means(self) -> dict[str, tuple[float, float]]:
        """Mean ± 95% CI of each row (per group)."""
        return {r: mean_of([self.cells[r, c] for c in self.columns if (r, c) in self.cells])
                for r in self.rows}  # fmt: skip

    def overall(self) -> tuple[float, float]:
        """Mean ± 95% CI over every sub-dataset."""
        return mean_of(list(self.cells.values()))

    def to_dict(self) -> dict:
        """For ``eval.json``: the cells and the means, each ``{"mean", "ci95"}``."""

        def pair(value: tuple[float, float]) -> dict:
            return {"mean": value[0], "ci95": value[1]}

        return {
            "protocol": self.protocol,
            "cells": {f"{r}/{c}": pair((x.mean, x.ci95)) for (r, c), x in self.cells.items()},
            "per_filter": {c: pair(v) for c, v in self.column_means().items()},
            "per_group": {r: pair(v) for r, v in self.row_means().items()},
            "overall": pair(self.overall()),
        }


def sub_dataset_tables(results: list[Result]) -> list[SubDatasetTable]:
    """The per-sub-dataset results among ``results`` (those whose protocol has ``sub_dataset``),
    one table per protocol they share (e.g. 5-way 1-shot and 5-way 5-shot)."""
    tables: dict[str, SubDatasetTable] = {}
    for r in results:
        if "sub_dataset" not in r.protocol:
            continue
        shared = {k: v for k, v in r.protocol.items() if k not in SUB_DATASET_KEYS}
        shared["dataset"] = shared["dataset"].rsplit("/" + r.protocol["sub_dataset"], 1)[0]
        key = repr(sorted(shared.items()))
        table = tables.setdefault(key, SubDatasetTable(shared, [], [], {}))
        row, column = r.protocol["group"], r.protocol["filter"]
        if row not in table.rows:
            table.rows.append(row)
        if column not in table.columns:
            table.columns.append(column)
        table.cells[row, column] = r
    return list(tables.values())

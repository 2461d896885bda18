"""Evaluating models of episodes presented as sequences (Santoro et al. 2016,
:mod:`metalab.methods.mann`): accuracy at the k-th presentation of a class, over fixed test
episodes of the held-out characters, beside the paper's Tables 1 and 2.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from metalab.evaluate.protocol import confidence_interval, eval_mode
from metalab.plots import plot_instances
from metalab.reports import instance_table, print_tables, save_eval
from metalab.tasks.sequences import SequenceSampler

if TYPE_CHECKING:
    from metalab.methods.mann import MANN

TEST_SEED = 2016  # fixed test episodes, independent of the training seed
TABLE_INSTANCES = (1, 2, 3, 4, 5, 10)  # the paper's columns

# Santoro et al. 2016, % correct at the k-th instance: Table 1 and Table 2.
PAPER = {
    ("onehot", 5): {
        "Human": (34.5, 57.3, 70.1, 71.8, 81.4, 92.4),
        "Feedforward": (24.4, 19.6, 21.1, 19.9, 22.8, 19.5),
        "LSTM": (24.4, 49.5, 55.3, 61.0, 63.6, 62.5),
        "MANN": (36.4, 82.8, 91.0, 92.6, 94.9, 98.1),
    },
    ("string", 5): {
        "kNN (raw pixels)": (4.0, 36.7, 41.9, 45.7, 48.1, 57.0),
        "kNN (deep features)": (4.0, 51.9, 61.0, 66.3, 69.3, 77.5),
        "Feedforward": (0.0, 0.2, 0.0, 0.2, 0.0, 0.0),
        "LSTM": (0.0, 9.0, 14.2, 16.9, 21.8, 25.5),
        "MANN (feedforward controller)": (0.0, 8.0, 16.2, 25.2, 30.9, 46.8),
        "MANN": (0.0, 69.5, 80.4, 87.9, 88.4, 93.1),
    },
    ("string", 15): {
        "kNN (raw pixels)": (0.5, 18.7, 23.3, 26.5, 29.1, 37.0),
        "kNN (deep features)": (0.4, 32.7, 41.2, 47.1, 50.6, 60.0),
        "Feedforward": (0.0, 0.1, 0.0, 0.0, 0.0, 0.0),
        "LSTM": (0.0, 2.2, 2.9, 4.3, 5.6, 12.7),
        "MANN (feedforward controller)": (0.1, 12.8, 22.3, 28.8, 32.2, 43.4),
        "MANN": (0.1, 62.6, 79.3, 86.6, 88.7, 95.3),
        "MANN (NTM write)": (0.0, 35.4, 61.2, 71.7, 77.7, 88.4),
    },
}
PAPER_NAME = {"mann": "MANN", "lstm": "LSTM", "ff": "Feedforward"}


@torch.no_grad()
def instance_accuracy(
    model: torch.nn.Module, sampler: SequenceSampler, episodes: int, device
) -> np.ndarray:
    """Accuracy at each instance ``(episodes, instances)``: the fraction of an episode's classes
    whose k-th presentation was labelled right, for fixed episodes ``0..episodes-1``.

    ``model(x, labels)`` gives the logits ``(B, T, blocks, digits)`` of every step; a step counts
    as right when all of its label's blocks are."""
    rows = []
    with eval_mode(model):
        for batch in sampler.fixed(episodes):
            batch = batch.to(device)
            correct = (model(batch.x, batch.labels).argmax(-1) == batch.labels).all(-1)
            which = F.one_hot(batch.instance - 1, sampler.instances).float()  # (B, T, K)
            per_instance = (correct.float().unsqueeze(-1) * which).sum(1) / which.sum(1)
            rows.append(per_instance.cpu().double().numpy())
    return np.concatenate(rows)


def report_instances(
    method: MANN, run_dir, *, episodes: int | None, device, data_root=None
) -> bool:
    """Per-instance accuracy on ``episodes`` (default 1000) fixed test episodes of the 423
    held-out characters, beside the paper's rows; writes ``eval.json`` and ``instances.png`` into
    ``run_dir`` and prints the table."""
    from metalab.methods.mann import sequence_sampler

    c, run_dir = method.config, Path(run_dir)
    count = episodes or 1000
    method.to(device)
    test = sequence_sampler(c, "test", data_root, TEST_SEED)
    accuracy = instance_accuracy(method, test, count, device)
    stats = [confidence_interval(accuracy[:, k]) for k in range(accuracy.shape[1])]
    result = {
        "model": c.model,
        "instance": {str(k + 1): {"mean": m, "ci95": ci} for k, (m, ci) in enumerate(stats)},
    }
    protocol = {**test.protocol(), "episodes": count}
    paper = {k: list(v) for k, v in PAPER.get((c.labels, c.classes), {}).items()}
    stored = {"protocol": protocol, "results": result, "paper": paper, "config": asdict(c)}
    save_eval(run_dir / "eval.json", [], None, {}, extra=stored)
    title = f"mann ({c.model}) — {c.labels} labels, {c.classes} classes: {run_dir.name}"
    label = f"{PAPER_NAME[c.model]} (ours)"
    plot_instances(run_dir / "instances.png", {label: stats}, paper, title)
    print_tables(instance_table(title, {label: stats}, paper, count))
    print(f"figure: {run_dir / 'instances.png'}")
    return True

"""Coverage of ambiguous classification tasks: PLATIPUS's CelebA protocol on OUR SUBSTITUTE,
Omniglot characters with synthetic attributes (:mod:`metalab.tasks.attributes`). No number here
is comparable to one of the paper.

Finn, Xu & Levine 2018 [U: the exact definitions are recalled, not checked] sample several
classifiers for each ambiguous task (support positives carry three attributes, negatives none;
the truth is two of the three) and count how many of the three possible pairs ("modes") the
samples cover; a point estimate such as MAML covers at most one. Ours, on fixed test tasks
(:data:`~metalab.tasks.attributes.TEST_ATTRIBUTES` on the test part of the Vinyals split, task i
depending only on (seed, i)):

- a method answers through ``sample_functions(support_x, support_y, query_x, samples,
  generator) -> (draws, queries, 2)`` logits (MAML: one draw; PLATIPUS: ``samples`` draws from
  its prior given the support set, each adapted);
- probes: for each pair p of the task's triple (ab, ac, bc), ``probes`` images carrying exactly
  that pair of the triple (plus distractors). A draw is *consistent* with pair p when it labels
  more than half of p's probes positive and fewer than half of each other pair's probes
  positive; so one draw is consistent with at most one pair;
- ``coverage``: the number of pairs (0..3) consistent with at least one draw;
- ``covers_hidden``: whether some draw is consistent with the task's hidden pair h (0 or 1);
- ``accuracy`` and ``nll``: of the draws' ensemble (the mean softmax) on a query set labelled by
  h (Q per class, built as the meta-training queries).

The probes and the query set go through the network in one call per task, so a method whose
batch norm uses the statistics of the batch at hand (MAML's) sees both (``transductive``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metalab.evaluate.protocol import (
    EVAL_SEED,
    Result,
    answer_protocol,
    confidence_interval,
    eval_mode,
)
from metalab.tasks.attributes import PAIRS, TEST_ATTRIBUTES, AttributeTasks

DATASET = "omniglot-attributes (substitute for CelebA)"
METRICS = {
    "coverage": "pairs covered (0-3)",
    "covers_hidden": "hidden pair covered",
    "accuracy": "accuracy (ensemble)",
    "nll": "NLL (ensemble)",
}


def consistent_pairs(probe_logits: torch.Tensor, probe_pair: torch.Tensor) -> torch.Tensor:
    """Bool ``(draws, 3)``: whether each draw is consistent with each pair of :data:`PAIRS`,
    given its logits on the probes ``(draws, probes, 2)`` and the pair each probe carries
    ``(probes,)``: more than half of that pair's probes labelled positive (class 1) and fewer
    than half of each other pair's."""
    positive = (probe_logits.argmax(-1) == 1).double()  # (S, P)
    share = torch.stack([positive[:, probe_pair == p].mean(1) for p in range(len(PAIRS))], 1)
    above, below = share > 0.5, share < 0.5
    others_below = torch.stack(
        [below[:, [o for o in range(len(PAIRS)) if o != p]].all(1) for p in range(len(PAIRS))], 1
    )
    return above & others_below


def task_scores(
    logits: torch.Tensor, query_y: torch.Tensor, probe_pair: torch.Tensor, hypothesis: int
) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one task: ``logits`` ``(draws, 2Q + probes, 2)`` on
    the query set (labels ``query_y``, ``(2Q,)``) followed by the probes."""
    q = query_y.shape[0]
    covered = consistent_pairs(logits[:, q:], probe_pair).any(0)  # (3,)
    probs = logits[:, :q].double().softmax(-1).mean(0)  # the ensemble, (2Q, 2)
    return {
        "coverage": float(covered.sum()),
        "covers_hidden": float(covered[hypothesis]),
        "accuracy": float((probs.argmax(-1) == query_y).double().mean()),
        "nll": float(-probs.gather(1, query_y[:, None]).log().mean()),
    }


@torch.no_grad()
def evaluate_coverage(
    method,
    images: torch.Tensor,
    attributes=TEST_ATTRIBUTES,
    shots: int = 5,
    queries: int = 10,
    probes: int = 10,
    tasks: int = 600,
    samples: int = 10,
    seed: int = EVAL_SEED,
    distractor: float = 0.3,
    device: torch.device | str = "cpu",
    chunk: int = 50,
) -> list[Result]:
    """One :class:`Result` per metric of :data:`METRICS` (mean ± 95% CI over ``tasks`` fixed
    tasks) for ``method``'s ``samples`` draws per task (MAML draws one whatever ``samples``).

    Args:
        images: the test image pool ``(N, 1, 28, 28)`` (the Vinyals test part).
        attributes: the meta-test attributes.
        shots, queries: K support and Q query images per class.
        probes: images per pair of the triple for the coverage test.
        seed: the fixed tasks' seed; the draws' noise comes from one generator seeded with it,
            used task after task.
        chunk: tasks rendered at once (memory only; the results do not depend on it).
    """
    family = AttributeTasks(images, attributes, shots, queries, seed, distractor)
    generator = torch.Generator(device=device).manual_seed(seed)
    scores: dict[str, list[float]] = {name: [] for name in METRICS}
    draws = 0
    with eval_mode(method):
        for start in range(0, tasks, chunk):
            batch, info = family.fixed_set(min(chunk, tasks - start), probes, start)
            batch = batch.to(device)
            probe_x, probe_pair = info["probe_x"].to(device), info["probe_pair"].to(device)
            for t in range(batch.tasks):
                query_x = torch.cat([batch.query_x[t], probe_x[t]])
                logits = method.sample_functions(
                    batch.support_x[t], batch.support_y[t], query_x, samples, generator
                )
                draws = logits.shape[0]
                found = task_scores(
                    logits, batch.query_y[t], probe_pair, int(info["hypothesis"][t])
                )
                for name, value in found.items():
                    scores[name].append(value)
    protocol = {
        "dataset": DATASET,
        "paper_number": None,  # a substitute: nothing to compare with in the paper
        "ways": 2,
        **family.protocol(),  # attributes, shots, queries, distractor, seed
        "probes": probes,
        "draws": draws,
        "tasks": tasks,
        **answer_protocol(method),
    }
    return [
        Result(*confidence_interval(np.array(values)), {**protocol, "metric": name})
        for name, values in scores.items()
    ]


def report_coverage(method, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
    """`metalab eval RUN_DIR` for a run meta-trained on attribute tasks: :func:`evaluate_coverage`
    on ``episodes`` (default 600) fixed test tasks with the run's ``eval_shots``,
    ``eval_queries`` and ``eval_samples`` (1 without), a table, and the results merged into
    ``run_dir/eval.json``."""
    from metalab.data.datasets import load_dataset
    from metalab.reports import coverage_table, print_tables, save_eval

    c, run_dir = method.config, Path(run_dir)
    images = load_dataset("omniglot", c.split, "test", c.image_size, data_root).images
    method.to(device)
    results = evaluate_coverage(
        method,
        images,
        shots=c.eval_shots,
        queries=c.eval_queries,
        tasks=600 if episodes is None else episodes,
        samples=getattr(c, "eval_samples", 1),
        device=device,
    )
    print_tables(coverage_table(f"{method.name} — {run_dir.name}", [(method.name, results)]))
    save_eval(run_dir / "eval.json", results, None, {"method": method.name})
    return True

"""What every evaluation protocol shares: the fixed test seed, a result that carries its protocol,
the 95% interval, the method's own protocol entries, and eval mode for the duration of a protocol."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from metalab.errors import ConfigError
from metalab.tasks.episodes import EVAL_SEED

__all__ = [
    "EVAL_SEED",
    "Result",
    "answer_protocol",
    "answers",
    "confidence_interval",
    "decide",
    "eval_mode",
    "one_to_one",
    "require_answers",
]

M = TypeVar("M", bound=nn.Module)


@dataclass
class Result:
    """Mean accuracy with its 95% confidence interval, both in [0, 1], and the protocol; or, when
    ``protocol["metric"] == "mse"``, a mean squared error."""

    mean: float
    ci95: float
    protocol: dict

    def __str__(self) -> str:
        if "metric" in self.protocol:  # a regression error, likelihood or spread: as it is
            return f"{self.mean:.3f} ± {self.ci95:.3f}"
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}%"

    def to_dict(self) -> dict:
        return asdict(self)


def confidence_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the 95% half-width 1.96·sd/√n (sd with n-1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    sd = values.std(ddof=1) if n > 1 else 0.0
    return float(values.mean()), float(1.96 * sd / math.sqrt(n))


def seeds_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the 95% half-width over a few seeds' results: Student's t (t(2) = 4.30 for three
    seeds) times sd/√n; 0 for a single value."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return float(values.mean()), 0.0
    t = stats.t.ppf(0.975, n - 1)
    return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(n))


@contextlib.contextmanager
def eval_mode(module: M) -> Iterator[M]:
    """``module`` in eval mode inside the block, back in the mode it had afterwards (also on error)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def answer_protocol(method: nn.Module) -> dict:
    """How ``method`` answers, for a result's protocol: its ``protocol()`` (e.g. MAML's test-time
    inner steps) plus ``transductive: True`` when its answers use the batch statistics of the
    queries (batch norm on the batch at hand); ``{}`` for a plain module."""
    extra = method.protocol() if hasattr(method, "protocol") else {}
    if getattr(method, "transductive", False):
        extra = {**extra, "transductive": True}
    return extra


# How a Lake-format measure turns scores into answers: each query on its own (arg-max), or all of
# a run's queries at once, one per character (transductive, :func:`one_to_one`).
DECISIONS = ("argmax", "one-to-one")


def decide(scores: torch.Tensor, decision: str = "argmax") -> torch.Tensor:
    """The queries' classes from ``(queries, ways)`` scores under ``decision`` (:data:`DECISIONS`)."""
    if decision == "argmax":
        return scores.argmax(-1)
    if decision == "one-to-one":
        return one_to_one(scores)
    raise ConfigError(f"decision {decision!r}: use one of {', '.join(DECISIONS)}")


def one_to_one(scores: torch.Tensor, per_class: int = 1) -> torch.Tensor:
    """Each query's class when the queries are known to hold exactly ``per_class`` of every class
    (Lake's runs: each of the 20 test drawings is a different character): the assignment with
    the largest summed score, an exact solution of the linear assignment problem (scipy's
    ``linear_sum_assignment``).

    This is *transductive*: a query's answer depends on the other queries, and it uses the test
    set's layout, which a person answering one drawing at a time does not. ``scores`` are
    ``(queries, ways)`` logits or log-probabilities (a constant per query does not change the
    assignment); ``queries`` must be ``ways * per_class``.
    """
    from scipy.optimize import linear_sum_assignment

    queries, ways = scores.shape
    if queries != ways * per_class:
        raise ValueError(f"{queries} queries are not {per_class} for each of {ways} classes")
    cost = -scores.detach().double().cpu().numpy().repeat(per_class, axis=1)  # class c: columns
    rows, columns = linear_sum_assignment(cost)  # c * per_class ... (c + 1) * per_class - 1
    classes = np.empty(queries, dtype=np.int64)
    classes[rows] = columns // per_class
    return torch.from_numpy(classes).to(scores.device)


# What a method needs to answer each protocol beyond few-shot episodes, for the one-line error.
_NEEDS = {
    "lake-runs": "does not answer Lake's one-shot runs: they are for few-shot image classifiers",
    "within-alphabet": (
        "does not answer within-alphabet one-shot trials: they are for few-shot image classifiers"
    ),
    "verification": "has no pair score: verification is for siamese networks",
    "regression": "does not answer regression tasks: that protocol is for regression methods",
}


def answers(method: nn.Module, protocol: str) -> bool:
    """Whether ``method`` answers ``protocol`` (``"lake-runs"``, ``"within-alphabet"``,
    ``"verification"``, ``"regression"``): its ``answers`` set (a
    :class:`~metalab.methods.base.Method`), or, for another module, whether it has the call the
    protocol uses (``pair_probability``, ``regression_curve``, else ``predict``)."""
    declared = getattr(method, "answers", None)
    if declared is not None:
        return protocol in declared
    needed = {"verification": "pair_probability", "regression": "regression_curve"}
    return hasattr(method, needed.get(protocol, "predict"))


def require_answers(method: nn.Module, protocol: str) -> None:
    """A :class:`ConfigError` unless ``method`` :func:`answers` ``protocol``."""
    if not answers(method, protocol):
        name = getattr(method, "name", type(method).__name__)
        raise ConfigError(f"{name} {_NEEDS[protocol]}")

"""Evaluation protocols: the only place that runs one. A method only says how it answers
(``predict``, ``predict_episode``, ``pair_probability``, ``regression_curve``, ...).

Every result carries its protocol (dataset, split, ways, shots, queries, episodes, seed), so a
number never travels without what it means.

* :mod:`~metalab.evaluate.protocol`: the fixed test seed, :class:`Result`, the 95% interval,
  :func:`eval_mode`, which protocols a method answers, and how scores become answers
  (:func:`decide`: each query's arg-max, or the transductive :func:`one_to_one` assignment).
* :mod:`~metalab.evaluate.fewshot`: fixed seeded few-shot episodes, mean accuracy ± 1.96·sd/√n.
* :mod:`~metalab.evaluate.lake`: Lake's one-shot runs (error %, SEM over runs and over alphabets).
* :mod:`~metalab.evaluate.oneshot`: Koch's verification and within-alphabet one-shot trials.
* :mod:`~metalab.evaluate.regression`: regression families, MSE after 1/5/10 steps; ARML's 2-D
  protocol (per function family).
* :mod:`~metalab.evaluate.multi`: datasets made of sub-datasets (Omni-Art-Multi): accuracy per
  sub-dataset, per filter and per group.
* :mod:`~metalab.evaluate.memorization`: memorisation tests on non-mutually-exclusive tasks (the
  NME sinusoid notebooks' tests, rotated-glyph regression).
* :mod:`~metalab.evaluate.zero_shot`: every test image among all classes given by attributes.
* :mod:`~metalab.evaluate.optimization`: learned optimizers' loss curves against tuned baselines.
* :mod:`~metalab.evaluate.sequences`: accuracy per instance of episodes presented as sequences.
* :mod:`~metalab.evaluate.run`: all of the above for a run directory (`metalab eval`).
"""

from __future__ import annotations

from metalab.evaluate.fewshot import STANDARD_TABLE, evaluate, predict_queries
from metalab.evaluate.lake import evaluate_lake_runs, lake_error, require_unseen
from metalab.evaluate.oneshot import (
    evaluate_verification,
    evaluate_within_alphabet,
    within_alphabet_by_alphabet,
)
from metalab.evaluate.protocol import (
    EVAL_SEED,
    Result,
    answer_protocol,
    answers,
    confidence_interval,
    decide,
    eval_mode,
    one_to_one,
    require_answers,
)
from metalab.evaluate.regression import (
    LR_GRID,
    REGRESSION_SHOTS,
    REGRESSION_STEPS,
    RegressionComparison,
    compare_regression,
    evaluate_regression,
    tune_inner_lr,
)
from metalab.evaluate.run import RunEvaluation, evaluate_mhd, evaluate_run

__all__ = [
    "EVAL_SEED",
    "LR_GRID",
    "REGRESSION_SHOTS",
    "REGRESSION_STEPS",
    "STANDARD_TABLE",
    "RegressionComparison",
    "Result",
    "RunEvaluation",
    "answer_protocol",
    "answers",
    "compare_regression",
    "confidence_interval",
    "decide",
    "eval_mode",
    "evaluate",
    "evaluate_lake_runs",
    "evaluate_mhd",
    "evaluate_regression",
    "evaluate_run",
    "evaluate_verification",
    "evaluate_within_alphabet",
    "within_alphabet_by_alphabet",
    "lake_error",
    "one_to_one",
    "predict_queries",
    "require_answers",
    "require_unseen",
    "tune_inner_lr",
]

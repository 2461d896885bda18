"""Lake's one-shot runs (Lake, Salakhutdinov & Tenenbaum, Science 2015): error in % per run, its
mean, the SEM over runs and, as Lake reports it, the SEM over alphabets.

A run is 20-way within-alphabet one-shot classification on Omniglot's evaluation alphabets
(:mod:`metalab.tasks.lake` reads them), so a model that may have trained on those alphabets is
refused here, not only by the command line (:func:`require_unseen`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from metalab.errors import ConfigError
from metalab.evaluate.protocol import decide, eval_mode, require_answers
from metalab.tasks.lake import LakeRun


def require_unseen(method: torch.nn.Module, what: str, source: object = None) -> None:
    """Refuse to score ``what`` on Omniglot's evaluation alphabets with a model whose training data
    could include them: anything but the Lake split's background alphabets (Vinyals' split
    mixes the evaluation alphabets into its train part). A module without a config (MHD) is
    training-free. ``source`` names the model in the message (default: the method's name)."""
    c = getattr(method, "config", None)
    if c is None or (c.data == "omniglot" and c.split == "lake" and c.train_part != "test"):
        return
    subject = source if source is not None else f"this {getattr(method, 'name', 'model')} model"
    if c.data == "omniglot":
        trained = f"the omniglot {c.split} split, which includes Lake's evaluation alphabets"
        if c.split == "lake":
            trained = "the Lake split's test part, Lake's evaluation alphabets"
    else:
        trained = f"the {c.data} {c.split} split, not Omniglot's background alphabets"
    raise ConfigError(
        f"{subject} was trained on {trained}: score {what} with a model trained with --split lake"
    )


@torch.no_grad()
def evaluate_lake_runs(
    method: torch.nn.Module,
    runs: Sequence[LakeRun],
    device: torch.device | str = "cpu",
    alphabets: Mapping[str, str] | None = None,
    decision: str = "argmax",
) -> dict:
    """Score a method on Lake's 20-way within-alphabet one-shot runs (error in %).

    Each run's 20 training images are the support set (one per class) and its 20 test images the
    queries; the prediction is the arg-max of ``method.predict``, or with ``decision="one-to-one"``
    the best assignment of the 20 test images to 20 different characters (transductive:
    :func:`~metalab.evaluate.protocol.one_to_one`; the score then says ``"decision"`` and
    ``"transductive"``).
    ``alphabets`` (run name -> alphabet, :func:`metalab.tasks.lake.run_alphabets`) adds the SEM
    over alphabets.

    Raises:
        ConfigError: the method does not answer one-shot image runs, or its training data could
            include the evaluation alphabets.
    """
    require_answers(method, "lake-runs")
    require_unseen(method, "Lake's runs")
    predictions = []
    with eval_mode(method):
        for run in runs:
            support = _ink_tensor(run.train, device)
            query = _ink_tensor(run.test, device)
            labels = torch.arange(len(run.train), device=device)
            scores = method.predict(support, labels, query)
            predictions.append(decide(scores, decision).cpu().numpy())
    score = lake_error(predictions, runs, alphabets)
    if decision != "argmax":
        score.update(decision=decision, transductive=True)
    return score


def _ink_tensor(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(images).to(device=device, dtype=torch.float32).div_(255.0)[:, None]


def lake_error(
    predictions: Sequence[np.ndarray],
    runs: Sequence[LakeRun],
    alphabets: Mapping[str, str] | None = None,
) -> dict:
    """Lake's score: the % of misclassified test items per run, their mean, and its standard errors.

    Args:
        predictions: per run, the predicted index into ``run.train`` of each test item.
        runs: the runs, in the same order.
        alphabets: the alphabet of each run by name (Lake's 20 runs: 10 alphabets x 2), or None.

    Returns:
        ``{"runs": n, "per_run": {name: error %}, "mean_error": %, "sem": % or None}``, ``sem``
        the standard deviation over runs / sqrt(n) (needs two runs). With ``alphabets`` also
        ``"run_alphabets"`` (the mapping), ``"per_alphabet"`` ``{alphabet: mean error % of its
        runs}``, ``"alphabets"`` (how many) and ``"sem_alphabets"``: the standard deviation of
        the per-alphabet errors / sqrt(alphabets), Lake et al.'s ± (needs two alphabets).
    """
    if not runs or len(predictions) != len(runs):
        raise ValueError(f"{len(predictions)} predictions for {len(runs)} runs")
    errors = []
    for predicted, run in zip(predictions, runs):
        predicted = np.asarray(predicted)
        if predicted.shape != run.answers.shape:
            raise ValueError(
                f"{run.name}: predictions have shape {predicted.shape}, answers {run.answers.shape}"
            )
        errors.append(100.0 * int(np.count_nonzero(predicted != run.answers)) / len(run.answers))
    per_run = {run.name: error for run, error in zip(runs, errors)}
    score = {"runs": len(errors), "per_run": per_run, "mean_error": float(np.mean(errors))}
    score["sem"] = _sem(errors)
    if alphabets is not None:
        score.update(_over_alphabets(per_run, alphabets))
    return score


def _sem(values: Sequence[float]) -> float | None:
    """Standard deviation (n-1) / sqrt(n); None for a single value."""
    n = len(values)
    return float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else None


def _over_alphabets(per_run: dict[str, float], alphabets: Mapping[str, str]) -> dict:
    missing = sorted(set(per_run) - set(alphabets))
    if missing:
        raise ValueError(f"no alphabet given for run {missing[0]}")
    by_alphabet: dict[str, list[float]] = {}
    for name, error in per_run.items():
        by_alphabet.setdefault(alphabets[name], []).append(error)
    per_alphabet = {a: float(np.mean(e)) for a, e in by_alphabet.items()}
    return {
        "run_alphabets": {name: alphabets[name] for name in per_run},
        "per_alphabet": per_alphabet,
        "alphabets": len(per_alphabet),
        "sem_alphabets": _sem(list(per_alphabet.values())),
    }

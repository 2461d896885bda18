"""Koch et al. 2015's protocols on Omniglot's evaluation alphabets: verification (same or different
character?) and 20-way within-alphabet one-shot trials. The pairs and trials are built by
:mod:`metalab.tasks.oneshot`; a model whose training data could include the evaluation alphabets
is refused (:func:`metalab.evaluate.lake.require_unseen`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.evaluate.fewshot import predict_queries
from metalab.evaluate.lake import require_unseen
from metalab.evaluate.protocol import (
    EVAL_SEED,
    Result,
    answer_protocol,
    confidence_interval,
    decide,
    eval_mode,
    require_answers,
)
from metalab.tasks.episodes import Episode
from metalab.tasks.oneshot import (
    ALL_DRAWERS,
    HELD_OUT_DRAWERS,
    trial_alphabets,
    verification_pairs,
    within_alphabet_trials,
)


@torch.no_grad()
def evaluate_verification(
    siamese: torch.nn.Module,
    dataset: FewShotDataset,
    pairs: int = 10_000,
    drawers: Sequence[int] = HELD_OUT_DRAWERS,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
) -> Result:
    """Verification accuracy (``p(same) > 0.5`` right) ± 95% CI over
    :func:`~metalab.tasks.oneshot.verification_pairs`.

    Args:
        siamese: a method with ``pair_probability(x1, x2) -> (B,)``.
        dataset: held-out classes, e.g. ``omniglot("lake", "test")`` at the net's image size.
        pairs: how many (Koch tested on 10,000).
        drawers: drawing indices the pairs come from (default: drawers 17-20).
        seed: fixes the pairs.
        device: where to compute.
        batch_size: pairs per forward pass.

    Raises:
        ConfigError: the method has no pair score, or its training data could include the
            evaluation alphabets.
    """
    require_answers(siamese, "verification")
    require_unseen(siamese, "verification")
    first, second, same = verification_pairs(dataset, pairs, drawers, seed)
    correct = np.empty(pairs)
    with eval_mode(siamese):
        for start in range(0, pairs, batch_size):
            part = slice(start, start + batch_size)
            x1 = dataset.gather(first[part]).to(device)
            x2 = dataset.gather(second[part]).to(device)
            said_same = (siamese.pair_probability(x1, x2) > 0.5).cpu().numpy()
            correct[part] = said_same == same[part]
    mean, ci = confidence_interval(correct)
    protocol = {
        "dataset": dataset.name,
        "protocol": "verification",
        "pairs": pairs,
        "drawers": [int(d) + 1 for d in sorted(set(drawers))],  # as in the file names
        "seed": seed,
    }
    return Result(mean, ci, {**protocol, **answer_protocol(siamese)})


@torch.no_grad()
def within_alphabet_by_alphabet(
    method: torch.nn.Module,
    dataset: FewShotDataset,
    trials: int = 1000,
    ways: int = 20,
    drawers: Sequence[int] = ALL_DRAWERS,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
    decision: str = "argmax",
) -> tuple[Result, dict[str, Result]]:
    """Accuracy ± 95% CI over :func:`~metalab.tasks.oneshot.within_alphabet_trials`, through
    ``method.predict_episode``: overall, and per alphabet (its trials' mean ± 95% CI, keyed by
    alphabet; the trial-weighted mean of the per-alphabet means is the overall mean).

    A trial classifies all ``ways`` queries (Lake's runs: 20 test items each; Koch: "each of the
    characters produced by the first drawer ... individually compared against all twenty
    characters from the second drawer"), and a trial's accuracy is the fraction right, so the CI
    is over independent trials. Koch's 400 trials count test images (10 alphabets x 2 repeats x
    20); ours count runs of 20: ``trials=20`` is one run per evaluation alphabet, 400 test images.

    Args:
        method: any few-shot image method; ``dataset`` at its image size.
        dataset: e.g. ``omniglot("lake", "test")`` (20 evaluation alphabets, all with >= 20
            characters, so 1000 trials are 50 per alphabet).
        trials: how many runs.
        ways: characters per trial (20).
        drawers: drawing indices to pick the two drawers from (default: all 20; the evaluation
            alphabets are unseen in training, so no drawer needs holding out).
        seed: fixes the trials.
        device: where to compute.
        decision: ``"argmax"`` (each query on its own) or ``"one-to-one"``: a trial's queries
            assigned to different characters at once (transductive,
            :func:`~metalab.evaluate.protocol.one_to_one`; the protocol records it).

    Raises:
        ConfigError: the method does not answer ``ways``-way one-shot image episodes, or its
            training data could include the evaluation alphabets.
    """
    require_answers(method, "within-alphabet")
    if hasattr(method, "supports_ways") and not method.supports_ways(ways):
        raise ConfigError(f"{method.name} does not answer {ways}-way episodes")
    require_unseen(method, "within-alphabet trials")
    support, query = within_alphabet_trials(dataset, trials, ways, drawers, seed)
    labels = torch.arange(ways, device=device)
    accuracies = np.empty(trials)
    with eval_mode(method):
        for i in range(trials):
            episode = Episode(
                dataset.gather(support[i]).to(device),
                labels,
                dataset.gather(query[i]).to(device),
                labels,
            )
            answers = decide(predict_queries(method, episode), decision)
            accuracies[i] = (answers == labels).float().mean().item()
    mean, ci = confidence_interval(accuracies)
    protocol = {
        "dataset": dataset.name,
        "protocol": "within-alphabet",
        "ways": ways,
        "shots": 1,
        "queries": 1,  # per class, as in the episode tables: 20 per trial
        "episodes": trials,
        "seed": seed,
    }
    if decision != "argmax":
        protocol.update(decision=decision, transductive=True)
    overall = Result(mean, ci, {**protocol, **answer_protocol(method)})
    names = np.array(trial_alphabets(dataset, trials, ways))
    per_alphabet = {}
    for name in sorted(set(names)):
        mine = accuracies[names == name]
        per_alphabet[name] = Result(
            *confidence_interval(mine),
            {**overall.protocol, "alphabet": name, "episodes": len(mine)},
        )
    return overall, per_alphabet


def evaluate_within_alphabet(method: torch.nn.Module, dataset: FewShotDataset, **kwargs) -> Result:
    """The overall result of :func:`within_alphabet_by_alphabet` (same arguments)."""
    return within_alphabet_by_alphabet(method, dataset, **kwargs)[0]

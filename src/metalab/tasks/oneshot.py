"""Koch et al. 2015's evaluation protocols on Omniglot: verification and within-alphabet one-shot.

* Verification (Koch Table 1): is a pair of drawings the same character? Balanced
  same/different pairs from held-out alphabets and drawers, accuracy of ``p(same) > 0.5``. Needs a
  pair score (``method.pair_probability``), so it is for Siamese networks.
* Within-alphabet 20-way one-shot (Lake et al. 2015; Koch's one-shot task): a trial takes one alphabet,
  20 of its characters and two drawers; one drawer's 20 drawings are the support set, the other's
  20 drawings of the same characters the queries. Any method answers (``predict_episode``).

A drawer is a drawing index: Omniglot stores each character's drawings in drawer order (file
``NNNN_DD.png``, drawer DD = index + 1), so ``dataset.class_index[c, d]`` is drawer d+1's drawing.
Both protocols are fixed by their seed and use the Lake split's ``test`` part (the 20 evaluation
alphabets, never seen in training) in place of Koch's 10 evaluation alphabets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metalab.errors import ConfigError
from metalab.evaluate import EVAL_SEED, Result, confidence_interval, predict_queries
from metalab.tasks.episodes import Episode, FewShotDataset

HELD_OUT_DRAWERS = (16, 17, 18, 19)  # drawers 17-20: Koch tested on the last four drawers
ALL_DRAWERS = tuple(range(20))


def _check_drawers(dataset: FewShotDataset, drawers: Sequence[int]) -> np.ndarray:
    drawers = np.asarray(sorted(set(drawers)), dtype=np.int64)
    if len(drawers) < 2:
        raise ConfigError(f"drawers={list(drawers)}: a pair needs two drawers, give 2 or more")
    if drawers.min() < 0 or drawers.max() >= dataset.counts.min():
        raise ConfigError(
            f"drawers={list(drawers)} for {dataset.name}, whose classes have as few as "
            f"{int(dataset.counts.min())} drawings: use drawer indices 0..{int(dataset.counts.min()) - 1}"
        )
    return drawers


def alphabet(class_name: str) -> str:
    """``"Greek/character03/rot090"`` -> ``"Greek"``."""
    return class_name.split("/", 1)[0]


# -- verification ---------------------------------------------------------------------------------


def verification_pairs(
    dataset: FewShotDataset,
    pairs: int = 10_000,
    drawers: Sequence[int] = HELD_OUT_DRAWERS,
    seed: int = EVAL_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced same/different pairs of drawings, fixed by ``seed``.

    Even-numbered pairs are the same character, odd-numbered ones two different characters
    (uniform over all pairs of distinct classes), so every prefix is balanced. Both drawings of
    a pair always come from two different drawers of ``drawers``: only the character tells same
    from different.

    Returns:
        ``first``, ``second``: int64 ``(pairs,)`` example indices into ``dataset``; ``same``: bool
        ``(pairs,)``.
    """
    if pairs < 2 or pairs % 2:
        raise ConfigError(f"pairs={pairs}: use an even number, half same and half different")
    drawers = _check_drawers(dataset, drawers)
    classes = dataset.num_classes
    if classes < 2:
        raise ConfigError(f"{dataset.name} has {classes} class: different pairs need two")
    rng = np.random.Generator(np.random.PCG64(seed))
    same = np.arange(pairs) % 2 == 0
    class_a = rng.integers(classes, size=pairs)
    class_b = np.where(same, class_a, (class_a + rng.integers(1, classes, size=pairs)) % classes)
    drawer_a = rng.integers(len(drawers), size=pairs)
    drawer_b = (drawer_a + rng.integers(1, len(drawers), size=pairs)) % len(drawers)
    first = dataset.class_index[class_a, drawers[drawer_a]]
    second = dataset.class_index[class_b, drawers[drawer_b]]
    return first, second, same


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
    """Verification accuracy (``p(same) > 0.5`` right) ± 95% CI over :func:`verification_pairs`.

    Args:
        siamese: a method with ``pair_probability(x1, x2) -> (B,)``.
        dataset: held-out classes, e.g. ``omniglot("lake", "test")`` at the net's image size.
        pairs: how many (Koch tested on 10,000).
        drawers: drawing indices the pairs come from (default: drawers 17-20).
        seed: fixes the pairs.
        device: where to compute.
        batch_size: pairs per forward pass.
    """
    if not hasattr(siamese, "pair_probability"):
        raise ConfigError(
            f"{getattr(siamese, 'name', type(siamese).__name__)} has no pair score: verification "
            "is for siamese networks (within-alphabet one-shot works for any method)"
        )
    first, second, same = verification_pairs(dataset, pairs, drawers, seed)
    was_training = siamese.training
    siamese.eval()
    correct = np.empty(pairs)
    try:
        for start in range(0, pairs, batch_size):
            part = slice(start, start + batch_size)
            x1 = dataset.gather(first[part]).to(device)
            x2 = dataset.gather(second[part]).to(device)
            said_same = (siamese.pair_probability(x1, x2) > 0.5).cpu().numpy()
            correct[part] = said_same == same[part]
    finally:
        siamese.train(was_training)
    mean, ci = confidence_interval(correct)
    extra = siamese.protocol() if hasattr(siamese, "protocol") else {}
    protocol = {
        "dataset": dataset.name,
        "protocol": "verification",
        "pairs": pairs,
        "drawers": [int(d) + 1 for d in sorted(set(drawers))],  # as in the file names
        "seed": seed,
    }
    return Result(mean, ci, {**protocol, **extra})


# -- within-alphabet one-shot ---------------------------------------------------------------------


def within_alphabet_trials(
    dataset: FewShotDataset,
    trials: int = 400,
    ways: int = 20,
    drawers: Sequence[int] = ALL_DRAWERS,
    seed: int = EVAL_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Lake's 20-way within-alphabet one-shot trials, fixed by ``seed``.

    Trial ``i`` uses the ``i % A``-th (sorted) of the ``A`` alphabets with at least ``ways``
    characters, so trials spread evenly over alphabets; its characters and two drawers are drawn
    with a generator seeded by ``(seed, i)``, so trial i depends only on (seed, i).

    Returns:
        ``support`` and ``query``: int64 ``(trials, ways)`` example indices; row i's support
        images are one drawer's drawings of ``ways`` characters of one alphabet, its queries
        another drawer's drawings of the same characters in the same order (query j is class j).
    """
    drawers = _check_drawers(dataset, drawers)
    by_alphabet: dict[str, list[int]] = {}
    for c, name in enumerate(dataset.class_names):
        by_alphabet.setdefault(alphabet(name), []).append(c)
    eligible = [a for a in sorted(by_alphabet) if len(by_alphabet[a]) >= ways]
    if not eligible:
        raise ConfigError(
            f"no alphabet of {dataset.name} has {ways} characters: use fewer ways "
            f"(the largest has {max(map(len, by_alphabet.values()))})"
        )
    support = np.empty((trials, ways), dtype=np.int64)
    query = np.empty((trials, ways), dtype=np.int64)
    for i in range(trials):
        rng = np.random.Generator(np.random.PCG64([seed, i]))
        classes = rng.choice(by_alphabet[eligible[i % len(eligible)]], ways, replace=False)
        support_drawer, query_drawer = rng.choice(drawers, 2, replace=False)
        support[i] = dataset.class_index[classes, support_drawer]
        query[i] = dataset.class_index[classes, query_drawer]
    return support, query


@torch.no_grad()
def evaluate_within_alphabet(
    method: torch.nn.Module,
    dataset: FewShotDataset,
    trials: int = 400,
    ways: int = 20,
    drawers: Sequence[int] = ALL_DRAWERS,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> Result:
    """Accuracy ± 95% CI over :func:`within_alphabet_trials`, through ``method.predict_episode``.

    A trial classifies all ``ways`` queries (Lake's runs: 20 test items each; Koch: "each of the
    characters produced by the first drawer ... individually compared against all twenty
    characters from the second drawer"), and a trial's accuracy is the fraction right, so the CI
    is over independent trials. Koch's 400 trials count test images (10 alphabets x 2 repeats x
    20); ours count runs of 20: ``trials=20`` is one run per evaluation alphabet, 400 test images.

    Args:
        method: any method with ``predict_episode``; ``dataset`` at its image size.
        dataset: e.g. ``omniglot("lake", "test")`` (20 evaluation alphabets, all with >= 20
            characters, so 400 trials are 20 per alphabet).
        trials: how many runs.
        ways: characters per trial (20).
        drawers: drawing indices to pick the two drawers from (default: all 20; the evaluation
            alphabets are unseen in training, so no drawer needs holding out).
        seed: fixes the trials.
        device: where to compute.
    """
    if hasattr(method, "supports_ways") and not method.supports_ways(ways):
        raise ConfigError(f"{method.name} does not answer {ways}-way episodes")
    support, query = within_alphabet_trials(dataset, trials, ways, drawers, seed)
    labels = torch.arange(ways, device=device)
    was_training = method.training
    method.eval()
    accuracies = np.empty(trials)
    try:
        for i in range(trials):
            episode = Episode(
                dataset.gather(support[i]).to(device),
                labels,
                dataset.gather(query[i]).to(device),
                labels,
            )
            logits = predict_queries(method, episode)
            accuracies[i] = (logits.argmax(-1) == labels).float().mean().item()
    finally:
        method.train(was_training)
    mean, ci = confidence_interval(accuracies)
    extra = method.protocol() if hasattr(method, "protocol") else {}
    protocol = {
        "dataset": dataset.name,
        "protocol": "within-alphabet",
        "ways": ways,
        "shots": 1,
        "queries": 1,  # per class, as in the episode tables: 20 per trial
        "episodes": trials,
        "seed": seed,
    }
    return Result(mean, ci, {**protocol, **extra})

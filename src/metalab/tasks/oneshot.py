"""Koch et al. 2015's evaluation tasks on Omniglot: verification pairs and within-alphabet trials.

* Verification (Koch Table 1): is a pair of drawings the same character? Balanced
  same/different pairs from held-out alphabets and drawers.
* Within-alphabet 20-way one-shot (Lake et al. 2015; Koch's one-shot task): a trial takes one alphabet,
  20 of its characters and two drawers; one drawer's 20 drawings are the support set, the other's
  20 drawings of the same characters the queries.

This module builds the pairs and trials; :mod:`metalab.evaluate.oneshot` scores methods on them.

A drawer is a drawing index: Omniglot stores each character's drawings in drawer order (file
``NNNN_DD.png``, drawer DD = index + 1), so ``dataset.class_index[c, d]`` is drawer d+1's drawing.
Both protocols are fixed by their seed and use the Lake split's ``test`` part (the 20 evaluation
alphabets, never seen in training) in place of Koch's 10 evaluation alphabets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.tasks.episodes import EVAL_SEED

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


# -- within-alphabet one-shot ---------------------------------------------------------------------


def _characters_by_alphabet(dataset: FewShotDataset) -> dict[str, list[int]]:
    by_alphabet: dict[str, list[int]] = {}
    for c, name in enumerate(dataset.class_names):
        by_alphabet.setdefault(alphabet(name), []).append(c)
    return by_alphabet


def trial_alphabets(dataset: FewShotDataset, trials: int, ways: int = 20) -> list[str]:
    """The alphabet of each of :func:`within_alphabet_trials`' ``trials``: trial ``i`` takes the
    ``i % A``-th (sorted) of the ``A`` alphabets with at least ``ways`` characters."""
    by_alphabet = _characters_by_alphabet(dataset)
    eligible = [a for a in sorted(by_alphabet) if len(by_alphabet[a]) >= ways]
    if not eligible:
        raise ConfigError(
            f"no alphabet of {dataset.name} has {ways} characters: use fewer ways "
            f"(the largest has {max(map(len, by_alphabet.values()))})"
        )
    return [eligible[i % len(eligible)] for i in range(trials)]


def within_alphabet_trials(
    dataset: FewShotDataset,
    trials: int = 1000,
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
    by_alphabet = _characters_by_alphabet(dataset)
    names = trial_alphabets(dataset, trials, ways)
    support = np.empty((trials, ways), dtype=np.int64)
    query = np.empty((trials, ways), dtype=np.int64)
    for i in range(trials):
        rng = np.random.Generator(np.random.PCG64([seed, i]))
        classes = rng.choice(by_alphabet[names[i]], ways, replace=False)
        support_drawer, query_drawer = rng.choice(drawers, 2, replace=False)
        support[i] = dataset.class_index[classes, support_drawer]
        query[i] = dataset.class_index[classes, query_drawer]
    return support, query


@dataclass
class AlphabetTrials:
    """Validation by within-alphabet trials (``val_protocol="within-alphabet"``): the trainer's
    stand-in for a sampler, holding the dataset the trials are drawn from."""

    dataset: FewShotDataset

    @classmethod
    def unrotated(cls, dataset: FewShotDataset) -> AlphabetTrials:
        """Trials on the upright characters of ``dataset`` (a training-style part, whose other
        rotations are classes of their own), as Lake's test shows them."""
        upright = [
            c
            for c, n in enumerate(dataset.class_names)
            if n.count("/") < 2 or n.endswith("/rot000")
        ]
        return cls(dataset.subset(np.array(upright), f"{dataset.name}/upright"))

"""N-way K-shot episodes: the unit of meta-learning.

An :class:`EpisodeSampler` draws ``ways`` classes, then ``shots`` support and ``queries`` query
examples of each, all without replacement, from a :class:`~metalab.data.fewshot.FewShotDataset`.
Episode labels are ``0..ways-1`` in the (random) order the classes were drawn, so the
class-to-label map is a fresh permutation every episode. Sampling uses NumPy's PCG64 generator
only, so a seed gives the same episodes on any machine, and the generator state is part of a
training checkpoint. A sampler can mix in *within-alphabet* episodes
(:meth:`EpisodeSampler.mix_alphabets`): all classes from one Omniglot alphabet at one rotation, as
in Lake's one-shot test, where every candidate is a character of the same alphabet. On a dataset
made of sub-datasets (:attr:`FewShotDataset.groups <metalab.data.fewshot.FewShotDataset.groups>`,
e.g. Omni-Art-Multi's 12) every episode draws its classes from one sub-dataset, uniform over those
with ``ways`` eligible classes, as ARML's Art-Multi tasks; a dataset without groups keeps exactly
the random stream it had.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.io import atomic_write

UNLABELLED = -1  # the support label of an example whose label is hidden (semi-supervised, active)
EVAL_SEED = 2017  # the default fixed seed of test episodes (not the training seed)


@dataclass
class Episode:
    """One task. Support ``(ways*shots, C, H, W)`` and query ``(ways*queries, C, H, W)`` float32 in
    [0, 1], labels ``0..ways-1``, grouped by class (all shots of label 0 first).

    In a partly labelled episode (``EpisodeSampler(labelled=...)``) hidden support labels are
    :data:`UNLABELLED` and ``oracle_y`` holds the true ones, for methods that may ask for a label
    (active learning); otherwise ``oracle_y`` is None."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    oracle_y: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Episode:
        return type(self)(*(t.to(device, non_blocking=True) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors, in field order (``oracle_y`` only when present)."""
        base = (self.support_x, self.support_y, self.query_x, self.query_y)
        return base if self.oracle_y is None else (*base, self.oracle_y)

    @property
    def labelled(self) -> torch.Tensor:
        """Bool mask of the support examples whose label is known."""
        return self.support_y != UNLABELLED


@dataclass
class TaskBatch(Episode):
    """Several episodes of one shape stacked on a leading task dimension ``T``."""

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]


def check_shape(ways: int, shots: int, queries: int) -> None:
    """A one-line ConfigError unless ways, shots >= 1 and queries >= 0."""
    for what, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if value < (0 if what == "queries" else 1):
            raise ConfigError(f"{what}={value} is not allowed: use a positive number")


class EpisodeSampler:
    """Seeded N-way K-shot Q-query episodes from a dataset.

    Args:
        dataset: where the classes come from.
        ways: classes per episode (N).
        shots: support examples per class (K).
        queries: query examples per class (Q).
        seed: the generator's seed; the same seed gives the same episodes everywhere.
        labelled: support examples per class whose label is shown (the first ones drawn; the
            rest get :data:`UNLABELLED`, their true label in ``oracle_y``); None: all of them.
            Garcia & Bruna's semi-supervised 5-way 5-shot "20% labelled" is ``labelled=1``.
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        labelled: int | None = None,
    ) -> None:
        check_shape(ways, shots, queries)
        if ways > dataset.num_classes:
            raise ConfigError(
                f"ways={ways} is more than the {dataset.num_classes} classes of {dataset.name}: "
                f"use --ways {dataset.num_classes} or fewer"
            )
        eligible = int((dataset.counts >= shots + queries).sum())
        if eligible < ways:
            raise ConfigError(
                f"shots+queries={shots + queries} is more than the examples of all but {eligible} "
                f"classes of {dataset.name} (at most {int(dataset.counts.max())} per class), "
                f"fewer than ways={ways}: lower --shots, --queries or --ways"
            )
        self._start(dataset, ways, shots, queries, seed)
        if labelled is not None and not 0 <= labelled <= shots:
            raise ConfigError(
                f"labelled={labelled} is not allowed with shots={shots}: use 0..{shots} "
                "labelled support examples per class"
            )
        self.labelled = None if labelled == shots else labelled
        self._eligible = np.flatnonzero(dataset.counts >= shots + queries)
        self._sub_datasets = self._eligible_sub_datasets()

    def _start(
        self, dataset: FewShotDataset, ways: int, shots: int, queries: int, seed: int
    ) -> None:
        """What every sampler of episodes holds (a subclass with classes of its own, e.g.
        CACTUs' pseudo-classes, calls this instead of ``__init__``): the images, the episode
        shape, the generator; every label shown; no within-alphabet or sub-dataset episodes."""
        self.dataset, self.ways, self.shots, self.queries, self.seed = (
            dataset,
            ways,
            shots,
            queries,
            seed,
        )
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.labelled: int | None = None
        self.within, self.within_ways = 0.0, ways
        self._groups: list[np.ndarray] = []
        self._sub_datasets: list[np.ndarray] = []

    def _eligible_sub_datasets(self) -> list[np.ndarray]:
        """The eligible classes of each sub-dataset that can fill an episode (``dataset.groups``),
        in sub-dataset order; ``[]`` for a dataset without sub-datasets."""
        groups = self.dataset.groups
        if groups is None:
            return []
        by_group = [self._eligible[groups[self._eligible] == g] for g in np.unique(groups)]
        usable = [classes for classes in by_group if len(classes) >= self.ways]
        if not usable:
            largest = max(len(classes) for classes in by_group)
            raise ConfigError(
                f"ways={self.ways}: no sub-dataset of {self.dataset.name} has that many classes "
                f"with shots+queries={self.shots + self.queries} examples (the largest has "
                f"{largest}): use --ways {largest} or fewer"
            )
        return usable

    def mix_alphabets(self, fraction: float, ways: int = 20) -> EpisodeSampler:
        """Draw a ``fraction`` of episodes (each one, or each task batch, with that probability)
        *within one alphabet*: ``ways`` classes of one alphabet at one rotation (the group
        ``Alphabet/rotDDD`` of a class named ``Alphabet/characterNN/rotDDD``; ``Alphabet`` when
        the name has no rotation). The group is uniform over those with ``ways`` eligible classes.
        ``fraction=0`` leaves the episode stream exactly as it was. Returns the sampler."""
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"alphabet_episodes={fraction}: use a fraction of episodes in [0, 1]")
        self.within, self.within_ways = float(fraction), ways
        if fraction == 0:
            self._groups = []
            return self
        names = self.dataset.class_names
        if not all("/" in n for n in names):
            raise ConfigError(
                f"within-alphabet episodes need classes named Alphabet/character (Omniglot), "
                f"not those of {self.dataset.name}: use --alphabet-episodes 0"
            )
        by_group: dict[str, list[int]] = {}
        for c in self._eligible:
            parts = names[c].split("/")
            key = parts[0] if len(parts) < 3 else f"{parts[0]}/{parts[-1]}"
            by_group.setdefault(key, []).append(int(c))
        self._groups = [np.array(v) for _, v in sorted(by_group.items()) if len(v) >= ways]
        if not self._groups:
            largest = max(len(v) for v in by_group.values())
            raise ConfigError(
                f"alphabet_ways={ways}: no alphabet of {self.dataset.name} has that many "
                f"characters (the largest has {largest}): use --alphabet-ways {largest} or fewer"
            )
        return self

    def protocol(self) -> dict:
        """What these episodes are, for results and reports."""
        return {
            "dataset": self.dataset.name,
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "seed": self.seed,
            **({} if self.labelled is None else {"labelled": self.labelled}),
            **(
                {"alphabet_episodes": self.within, "alphabet_ways": self.within_ways}
                if self.within
                else {}
            ),
        }

    def _draw_within(self, rng: np.random.Generator) -> bool:
        """Whether the next episode (or task batch) is a within-alphabet one; draws nothing
        from ``rng`` when no within-alphabet episodes are mixed in."""
        return bool(self.within) and bool(rng.random() < self.within)

    def sample_indices(
        self, rng: np.random.Generator | None = None, within: bool | None = None
    ) -> np.ndarray:
        """Example indices ``(ways, shots + queries)`` of one episode; row i is label i.
        ``within``: force a within-alphabet episode (``within_ways`` rows) or an ordinary one;
        None: draw which (see :meth:`mix_alphabets`)."""
        rng = self.rng if rng is None else rng
        if within is None:
            within = self._draw_within(rng)
        if within:
            group = self._groups[rng.integers(len(self._groups))]
            classes = rng.choice(group, self.within_ways, replace=False)
        elif self._sub_datasets:  # one sub-dataset, then its classes
            sub = self._sub_datasets[rng.integers(len(self._sub_datasets))]
            classes = rng.choice(sub, self.ways, replace=False)
        else:
            classes = rng.choice(self._eligible, self.ways, replace=False)
        return self._examples(rng, classes)

    def _examples(self, rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
        """``shots + queries`` example indices of each of ``classes``, drawn without replacement:
        ``(len(classes), shots + queries)``."""
        index = self.dataset.class_index[classes]
        keys = rng.random(index.shape)
        keys[index < 0] = 2.0  # padding sorts last and is never drawn
        order = np.argsort(keys, axis=1)[:, : self.shots + self.queries]
        return np.take_along_axis(index, order, axis=1)

    def episode_from_indices(self, indices: np.ndarray) -> Episode:
        """Gather the images of ``(..., ways, shots + queries)`` indices into an Episode/TaskBatch."""
        lead, ways = indices.shape[:-2], indices.shape[-2]
        x = self.dataset.gather(np.ascontiguousarray(indices).reshape(-1))
        x = x.view(*lead, ways, self.shots + self.queries, *x.shape[1:])
        labels = torch.arange(ways).view(ways, 1)
        s, q = self.shots, self.queries
        support_y = labels.expand(ways, s).reshape(-1).expand(*lead, ways * s)
        query_y = labels.expand(ways, q).reshape(-1).expand(*lead, ways * q)
        kind = TaskBatch if lead else Episode
        support_y = support_y.contiguous()
        oracle_y = None
        if self.labelled is not None:  # hide all but the first `labelled` shots of each class
            oracle_y = support_y
            hidden = (torch.arange(s) >= self.labelled).repeat(ways)
            support_y = support_y.masked_fill(hidden, UNLABELLED)
        return kind(
            x[..., :s, :, :, :].reshape(*lead, ways * s, *x.shape[-3:]),
            support_y,
            x[..., s:, :, :, :].reshape(*lead, ways * q, *x.shape[-3:]),
            query_y.contiguous(),
            oracle_y,
        )

    def sample(self) -> Episode:
        """The next episode of this sampler's stream."""
        return self.episode_from_indices(self.sample_indices())

    def sample_batch(self, tasks: int) -> TaskBatch:
        """The next ``tasks`` episodes, stacked: ``(T, ways*shots, C, H, W)`` ...; all ordinary
        or all within-alphabet (one shape)."""
        within = self._draw_within(self.rng)
        indices = np.stack([self.sample_indices(within=within) for _ in range(tasks)])
        return self.episode_from_indices(indices)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def fixed_indices(self, episodes: int) -> np.ndarray:
        """A fixed evaluation set ``(episodes, ways, shots + queries)``, independent of this
        sampler's stream: episode i depends only on (seed, i), so 600 is a prefix of 1000.

        The set is cached on disk (``METALAB_CACHE``) under the dataset's fingerprint and the
        protocol, so a published test set stays the same file even if sampling code changes."""
        from metalab.data.root import cache_dir

        key = f"{self.dataset.fingerprint()}-{self.ways}w{self.shots}s{self.queries}q-{self.seed}"
        path = cache_dir() / f"episodes-{key}.npy"
        if path.exists():
            try:
                stored = np.load(path)
                if len(stored) >= episodes:
                    return stored[:episodes]
            except (OSError, ValueError):
                pass  # damaged: rebuilt below
        indices = np.stack(
            [
                self.sample_indices(
                    np.random.Generator(np.random.PCG64([self.seed, i])), within=False
                )
                for i in range(episodes)
            ]
        )
        atomic_write(path, lambda f: np.save(f, indices))
        return indices

    def state(self) -> dict:
        """The generator state, to checkpoint."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

"""Ambiguous attribute classification: OUR SUBSTITUTE for PLATIPUS's ambiguous CelebA tasks.

Finn, Xu & Levine 2018 (PLATIPUS, Sec. 6 [U: section number]) build ambiguous 2-way tasks from
CelebA: three attributes are drawn, the support set's positives carry all three and its
negatives none, and the task's true concept is two of the three, so the support set cannot tell
which pair is meant. We have no CelebA, so this module builds the same protocol from Omniglot
characters (ink = 1 on a 0 background, 28x28) carrying SYNTHETIC visual attributes: fixed image
transforms. Nothing here is comparable to a number of the paper.

The attributes (:data:`ATTRIBUTES`, applied in that canonical order when several are present):

- ``small``: the character max-pooled 2x2 to 14x14 and centred (a smaller character);
- ``shift``: the character translated 4 px right and 4 px down (empty space = background);
- ``thick``: stroke dilation by a 3x3 max-pool (stride 1);
- ``blur``: a 5x5 binomial blur (the 3x3 kernel [1, 2, 1]^2 / 16 twice, sigma ~ 1 px);
- ``frame``: a 2-px border of ink;
- ``corner``: a filled 5x5 square of ink at the top left, inside the frame (rows/cols 2-6);
- ``stripes``: 1-px horizontal lines of ink across the image at rows 9, 15 and 21;
- ``dots``: a 4x4 grid of single ink pixels at rows/cols 7, 12, 18 and 23 (never on a stripe);
- ``slash``: a 1-px anti-diagonal line of ink (row + col = 27);
- ``invert``: 1 - x, last, so that it inverts everything above.

The character edits (small, shift, thick, blur) come first, then the overlays (drawn as
``max(x, pattern)``, so they stay sharp whatever was done to the character), then ``invert``.
Rotations and flips are not attributes: the Vinyals split already holds every character at four
rotations as separate classes, and a mirrored unknown character is still a plausible character,
so neither is detectable in one image.

Meta-training tasks use :data:`TRAIN_ATTRIBUTES`, meta-test tasks :data:`TEST_ATTRIBUTES`
(disjoint; each split has one geometric change, one stroke change and overlays, so the test
attributes are new but of kinds seen in training).

A task (:class:`AttributeTasks`) [the construction is the paper's as we read it; the details are
ours, U]:

- a triple {a, b, c} of the split's attributes (uniform) and a hidden hypothesis h, two of the
  three (uniform over ab, ac, bc);
- support, K per class (label 0 first): K negatives carrying none of the triple, K positives
  carrying all three. Every support, query and probe image also carries each *distractor* (an
  attribute of the split outside the triple) independently with probability ``distractor``
  (default 0.3), so "has some transform" is not the cue;
- query, Q per class: positives carry both attributes of h, and the third with probability 1/2;
  negatives carry one of the six subsets of the triple that lack h (uniform). Labels follow h, so
  the meta-training query set disambiguates the support set (what PLATIPUS's posterior q uses);
- probes (fixed sets only, for :mod:`metalab.evaluate.coverage`): for each pair of the triple
  (ab, ac, bc, in :data:`PAIRS` order), ``probes`` images carrying exactly that pair.

Base images are drawn uniformly (with replacement) from the image pool the family is given: the
meta-train part of the Vinyals split for training, its test part for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metalab.errors import ConfigError
from metalab.tasks.episodes import TaskBatch

SIZE = 28  # the attributes are defined on 28x28 images
PAIRS = ((0, 1), (0, 2), (1, 2))  # the hypotheses of a task: pairs of its triple, ab, ac, bc


def _small(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[..., 7:21, 7:21] = F.max_pool2d(x, 2)
    return out


def _shift(x: torch.Tensor, by: int = 4) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[..., by:, by:] = x[..., :-by, :-by]
    return out


def _thick(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


_BINOMIAL = torch.tensor([1.0, 2.0, 1.0])
_KERNEL = (torch.outer(_BINOMIAL, _BINOMIAL) / 16).view(1, 1, 3, 3)


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = _KERNEL.to(x)
    for _ in range(2):
        x = F.conv2d(x, kernel, padding=1)
    return x


def _pattern(rows=(), cols=(), cells=(), diagonal: bool = False) -> torch.Tensor:
    """A ``(28, 28)`` 0/1 mask: full rows, full columns, single cells, the anti-diagonal."""
    mask = torch.zeros(SIZE, SIZE)
    for r in rows:
        mask[r, :] = 1
    for c in cols:
        mask[:, c] = 1
    for r, c in cells:
        mask[r, c] = 1
    if diagonal:
        mask[torch.arange(SIZE), SIZE - 1 - torch.arange(SIZE)] = 1
    return mask


_FRAME = _pattern(rows=(0, 1, 26, 27), cols=(0, 1, 26, 27))
_CORNER = _pattern(cells=[(r, c) for r in range(2, 7) for c in range(2, 7)])
_STRIPES = _pattern(rows=(9, 15, 21))
_DOTS = _pattern(cells=[(r, c) for r in (7, 12, 18, 23) for c in (7, 12, 18, 23)])
_SLASH = _pattern(diagonal=True)


def _overlay(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def draw(x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, mask.to(x))

    return draw


# name -> transform of float images (N, 1, 28, 28), ink 1 on 0; the order is the canonical order
# of composition.
ATTRIBUTES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "small": _small,
    "shift": _shift,
    "thick": _thick,
    "blur": _blur,
    "frame": _overlay(_FRAME),
    "corner": _overlay(_CORNER),
    "stripes": _overlay(_STRIPES),
    "dots": _overlay(_DOTS),
    "slash": _overlay(_SLASH),
    "invert": lambda x: 1 - x,
}
TRAIN_ATTRIBUTES = ("small", "thick", "frame", "stripes", "slash", "invert")  # meta-training
TEST_ATTRIBUTES = ("shift", "blur", "corner", "dots")  # meta-test: never seen in meta-training


def apply_attributes(
    images: torch.Tensor, present: torch.Tensor, names: Sequence[str]
) -> torch.Tensor:
    """Images ``(N, 1, 28, 28)`` with, for each ``j``, attribute ``names[j]`` applied where
    ``present[:, j]`` (bool ``(N, len(names))``), in the canonical order of :data:`ATTRIBUTES`
    whatever the order of ``names``."""
    x = images.clone()
    for name in sorted(names, key=list(ATTRIBUTES).index):
        rows = present[:, list(names).index(name)]
        if rows.any():
            x[rows] = ATTRIBUTES[name](x[rows])
    return x


def _check_attributes(attributes: Sequence[str]) -> tuple[str, ...]:
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ConfigError(f"unknown attribute(s) {unknown}: use names from {list(ATTRIBUTES)}")
    if len(set(attributes)) != len(attributes) or len(attributes) < 3:
        raise ConfigError(
            f"attributes={list(attributes)}: a task needs 3 distinct attributes; give 3 or more, "
            "each once"
        )
    return tuple(sorted(attributes, key=list(ATTRIBUTES).index))


def _labels(tasks: int, per_class: int) -> torch.Tensor:
    """``(tasks, 2 * per_class)`` int64 labels: ``per_class`` zeros, then as many ones."""
    return torch.arange(2).repeat_interleave(per_class).expand(tasks, -1).contiguous()


class AttributeTasks:
    """Seeded batches of ambiguous 2-way attribute tasks (see the module docstring), with the
    interface of :mod:`metalab.tasks.regression`'s families: :meth:`sample_batch`, :meth:`state`,
    :meth:`set_state`, and fixed sets where task i depends only on (seed, i).

    Args:
        images: the base image pool ``(N, 1, 28, 28)``, uint8 with ink = 255 (a
            :class:`~metalab.data.fewshot.FewShotDataset`'s ``images``) or float in [0, 1].
        attributes: the split's attribute names (3 or more of :data:`ATTRIBUTES`).
        shots: support images per class (K).
        queries: query images per class (Q).
        seed: the generator's seed.
        distractor: probability that an image carries each attribute of the split outside its
            task's triple.
    """

    def __init__(
        self,
        images: torch.Tensor,
        attributes: Sequence[str],
        shots: int,
        queries: int,
        seed: int = 0,
        distractor: float = 0.3,
    ) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, SIZE, SIZE) or len(images) == 0:
            raise ConfigError(
                f"attribute tasks need (N, 1, {SIZE}, {SIZE}) images, got {tuple(images.shape)}: "
                f"load Omniglot at --image-size {SIZE}"
            )
        if shots < 1 or queries < 1:
            raise ConfigError(f"shots={shots}, queries={queries}: both must be at least 1")
        if not 0.0 <= distractor <= 1.0:
            raise ConfigError(f"distractor={distractor}: use a probability in [0, 1]")
        self.images, self.attributes = images, _check_attributes(attributes)
        self.shots, self.queries, self.seed, self.distractor = shots, queries, seed, distractor
        self.rng = np.random.Generator(np.random.PCG64(seed))

    # -- drawing -------------------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator, probes: int = 0) -> dict[str, np.ndarray]:
        """One task's base-image indices and attribute masks (over ``self.attributes``), in the
        order support (K negatives, K positives), query (Q negatives, Q positives), probes (M per
        pair of :data:`PAIRS`); and its ``triple`` (attribute indices) and ``hypothesis`` (an
        index into :data:`PAIRS`). Probes are drawn last, so they never change the task."""
        k, q, n = self.shots, self.queries, len(self.attributes)
        triple = np.sort(rng.choice(n, 3, replace=False))
        hypothesis = int(rng.integers(3))
        h_bits = (1 << PAIRS[hypothesis][0]) | (1 << PAIRS[hypothesis][1])
        third = 7 ^ h_bits
        lacking_h = np.array([s for s in range(8) if s & h_bits != h_bits])  # the 6 negatives
        # Subsets of the triple as 3-bit masks (bit j: triple[j] present).
        subsets = np.concatenate(
            [
                np.zeros(k, np.int64),  # support negatives: none of the triple
                np.full(k, 7),  # support positives: all three
                lacking_h[rng.integers(len(lacking_h), size=q)],  # query negatives
                h_bits | np.where(rng.random(q) < 0.5, third, 0),  # query positives
            ]
        )
        index = rng.integers(len(self.images), size=2 * k + 2 * q)
        distractors = rng.random((2 * k + 2 * q, n)) < self.distractor
        if probes:
            pair_bits = np.array([(1 << i) | (1 << j) for i, j in PAIRS])
            subsets = np.concatenate([subsets, np.repeat(pair_bits, probes)])
            index = np.concatenate([index, rng.integers(len(self.images), size=3 * probes)])
            more = rng.random((3 * probes, n)) < self.distractor
            distractors = np.concatenate([distractors, more])
        present = distractors.copy()
        present[:, triple] = ((subsets[:, None] >> np.arange(3)) & 1) == 1
        return {"index": index, "present": present, "triple": triple, "hypothesis": hypothesis}

    def _render(self, index: np.ndarray, present: np.ndarray) -> torch.Tensor:
        """The base images ``index`` as float in [0, 1] with the attributes ``present``."""
        base = self.images[torch.from_numpy(index)]
        base = base.float().div_(255) if base.dtype == torch.uint8 else base.float()
        return apply_attributes(base, torch.from_numpy(present), self.attributes)

    def _batch(self, parts: list[dict[str, np.ndarray]]) -> tuple[TaskBatch, torch.Tensor]:
        """Stack tasks drawn by :meth:`_draw` into a TaskBatch, and their probes ``(T, 3M, ...)``
        (``(T, 0, ...)`` without probes)."""
        k, q, t = self.shots, self.queries, len(parts)
        index = np.concatenate([p["index"] for p in parts])
        present = np.concatenate([p["present"] for p in parts])
        x = self._render(index, present).view(t, -1, 1, SIZE, SIZE)
        batch = TaskBatch(x[:, : 2 * k], _labels(t, k), x[:, 2 * k : 2 * k + 2 * q], _labels(t, q))
        return batch, x[:, 2 * k + 2 * q :]

    def sample_batch(self, tasks: int) -> TaskBatch:
        """The next ``tasks`` tasks: support ``(T, 2K, 1, 28, 28)`` with labels ``(T, 2K)``
        (int64, K zeros then K ones), query ``(T, 2Q, 1, 28, 28)`` and ``(T, 2Q)`` likewise."""
        return self._batch([self._draw(self.rng) for _ in range(tasks)])[0]

    def fixed_set(
        self, tasks: int, probes: int = 0, start: int = 0
    ) -> tuple[TaskBatch, dict[str, object]]:
        """Tasks ``start .. start + tasks - 1`` of the fixed set: task i depends only on
        (seed, i), so a shorter set is a prefix of a longer one (and ``probes`` never changes
        the tasks). Returns the batch and ``{"triple": (T, 3) attribute indices, "hypothesis":
        (T,) indices into PAIRS, "attributes": the names, "probe_x": (T, 3M, 1, 28, 28),
        "probe_pair": (3M,) the pair each probe carries, "index": (T, 2K + 2Q + 3M) the base
        images, "present": (T, 2K + 2Q + 3M, attributes) bool, what each image carries}``, the
        images in the order support, query, probes."""
        parts = [
            self._draw(np.random.Generator(np.random.PCG64([self.seed, i])), probes)
            for i in range(start, start + tasks)
        ]
        batch, probe_x = self._batch(parts)
        info = {
            "triple": np.stack([p["triple"] for p in parts]),
            "hypothesis": np.array([p["hypothesis"] for p in parts]),
            "attributes": self.attributes,
            "probe_x": probe_x,
            "probe_pair": torch.arange(3).repeat_interleave(probes),
            "index": np.stack([p["index"] for p in parts]),
            "present": np.stack([p["present"] for p in parts]),
        }
        return batch, info

    def protocol(self) -> dict:
        """What these tasks are, for results."""
        return {
            "attributes": list(self.attributes),
            "shots": self.shots,
            "queries": self.queries,
            "distractor": self.distractor,
            "seed": self.seed,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        """The generator state, to checkpoint."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def omniglot_attribute_tasks(
    part: str,
    shots: int,
    queries: int,
    seed: int = 0,
    split: str = "vinyals",
    image_size: int = SIZE,
    data_root=None,
) -> AttributeTasks:
    """Attribute tasks over the images of Omniglot's ``split``/``part``: the meta-train
    attributes for ``train``, ``val`` and ``trainval``, the meta-test attributes for ``test``."""
    from metalab.data.datasets import load_dataset

    if image_size != SIZE:
        raise ConfigError(f"image_size={image_size}: attribute tasks are {SIZE}x{SIZE}; use {SIZE}")
    images = load_dataset("omniglot", split, part, image_size, data_root).images
    attributes = TEST_ATTRIBUTES if part == "test" else TRAIN_ATTRIBUTES
    return AttributeTasks(images, attributes, shots, queries, seed)

"""Non-mutually-exclusive (NME) task families — Yin, Tucker, Zhou, Levine & Finn, ICLR 2020,
"Meta-learning without memorization".

A task set is *mutually exclusive* when no single function solves every training task (e.g.
Omniglot episodes whose class-to-label map is shuffled each time). When it is not, a meta-learner
can *memorise* the training tasks: it solves each one from the query input alone, ignores the
support set, and then fails on new tasks. These families make memorisation possible on purpose.

:class:`NMESinusoidTasks`, the official notebooks' setting (google-research
``meta_learning_without_memorization/sinusoid``; the shared PAPERS.md §13): 20 amplitudes
``linspace(0.1, 4, 20)``, phase 0, ``x ~ U[-5, 5]``, noise std 0.1; the input is ``[x,
one_hot(amplitude index)]`` (21 numbers), so the index in the input names the task. Training
draws indices 0..15 only. Test tasks (:meth:`NMESinusoidTasks.test_set`) have an amplitude drawn
continuously from [0.1, 4] and a random index in 0..15 that says nothing about it: only the
support set does.

:class:`NMEEpisodes`, the paper's non-mutually-exclusive Omniglot (Sec. 5; its construction is
described there, no code was released): the training classes are split once into ``ways`` fixed
groups and class c always gets label ``group(c)``; an episode draws one class of each group. A
single classifier then solves every training episode from the query image alone. Test episodes
are the usual ones (new classes, labels shuffled), so memorising fails there.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.tasks.episodes import EpisodeSampler, TaskBatch
from metalab.tasks.regression import _TaskStream

AMPLITUDES = np.linspace(0.1, 4.0, 20)  # the notebooks' 20 fixed amplitudes (K_amp = 20)
TRAIN_INDICES = 16  # training draws indices 0..15 (`randint(0, K_amp - 5)`, both ends included)
NOISE = 0.1  # std of the targets' Gaussian noise
X_WIDTH = 5.0  # x ~ U[-5, 5]


def nme_inputs(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``[x, one_hot(index)]``: ``x (T, n, 1)`` and amplitude indices ``(T,)`` to ``(T, n, 21)``."""
    onehot = np.zeros((*x.shape[:2], len(AMPLITUDES)))
    onehot[np.arange(len(index)), :, index] = 1.0
    return np.concatenate([x, onehot], axis=2)


class NMESinusoidTasks(_TaskStream):
    """Seeded batches of the NME sinusoid tasks of training: amplitude ``AMPLITUDES[i]`` with
    ``i`` uniform in 0..15, its one-hot index in every input, ``shots`` support and ``queries``
    query points (the notebooks: 10 and 10), targets with noise std 0.1.

    Args:
        shots, queries: points per task.
        seed: the generator's seed.
        family: unused (the notebooks' constants above); kept for the families' interface.
    """

    input_dim = 1 + len(AMPLITUDES)

    def __init__(self, shots: int, queries: int, seed: int = 0, family=None) -> None:
        super().__init__(shots, queries, seed, family)

    def _draw(
        self, rng: np.random.Generator, tasks: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        index = rng.integers(0, TRAIN_INDICES, size=tasks)
        amplitude = AMPLITUDES[index]
        x = rng.uniform(-X_WIDTH, X_WIDTH, size=(tasks, self.shots + self.queries, 1))
        clean = amplitude[:, None, None] * np.sin(x)
        y = clean + NOISE * rng.standard_normal(size=x.shape)
        info = {"index": index, "amplitude": amplitude, "phase": np.zeros(tasks), "clean": clean}
        return nme_inputs(x, index), y, info

    def function(self, info: dict[str, np.ndarray], task: int, x: np.ndarray) -> np.ndarray:
        return info["amplitude"][task] * np.sin(x)

    @staticmethod
    def test_set(
        tasks: int,
        shots: int = 5,
        points: int = 200,
        seed: int = 0,
        indices: tuple[int, int] = (0, TRAIN_INDICES),
        grid: tuple[float, float] = (-X_WIDTH + 0.5, X_WIDTH - 0.5),
        support_noise: float = float(np.sqrt(2.0)) * NOISE,
    ) -> tuple[TaskBatch, dict[str, np.ndarray]]:
        """The notebooks' meta-test tasks: amplitude ``U[0.1, 4]`` (continuous, so mostly none of
        the 20), a random one-hot index in ``indices`` (half-open; uninformative), ``shots``
        support points ``x ~ U[-5, 5]`` and ``points`` query points equally spaced over ``grid``.

        Noise as in the MAML notebook: its test support targets get the generator's noise and
        then noise again (std ``0.1 * sqrt(2)`` in all), the query targets std 0.1. Task i
        depends only on (seed, i).

        Returns:
            The batch (support ``(T, shots, 21)``, query ``(T, points, 21)``) and ``amplitude``,
            ``index`` ``(T,)`` and ``clean`` (the noise-free query targets ``(T, points, 1)``).
        """
        if shots < 1 or points < 1 or tasks < 1:
            raise ConfigError(f"tasks={tasks}, shots={shots}, points={points}: each must be >= 1")
        sx, sy, qx, qy, amp, idx = [], [], [], [], [], []
        grid_x = np.linspace(*grid, points)[None, :, None]
        for i in range(tasks):
            rng = np.random.Generator(np.random.PCG64([seed, i]))
            a = rng.uniform(AMPLITUDES[0], AMPLITUDES[-1])
            k = rng.integers(*indices, size=1)
            x = rng.uniform(-X_WIDTH, X_WIDTH, size=(1, shots, 1))
            sx.append(nme_inputs(x, k))
            sy.append(a * np.sin(x) + support_noise * rng.standard_normal(size=x.shape))
            qx.append(nme_inputs(grid_x, k))
            qy.append(a * np.sin(grid_x) + NOISE * rng.standard_normal(size=grid_x.shape))
            amp.append(a)
            idx.append(k[0])
        t = [torch.from_numpy(np.concatenate(v)).float() for v in (sx, sy, qx, qy)]
        amplitude = np.array(amp)
        clean = amplitude[:, None, None] * np.sin(grid_x)
        return TaskBatch(*t), {"amplitude": amplitude, "index": np.array(idx), "clean": clean}

    @staticmethod
    def notebook_test_set(tasks: int = 100, index_seed: int = 0) -> tuple[TaskBatch, dict]:
        """The MAML notebook's own test tasks, rebuilt from its seeded NumPy stream: task i
        reseeds NumPy's legacy generator with i, draws ``A ~ U[0.1, 4]``, reseeds, draws 5 support
        inputs, their noise twice, 200 unused noise-free draws and the noise of the 200 grid
        targets on ``linspace(-4.5, 4.5)`` (the notebook's ``eval_sinewave_for_test``). Only the
        uninformative one-hot index differs: the notebook takes it from Python's unseeded
        ``random``; here from PCG64(index_seed). The notebooks' outputs were measured on these
        amplitudes and inputs (Returns: as :meth:`test_set`)."""
        sx, sy, qx, qy, amp = [], [], [], [], []
        grid = np.linspace(-X_WIDTH + 0.5, X_WIDTH - 0.5, 200)[:, None]
        index = np.random.Generator(np.random.PCG64(index_seed)).integers(0, TRAIN_INDICES, tasks)
        for i in range(tasks):
            a = np.random.RandomState(i).uniform(AMPLITUDES[0], AMPLITUDES[-1])
            rs = np.random.RandomState(i)  # the generator's batch() reseeds before drawing x
            x = rs.uniform(-X_WIDTH, X_WIDTH, 5)[:, None]
            y = a * np.sin(x) + rs.normal(scale=NOISE, size=x.shape)
            y = y + rs.normal(scale=NOISE, size=y.shape)  # the test adds noise again
            rs.normal(scale=0.0, size=grid.shape)  # the noise-free grid batch still draws
            sx.append(nme_inputs(x[None], index[i : i + 1]))
            sy.append(y[None])
            qx.append(nme_inputs(grid[None], index[i : i + 1]))
            qy.append((a * np.sin(grid) + rs.normal(scale=NOISE, size=grid.shape))[None])
            amp.append(a)
        t = [torch.from_numpy(np.concatenate(v)).float() for v in (sx, sy, qx, qy)]
        amplitude = np.array(amp)
        clean = amplitude[:, None, None] * np.sin(grid)[None]
        return TaskBatch(*t), {"amplitude": amplitude, "index": index, "clean": clean}


class NMEEpisodes(EpisodeSampler):
    """Non-mutually-exclusive N-way episodes: the eligible classes split into ``ways`` fixed
    groups (a permutation seeded by ``seed``, split as evenly as possible) and label n is always
    a class of group n. The arguments and interface of
    :class:`~metalab.tasks.episodes.EpisodeSampler`; within-alphabet episodes are not offered."""

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        labelled: int | None = None,
    ) -> None:
        super().__init__(dataset, ways, shots, queries, seed, labelled)
        order = np.random.Generator(np.random.PCG64([seed, 1])).permutation(self._eligible)
        self.slots = np.array_split(order, ways)  # slot n: the classes that are always label n

    def mix_alphabets(self, fraction: float, ways: int = 20) -> EpisodeSampler:
        if fraction:
            raise ConfigError(
                f"alphabet_episodes={fraction}: non-mutually-exclusive episodes fix each class's "
                "label, so they cannot be drawn within an alphabet: use --alphabet-episodes 0"
            )
        return self

    def protocol(self) -> dict:
        return {**super().protocol(), "labels": "non-mutually-exclusive"}

    def sample_indices(
        self, rng: np.random.Generator | None = None, within: bool | None = None
    ) -> np.ndarray:
        """Example indices ``(ways, shots + queries)``; row n is a class of slot n."""
        rng = self.rng if rng is None else rng
        classes = np.array([slot[rng.integers(len(slot))] for slot in self.slots])
        return self._examples(rng, classes)


class RotatedGlyphTasks:
    """OUR SUBSTITUTE for the paper's pose regression (Pascal3D+ renders are not available):
    each task is one Omniglot character with a hidden canonical angle ``offset(c)``, uniform in
    [0, 2 pi) and fixed per character (a function of ``seed`` and the character's name); a point
    is one of the character's drawings rotated by ``offset(c) + r``, ``r ~ U[-pi/2, pi/2)``, and
    its label is ``r`` scaled to [0, 10) (the pose code scales azimuths to [0, 10]). The relative
    range stays within half a turn so that no label wraps around.

    As in the pose task, a network can memorise the training characters (recognise the character,
    read its absolute rotation, subtract the offset it learnt for that character) and then need
    no support set; on new characters the offset is only in the support labels.

    Args:
        dataset: the characters (upright classes only are used: names ending ``rot000`` or
            without a rotation).
        shots, queries: labelled drawings per task.
        seed: the task stream's seed.
        offset_seed: the seed of the characters' canonical angles (shared by train and test).
    """

    def __init__(
        self, dataset: FewShotDataset, shots: int, queries: int, seed: int = 0, offset_seed: int = 0
    ) -> None:
        if shots < 1 or queries < 1:
            raise ConfigError(f"shots={shots}, queries={queries}: both must be at least 1")
        self.dataset, self.shots, self.queries, self.seed = dataset, shots, queries, seed
        upright = [
            c for c, n in enumerate(dataset.class_names) if n.endswith("rot000") or "rot" not in n
        ]
        self.classes = np.array([c for c in upright if dataset.counts[c] >= 1])
        self.offsets = np.array(
            [
                np.random.Generator(
                    np.random.PCG64([offset_seed, zlib.crc32(dataset.class_names[c].encode())])
                ).uniform(0, 2 * np.pi)
                for c in range(dataset.num_classes)
            ]
        )
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def _draw(self, rng: np.random.Generator, tasks: int) -> tuple[TaskBatch, np.ndarray]:
        n = self.shots + self.queries
        classes = rng.choice(self.classes, tasks, replace=False)
        counts = self.dataset.counts[classes]
        which = (rng.random((tasks, n)) * counts[:, None]).astype(np.int64)
        index = self.dataset.class_index[classes[:, None], which]
        relative = rng.uniform(-np.pi / 2, np.pi / 2, size=(tasks, n))
        angle = self.offsets[classes][:, None] + relative
        images = self.dataset.gather(index.reshape(-1)).float()
        images = rotate(images, torch.from_numpy(angle.reshape(-1)).float())
        images = images.view(tasks, n, *images.shape[1:])
        y = torch.from_numpy((relative / np.pi + 0.5) * 10).float()[..., None]
        k = self.shots
        return TaskBatch(images[:, :k], y[:, :k], images[:, k:], y[:, k:]), classes

    def sample_batch(self, tasks: int) -> TaskBatch:
        return self._draw(self.rng, tasks)[0]

    def sample(self) -> TaskBatch:
        return self.sample_batch(1)

    def fixed_set(self, tasks: int) -> tuple[TaskBatch, np.ndarray]:
        """``tasks`` fixed tasks (task i depends only on (seed, i)) and their characters."""
        parts = [
            self._draw(np.random.Generator(np.random.PCG64([self.seed, i])), 1)
            for i in range(tasks)
        ]
        batch = TaskBatch(*(torch.cat(t) for t in zip(*(p[0].tensors() for p in parts))))
        return batch, np.concatenate([p[1] for p in parts])

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Each image ``(B, C, H, W)`` rotated by its angle (radians) about its centre, bilinear,
    with 0 (metalab's Omniglot background) outside; pi/2 is ``torch.rot90(images, 1, (2, 3))``."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

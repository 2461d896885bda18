"""Regression task families: the sinusoid of Finn et al. 2017 (Sec. 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase ``phi ~ U[0, pi]``;
inputs ``x ~ U[-5, 5]``. A :class:`SinusoidTasks` draws batches of tasks, each with ``shots``
support and ``queries`` query points, from a NumPy PCG64 stream (portable, checkpointable like
:class:`~metalab.tasks.episodes.EpisodeSampler`), and a fixed test set where task i depends only on
(seed, i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metalab.errors import ConfigError
from metalab.tasks.episodes import TaskBatch


@dataclass(frozen=True)
class SinusoidFamily:
    """The ranges tasks and inputs are drawn from (Finn et al. 2017's defaults)."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, float(np.pi))
    x_range: tuple[float, float] = (-5.0, 5.0)


class SinusoidTasks:
    """Seeded batches of sinusoid regression tasks.

    Args:
        shots: support points per task (K).
        queries: query points per task.
        seed: the generator's seed.
        family: the task and input ranges.
    """

    def __init__(
        self, shots: int, queries: int, seed: int = 0, family: SinusoidFamily = SinusoidFamily()
    ) -> None:
        if shots < 1 or queries < 1:
            raise ConfigError(f"shots={shots}, queries={queries}: both must be at least 1")
        self.shots, self.queries, self.seed, self.family = shots, queries, seed, family
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def _draw(self, rng: np.random.Generator, tasks: int) -> tuple[np.ndarray, ...]:
        f = self.family
        amplitude = rng.uniform(*f.amplitude, size=(tasks, 1, 1))
        phase = rng.uniform(*f.phase, size=(tasks, 1, 1))
        x = rng.uniform(*f.x_range, size=(tasks, self.shots + self.queries, 1))
        return x, amplitude * np.sin(x - phase), amplitude[:, 0, 0], phase[:, 0, 0]

    def _batch(self, x: np.ndarray, y: np.ndarray) -> TaskBatch:
        x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def sample_batch(self, tasks: int) -> TaskBatch:
        """The next ``tasks`` tasks: support ``(T, K, 1)`` inputs and targets, query ``(T, Q, 1)``."""
        x, y, _, _ = self._draw(self.rng, tasks)
        return self._batch(x, y)

    def fixed(self, tasks: int) -> tuple[TaskBatch, np.ndarray, np.ndarray]:
        """A fixed test set of ``tasks`` tasks and their amplitudes and phases ``(T,)``; task i
        depends only on (seed, i), so a shorter set is a prefix of a longer one."""
        parts = [
            self._draw(np.random.Generator(np.random.PCG64([self.seed, i])), 1)
            for i in range(tasks)
        ]
        x, y, amplitude, phase = (np.concatenate(p) for p in zip(*parts))
        return self._batch(x, y), amplitude, phase

    def state(self) -> dict:
        """The generator state, to checkpoint."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

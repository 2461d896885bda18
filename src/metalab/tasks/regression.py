"""Regression task families: the sinusoid of Finn et al. 2017 (Sec. 5.1), and the ambiguous
sinusoids-or-lines of Finn, Xu & Levine 2018 (PLATIPUS, Sec. 5).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase ``phi ~ U[0, pi]``;
inputs ``x ~ U[-5, 5]``. A :class:`SinusoidTasks` draws batches of tasks, each with ``shots``
support and ``queries`` query points, from a NumPy PCG64 stream (portable, checkpointable like
:class:`~metalab.tasks.episodes.EpisodeSampler`), and a fixed test set where task i depends only on
(seed, i).

:class:`AmbiguousTasks` mixes sinusoids and lines, observed with Gaussian noise at a few support
points from a narrow window of the input range, so that several functions of either kind fit a
task's support set; its query points cover the whole range.
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


class _TaskStream:
    """What every regression family shares: a seeded PCG64 stream of task batches, fixed sets
    where task i depends only on (seed, i), and the generator state for checkpoints. A family
    implements ``_draw(rng, tasks) -> (x, y, parameters)``, inputs and targets
    ``(T, K + Q, 1)`` (support first) and a dict of per-task arrays."""

    def __init__(self, shots: int, queries: int, seed: int, family) -> None:
        if shots < 1 or queries < 1:
            raise ConfigError(f"shots={shots}, queries={queries}: both must be at least 1")
        self.shots, self.queries, self.seed, self.family = shots, queries, seed, family
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def _draw(
        self, rng: np.random.Generator, tasks: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError

    def _batch(self, x: np.ndarray, y: np.ndarray) -> TaskBatch:
        x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def sample_batch(self, tasks: int) -> TaskBatch:
        """The next ``tasks`` tasks: support ``(T, K, 1)`` inputs and targets, query ``(T, Q, 1)``."""
        x, y, _ = self._draw(self.rng, tasks)
        return self._batch(x, y)

    def fixed_set(self, tasks: int) -> tuple[TaskBatch, dict[str, np.ndarray]]:
        """A fixed set of ``tasks`` tasks and their parameters ``{name: (T, ...)}``, among them
        ``clean``, the noise-free targets ``(T, K + Q, 1)``; task i depends only on (seed, i), so
        a shorter set is a prefix of a longer one."""
        parts = [
            self._draw(np.random.Generator(np.random.PCG64([self.seed, i])), 1)
            for i in range(tasks)
        ]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        info = {name: np.concatenate([p[2][name] for p in parts]) for name in parts[0][2]}
        return self._batch(x, y), info

    def function(self, info: dict[str, np.ndarray], task: int, x: np.ndarray) -> np.ndarray:
        """The noise-free target of task ``task`` of a :meth:`fixed_set` at inputs ``x``."""
        raise NotImplementedError

    def state(self) -> dict:
        """The generator state, to checkpoint."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class SinusoidTasks(_TaskStream):
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
        super().__init__(shots, queries, seed, family)

    def _draw(
        self, rng: np.random.Generator, tasks: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        f = self.family
        amplitude = rng.uniform(*f.amplitude, size=(tasks, 1, 1))
        phase = rng.uniform(*f.phase, size=(tasks, 1, 1))
        x = rng.uniform(*f.x_range, size=(tasks, self.shots + self.queries, 1))
        y = amplitude * np.sin(x - phase)
        return x, y, {"amplitude": amplitude[:, 0, 0], "phase": phase[:, 0, 0], "clean": y}

    def fixed(self, tasks: int) -> tuple[TaskBatch, np.ndarray, np.ndarray]:
        """A fixed test set of ``tasks`` tasks and their amplitudes and phases ``(T,)``; task i
        depends only on (seed, i), so a shorter set is a prefix of a longer one."""
        batch, info = self.fixed_set(tasks)
        return batch, info["amplitude"], info["phase"]

    def function(self, info: dict[str, np.ndarray], task: int, x: np.ndarray) -> np.ndarray:
        return info["amplitude"][task] * np.sin(x - info["phase"][task])


@dataclass(frozen=True)
class AmbiguousFamily:
    """The ranges of the ambiguous regression tasks (PLATIPUS, Sec. 5; the values follow the
    Finn-lab mixture tasks and are unconfirmed for PLATIPUS itself [U]).

    A task is a sinusoid ``A sin(x - phi)`` or a line ``a x + b``, each with probability
    ``1 - line_fraction`` / ``line_fraction``; targets carry Gaussian noise of std ``noise``.
    Support inputs lie in a window of width ``support_width`` placed uniformly inside
    ``x_range`` (the narrow range that makes a task ambiguous [U: width not in the sources]);
    query inputs are uniform over ``x_range``."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, float(np.pi))
    slope: tuple[float, float] = (-3.0, 3.0)
    intercept: tuple[float, float] = (-3.0, 3.0)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise: float = 0.3
    support_width: float = 2.0
    line_fraction: float = 0.5


SINE, LINE = 0, 1  # the kinds of AmbiguousTasks.fixed


class AmbiguousTasks(_TaskStream):
    """Seeded batches of ambiguous regression tasks: sinusoids or lines, a few noisy support
    points in a narrow window (see :class:`AmbiguousFamily`). The same interface as
    :class:`SinusoidTasks`; :meth:`fixed` returns the task parameters in a dict.

    Args:
        shots: support points per task (K; PLATIPUS shows K = 5 [U]).
        queries: query points per task.
        seed: the generator's seed.
        family: the task and input ranges.
    """

    def __init__(
        self, shots: int, queries: int, seed: int = 0, family: AmbiguousFamily = AmbiguousFamily()
    ) -> None:
        low, high = family.x_range
        if not 0 < family.support_width <= high - low:
            raise ConfigError(
                f"support_width={family.support_width}: use a width in (0, {high - low}]"
            )
        if family.noise < 0 or not 0 <= family.line_fraction <= 1:
            raise ConfigError(
                f"noise={family.noise}, line_fraction={family.line_fraction}: use noise >= 0 "
                "and a fraction in [0, 1]"
            )
        super().__init__(shots, queries, seed, family)

    def _draw(
        self, rng: np.random.Generator, tasks: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        # Every task draws every parameter (both kinds'), so the stream advances by a fixed amount.
        f, k = self.family, self.shots
        shape = (tasks, 1, 1)
        kind = (rng.uniform(size=shape) < f.line_fraction).astype(np.int64)
        amplitude, phase = rng.uniform(*f.amplitude, size=shape), rng.uniform(*f.phase, size=shape)
        slope, intercept = rng.uniform(*f.slope, size=shape), rng.uniform(*f.intercept, size=shape)
        low, high = f.x_range
        start = rng.uniform(low, high - f.support_width, size=shape)
        support = start + f.support_width * rng.uniform(size=(tasks, k, 1))
        query = rng.uniform(low, high, size=(tasks, self.queries, 1))
        x = np.concatenate([support, query], 1)
        clean = np.where(kind == LINE, slope * x + intercept, amplitude * np.sin(x - phase))
        y = clean + f.noise * rng.standard_normal(size=x.shape)
        info = {
            "kind": kind[:, 0, 0],
            "amplitude": amplitude[:, 0, 0],
            "phase": phase[:, 0, 0],
            "slope": slope[:, 0, 0],
            "intercept": intercept[:, 0, 0],
            "window": np.concatenate([start, start + f.support_width], 2)[:, 0],
            "clean": clean,
        }
        return x, y, info

    def fixed(self, tasks: int) -> tuple[TaskBatch, dict[str, np.ndarray]]:
        """A fixed set of ``tasks`` tasks and their parameters: ``kind`` (:data:`SINE` or
        :data:`LINE`), ``amplitude``, ``phase``, ``slope``, ``intercept`` ``(T,)`` (both kinds'
        drawn for every task), the support ``window`` ``(T, 2)`` and the noise-free targets
        ``clean`` ``(T, K + Q, 1)``. Task i depends only on (seed, i)."""
        return self.fixed_set(tasks)

    def function(self, info: dict[str, np.ndarray], task: int, x: np.ndarray) -> np.ndarray:
        if info["kind"][task] == LINE:
            return info["slope"][task] * x + info["intercept"][task]
        return info["amplitude"][task] * np.sin(x - info["phase"][task])


# The regression families by ``config.data``.
FAMILIES: dict[str, type[_TaskStream]] = {"sinusoid": SinusoidTasks, "ambiguous": AmbiguousTasks}

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

:class:`ARML2DTasks` is ARML's 2-D regression (Yao et al. 2020): six families of functions of
``(x, y)``, four of them on the ``y = 1`` subspace, with noisy targets.
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
    implements ``_draw(rng, tasks) -> (x, y, parameters)``, inputs ``(T, K + Q, input_dim)``
    and targets ``(T, K + Q, 1)`` (support first) and a dict of per-task arrays."""

    input_dim = 1  # the width of an input point (a network's first layer)

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


# -- ARML's 2-D regression (Yao et al. 2020) ------------------------------------------------------

# The six families of ARML's 2-D regression, by the id each task carries (``info["family"]``).
ARML_2D_FAMILIES = ("sinusoid", "line", "quadratic", "cubic", "quadratic surface", "ripple")
# The range of every parameter, U[low, high] (huaxiuyao/ARML, data_generator.generate_2D_batch;
# the shared PAPERS.md §9): sinusoid a sin(w x + b); line a x + b; quadratic a x^2 + b x + c;
# cubic a x^3 + b x^2 + c x + d; quadratic surface a x^2 + b y^2; ripple sin(-a (x^2 + y^2)) + b.
ARML_2D_RANGES = {
    "amplitude": (0.1, 5.0),
    "phase": (0.0, 2 * float(np.pi)),
    "frequency": (0.8, 1.2),
    "line_a": (-3.0, 3.0),
    "line_b": (-3.0, 3.0),
    "quadratic_a": (-0.2, 0.2),
    "quadratic_b": (-2.0, 2.0),
    "quadratic_c": (-3.0, 3.0),
    "cubic_a": (-0.1, 0.1),
    "cubic_b": (-0.2, 0.2),
    "cubic_c": (-2.0, 2.0),
    "cubic_d": (-3.0, 3.0),
    "surface_a": (-1.0, 1.0),
    "surface_b": (-1.0, 1.0),
    "ripple_a": (-0.2, 0.2),
    "ripple_b": (-3.0, 3.0),
}
ON_LINE = 4  # families 0..3 live in the y = 1 subspace (their second input is 1)


@dataclass(frozen=True)
class ARML2DFamily:
    """The input range and noise of ARML's 2-D regression. The official code draws both inputs
    from U[-5, 5] (the paper says [0, 5]: we follow the code) and adds N(0, 0.3^2) to every
    target."""

    x_range: tuple[float, float] = (-5.0, 5.0)
    noise: float = 0.3


def arml_2d_function(
    family: np.ndarray, parameters: dict[str, np.ndarray], x: np.ndarray
) -> np.ndarray:
    """The noise-free targets ``(T, n, 1)`` of tasks of families ``family`` ``(T,)`` with
    ``parameters`` ``{name: (T,)}`` at inputs ``x`` ``(T, n, 2)``; the 1-D families read the
    first coordinate only."""
    p = {name: v[:, None, None] for name, v in parameters.items()}
    u, v = x[..., :1], x[..., 1:2]
    outputs = (
        p["amplitude"] * np.sin(p["frequency"] * u + p["phase"]),
        p["line_a"] * u + p["line_b"],
        p["quadratic_a"] * u**2 + p["quadratic_b"] * u + p["quadratic_c"],
        p["cubic_a"] * u**3 + p["cubic_b"] * u**2 + p["cubic_c"] * u + p["cubic_d"],
        p["surface_a"] * u**2 + p["surface_b"] * v**2,
        np.sin(-p["ripple_a"] * (u**2 + v**2)) + p["ripple_b"],
    )
    return np.choose(family[:, None, None], outputs)


class ARML2DTasks(_TaskStream):
    """Seeded batches of ARML's 2-D regression tasks (Yao et al. 2020, the shared PAPERS.md §9):
    each task is one of :data:`ARML_2D_FAMILIES`, uniformly, with parameters from
    :data:`ARML_2D_RANGES`, inputs ``(x, y)`` from ``family.x_range`` squared, ``y = 1`` for the
    four 1-D families, and targets with Gaussian noise of std ``family.noise``. A fixed set's
    info holds ``family`` ``(T,)``, every parameter ``(T,)`` (all drawn for every task, so the
    stream advances by a fixed amount) and ``clean`` ``(T, K + Q, 1)``.

    Args:
        shots: support points per task (K; the paper: 10).
        queries: query points per task (the code: 10).
        seed: the generator's seed.
        family: the input range and noise.
    """

    input_dim = 2

    def __init__(
        self, shots: int, queries: int, seed: int = 0, family: ARML2DFamily = ARML2DFamily()
    ) -> None:
        low, high = family.x_range
        if not low < high or family.noise < 0:
            raise ConfigError(
                f"x_range={family.x_range}, noise={family.noise}: use low < high and noise >= 0"
            )
        super().__init__(shots, queries, seed, family)

    def _draw(
        self, rng: np.random.Generator, tasks: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        f = self.family
        family = rng.integers(0, len(ARML_2D_FAMILIES), size=tasks)
        parameters = {
            name: rng.uniform(low, high, size=tasks) for name, (low, high) in ARML_2D_RANGES.items()
        }
        x = rng.uniform(*f.x_range, size=(tasks, self.shots + self.queries, 2))
        x[family < ON_LINE, :, 1] = 1.0
        clean = arml_2d_function(family, parameters, x)
        y = clean + f.noise * rng.standard_normal(size=clean.shape)
        return x, y, {"family": family, **parameters, "clean": clean}

    def function(self, info: dict[str, np.ndarray], task: int, x: np.ndarray) -> np.ndarray:
        one = {name: info[name][task : task + 1] for name in ARML_2D_RANGES}
        return arml_2d_function(info["family"][task : task + 1], one, x[None])[0]


FAMILIES["arml-2d"] = ARML2DTasks

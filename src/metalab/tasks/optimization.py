"""Optimisation problems for learned optimizers (Andrychowicz et al. 2016, Sec. 3).

Each problem family is a loss of *flat* parameters, ``loss(theta, step) -> (n,)`` for a batch of
``n`` problems ``theta: (n, d)``, so an optimizer (learned or hand-designed) drives it functionally.

* ``quadratic``: f(theta) = ||W theta - y||^2 with W (10x10), y (10) i.i.d. Gaussian (Sec. 3.1);
  theta_0 ~ N(0, 0.01^2) as in the official code.
* ``mnist``: an MLP with one hidden layer of 20 sigmoid units, cross-entropy on minibatches of 128
  MNIST training images, 100 steps (Sec. 3.2); weights and biases ~ N(0, 0.01^2).
* the paper's generalisation variants (Fig. 4): ``mnist-40`` (40 hidden units), ``mnist-2layer``
  (two hidden layers of 20), ``mnist-200steps`` (200 steps), ``mnist-relu`` (ReLU units).

Problem ``i`` of a stream depends only on ``(stream, seed, i)``, so fixed test problems never move
when a training stream advances. CIFAR-10 is not implemented.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalab.errors import ConfigError, DataError

STREAMS = {"train": 0, "val": 1, "test": 2}
MINIBATCH = 128
SHARED = ("images", "labels")  # data held once for all MNIST problems, not per problem


@dataclass(frozen=True)
class Family:
    """A problem family: ``hidden=()`` is the quadratic, else an MNIST MLP with those layers."""

    name: str
    steps: int  # optimisation steps per trajectory
    hidden: tuple[int, ...] = ()
    activation: str = "sigmoid"
    dims: int = 10  # quadratic only

    @property
    def is_mnist(self) -> bool:
        return bool(self.hidden)

    @property
    def layer_sizes(self) -> list[int]:
        return [28 * 28, *self.hidden, 10]

    @property
    def num_params(self) -> int:
        if not self.is_mnist:
            return self.dims
        sizes = self.layer_sizes
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


FAMILIES = {
    f.name: f
    for f in (
        Family("quadratic", 100),
        Family("mnist", 100, (20,)),
        Family("mnist-40", 100, (40,)),
        Family("mnist-2layer", 100, (20, 20)),
        Family("mnist-200steps", 200, (20,)),
        Family("mnist-relu", 100, (20,), "relu"),
    )
}
GENERALISATION = {"quadratic": ("quadratic",), "mnist": tuple(n for n in FAMILIES if "mnist" in n)}


def get_family(name: str) -> Family:
    if name == "cifar10":
        raise DataError("CIFAR-10 problems are not implemented in metalab: use quadratic or mnist")
    if name not in FAMILIES:
        raise ConfigError(f"unknown problem family {name!r}: use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


@functools.lru_cache(maxsize=2)
def _mnist_train(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    from metalab.data.mnist import load_mnist

    images, labels = load_mnist(Path(root), train=True, download=False)
    flat = torch.from_numpy(images.reshape(len(images), -1))  # (60000, 784) uint8
    return flat, torch.from_numpy(labels)


@functools.lru_cache(maxsize=4)
def _shared_on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The MNIST images and labels every problem shares, moved to ``device`` once, not once per
    unroll (47 MB). Keyed by the tensor object, which the cache keeps alive."""
    return tensor.to(device)


def _generator(stream: str, seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([STREAMS[stream], seed, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class Problems:
    """``n`` problems of one family: ``theta0 (n, d)`` and ``loss(theta, step) -> (n,)``.

    Quadratics hold ``W (n, 10, 10)`` and ``y (n, 10)``; MNIST problems hold the training images
    (uint8, shared) and each problem's minibatch indices for every step, ``(n, steps, 128)``.
    """

    def __init__(self, family: Family, theta0, data: dict, key: tuple) -> None:
        self.family, self.theta0, self.data, self.key = family, theta0, data, key

    @property
    def n(self) -> int:
        return self.theta0.shape[0]

    @property
    def device(self) -> torch.device:
        return self.theta0.device

    def to(self, device) -> Problems:
        device = torch.device(device)
        if self.theta0.device == device:
            return self
        data = {
            k: _shared_on(v, device) if k in SHARED else v.to(device) for k, v in self.data.items()
        }
        return Problems(self.family, self.theta0.to(device), data, self.key)

    def repeat(self, times: int) -> Problems:
        """The same problems ``times`` times over, ``(times * n, d)`` (e.g. one per learning rate)."""
        data = {
            k: v if k in SHARED else v.repeat(times, *[1] * (v.dim() - 1))
            for k, v in self.data.items()
        }
        return Problems(self.family, self.theta0.repeat(times, 1), data, (*self.key, times))

    def loss(self, theta: torch.Tensor, step: int) -> torch.Tensor:
        """Each problem's loss at ``theta (n, d)`` (its minibatch of ``step`` for MNIST)."""
        if not self.family.is_mnist:
            residual = torch.bmm(self.data["W"], theta.unsqueeze(-1)).squeeze(-1) - self.data["y"]
            return residual.pow(2).sum(-1)
        index = self.data["batches"][:, step % self.data["batches"].shape[1]]  # (n, 128)
        x = self.data["images"][index].float() / 255.0  # (n, 128, 784)
        y = self.data["labels"][index]  # (n, 128)
        logits = mlp_forward(self.family, theta, x)  # (n, 128, 10)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return ce.view(self.n, -1).mean(-1)


def mlp_forward(family: Family, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The MLP of ``family`` with flat weights ``theta (n, d)`` on ``x (n, b, 784)``."""
    act = torch.sigmoid if family.activation == "sigmoid" else torch.relu
    sizes, offset, h = family.layer_sizes, 0, x
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = theta[:, offset : offset + a * b].view(-1, a, b)
        bias = theta[:, offset + a * b : offset + a * b + b].unsqueeze(1)
        offset += a * b + b
        h = torch.baddbmm(bias, h, w)
        if i < len(sizes) - 2:
            h = act(h)
    return h


def trajectory(problems: Problems, steps: int, update) -> torch.Tensor:
    """Run ``theta <- theta + update(grad, state, t)`` for ``steps`` steps from ``theta0``, with
    ``update(grad, state, t) -> (step, state)`` (``state`` None at first); returns each problem's
    loss at steps 0..steps, ``(n, steps + 1)``, without a graph."""
    theta, state, losses = problems.theta0, None, []
    for t in range(steps + 1):
        with torch.enable_grad():
            theta = theta.detach().requires_grad_(True)
            loss = problems.loss(theta, t)
            (grad,) = torch.autograd.grad(loss.sum(), theta)
        losses.append(loss.detach())
        if t < steps:
            with torch.no_grad():
                step, state = update(grad, state, t)
                theta = theta + step
    return torch.stack(losses, dim=1)


def make_problems(family: Family, stream: str, seed: int, indices, data_root=None) -> Problems:
    """Problems ``indices`` of the stream ``(stream, seed)``, stacked into one batch."""
    thetas, parts = [], []
    for i in indices:
        g = _generator(stream, seed, i)
        thetas.append(0.01 * torch.randn(family.num_params, generator=g))
        if family.is_mnist:
            parts.append(torch.randint(0, 60_000, (family.steps, MINIBATCH), generator=g))
        else:
            d = family.dims
            parts.append((torch.randn(d, d, generator=g), torch.randn(d, generator=g)))
    theta0 = torch.stack(thetas)
    if family.is_mnist:
        from metalab.data.root import data_root as default_root

        images, labels = _mnist_train(str(data_root or default_root()))
        data = {"images": images, "labels": labels, "batches": torch.stack(parts)}
    else:
        data = {"W": torch.stack([w for w, _ in parts]), "y": torch.stack([y for _, y in parts])}
    return Problems(family, theta0, data, (stream, seed, tuple(indices)))


@dataclass
class Unroll:
    """One truncated-BPTT unroll: steps ``[start, start + length)`` of ``problems``' trajectory."""

    problems: Problems
    start: int
    length: int

    def to(self, device) -> Unroll:
        return Unroll(self.problems.to(device), self.start, self.length)


class ProblemSampler:
    """A seeded stream of problems, handed out one unroll at a time (the trainer's "episode").

    A trajectory of ``family.steps`` steps is ``steps / unroll`` consecutive unrolls of the same
    problems; then the next draw of ``per_draw`` problems starts. The state is two counters;
    :meth:`set_state` rewinds to the start of the current trajectory (a resumed run restarts it,
    as the optimizee state is not checkpointed).
    """

    def __init__(
        self,
        family: Family,
        stream: str,
        seed: int,
        per_draw: int,
        unroll: int,
        data_root=None,
    ) -> None:
        if family.steps % unroll:
            raise ConfigError(f"unroll {unroll} does not divide the {family.steps} steps")
        self.family, self.stream, self.seed = family, stream, seed
        self.per_draw, self.unroll, self.data_root = per_draw, unroll, data_root
        self.draw, self.position = 0, 0
        self._current: Problems | None = None
        if family.is_mnist:
            self.fixed(1)  # fail now, with a DataError, when MNIST is absent

    def sample(self) -> Unroll:
        if self._current is None or self.position == 0:
            first = self.draw * self.per_draw
            indices = range(first, first + self.per_draw)
            self._current = make_problems(
                self.family, self.stream, self.seed, indices, self.data_root
            )
        out = Unroll(self._current, self.position * self.unroll, self.unroll)
        self.position += 1
        if self.position * self.unroll >= self.family.steps:
            self.draw, self.position = self.draw + 1, 0
        return out

    def sample_batch(self, n: int) -> Unroll:
        if n != 1:
            raise ConfigError("l2o batches problems inside a draw: keep meta_batch = 1")
        return self.sample()

    def fixed(self, count: int, family: Family | None = None) -> Problems:
        """Problems ``0..count-1`` of this stream (of ``family``, default the sampler's)."""
        return make_problems(
            family or self.family, self.stream, self.seed, range(count), self.data_root
        )

    def state(self) -> dict:
        return {"draw": self.draw, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.draw, self.position, self._current = state["draw"], 0, None

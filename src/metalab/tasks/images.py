"""Unlabelled minibatches of images: what an unsupervised embedding (autoencoder, GAN, contrastive
encoder) trains on before CACTUs builds tasks from it (:mod:`metalab.tasks.cactus`).

An :class:`ImageBatches` stream draws ``batch`` images uniformly without replacement within a
batch from a :class:`~metalab.data.fewshot.FewShotDataset`, never reading its labels; like every
task stream it is a seeded NumPy PCG64 generator whose state goes into checkpoints, so the
trainer's loop (:mod:`metalab.train`) runs it as it runs episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError


@dataclass
class Images:
    """A minibatch of images ``(B, C, H, W)`` float32 in [0, 1], without labels."""

    x: torch.Tensor

    def to(self, device: torch.device | str) -> Images:
        return Images(self.x.to(device, non_blocking=True))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.x,)


class ImageBatches:
    """Seeded minibatches of a dataset's images, labels unused.

    Args:
        dataset: where the images come from.
        batch: images per minibatch (``sample()``); ``sample_batch(n)`` gives ``n * batch``.
        seed: the generator's seed.
    """

    def __init__(self, dataset: FewShotDataset, batch: int, seed: int = 0) -> None:
        n = len(dataset.images)
        if not 1 <= batch <= n:
            raise ConfigError(f"batch={batch}: {dataset.name} has {n} images: use --batch 1..{n}")
        self.dataset, self.batch, self.seed = dataset, batch, seed
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self) -> Images:
        """The next ``batch`` images, distinct."""
        return self.sample_batch(1)

    def sample_batch(self, batches: int) -> Images:
        """The next ``batches * batch`` images (distinct within each minibatch), as one batch."""
        n = len(self.dataset.images)
        index = np.concatenate(
            [self.rng.choice(n, self.batch, replace=False) for _ in range(batches)]
        )
        return Images(self.dataset.gather(index))

    def fixed(self, images: int) -> Images:
        """A fixed set of ``images`` images (the first of a seeded permutation), for validation:
        independent of the stream, and a shorter set is a prefix of a longer one."""
        order = np.random.Generator(np.random.PCG64([self.seed, 1])).permutation(
            len(self.dataset.images)
        )
        return Images(self.dataset.gather(order[:images]))

    def state(self) -> dict:
        """The generator state, to checkpoint."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

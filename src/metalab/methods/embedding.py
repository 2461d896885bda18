"""What every unsupervised embedding shares (ACAI, BiGAN, the contrastive encoder): it trains on
unlabelled minibatches of the meta-training images (:class:`~metalab.tasks.images.ImageBatches`)
through the same trainer as every method (checkpoints, resume, ``--minutes``, logs), maps images
to vectors with :meth:`EmbeddingMethod.encode`, and ``metalab eval RUN`` scores it with the
embedding baselines of CACTUs (Hsu et al. 2019: 1-NN, logistic regression, MLP, cluster matching)
on labelled test episodes. :func:`embeddings_of` embeds a dataset with a run's weights, cached in
the run directory, for :mod:`metalab.tasks.cactus` to cluster.

Training never reads a label: validation (what picks ``best.pt``) is the method's own
unsupervised loss on fixed images of the ``val`` part (:meth:`EmbeddingMethod.validation_loss`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.methods.base import Method, MethodConfig
from metalab.tasks.images import ImageBatches, Images


@dataclass
class EmbeddingConfig(MethodConfig):
    """Settings every embedding shares: Omniglot's CACTUs split, minibatches of images.

    ``episodes`` counts minibatches (optimizer steps) and ``val_episodes`` the fixed validation
    images; the few-shot fields (ways, shots, ...) are not used in training."""

    split: str = "cactus"
    batch: int = 64  # images per minibatch
    val_episodes: int = 2000  # validation images (fixed), scored by the unsupervised loss
    val_every: int = 1000


class EmbeddingMethod(Method):
    """Base class of the unsupervised embeddings: subclasses implement :meth:`encode`,
    :meth:`meta_step` (or ``meta_loss``) on an :class:`~metalab.tasks.images.Images` batch and
    :meth:`validation_loss`, and set :attr:`embedding_dim`."""

    Config = EmbeddingConfig
    answers = frozenset()  # no few-shot predict: `metalab eval` runs the embedding baselines
    embedding_dim: int

    @classmethod
    def task_sampler(cls, config: EmbeddingConfig, part: str, data_root=None) -> ImageBatches:
        """Unlabelled minibatches of the training part; fixed images of the ``val`` part."""
        from metalab.data.datasets import load_dataset

        name = config.train_part if part == "train" else "val"
        dataset = load_dataset(config.data, config.split, name, config.image_size, data_root)
        return ImageBatches(dataset, config.batch, seed=config.seed)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(n, embedding_dim)`` of images ``(n, C, H, W)`` in [0, 1]."""
        raise NotImplementedError

    def validation_loss(self, images: Images) -> float:
        """The unsupervised loss on fixed validation images (lower is better)."""
        raise NotImplementedError

    def validation_score(self, sampler: ImageBatches, episodes: int, device) -> float:
        """Minus :meth:`validation_loss` on ``episodes`` fixed images of the val part."""
        images = sampler.fixed(min(episodes, len(sampler.dataset.images))).to(device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return -float(self.validation_loss(images))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def embed(self, dataset: FewShotDataset, device=None, chunk: int = 1000) -> np.ndarray:
        """Every image of ``dataset`` embedded, float32 ``(n, embedding_dim)``, in dataset order."""
        device = device or next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            parts = []
            for start in range(0, len(dataset.images), chunk):
                index = np.arange(start, min(start + chunk, len(dataset.images)))
                parts.append(self.encode(dataset.gather(index).to(device)).float().cpu())
            return torch.cat(parts).numpy()
        finally:
            self.train(was_training)

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """``metalab eval RUN``: the embedding baselines on labelled test episodes."""
        from metalab.evaluate.embedding import report_embedding

        report_embedding(self, Path(run_dir), episodes=episodes, device=device, data_root=data_root)
        return True


def embeddings_of(
    run_dir: Path | str,
    dataset: FewShotDataset,
    device=None,
    checkpoint: str = "best.pt",
) -> np.ndarray:
    """``dataset`` embedded by the embedding run in ``run_dir`` (its ``checkpoint``), float32
    ``(n, d)``. Cached in the run directory under the dataset's fingerprint and the checkpoint's
    hash, so a run trained further is embedded again."""
    from metalab.io import atomic_write
    from metalab.rundir import load_method

    run_dir = Path(run_dir)
    path = run_dir / checkpoint
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: --embedding takes the run directory of an embedding "
            "(e.g. `metalab train acai --recipe omniglot --run-dir runs/acai-omniglot`)"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    cached = run_dir / f"embeddings-{dataset.fingerprint()}-{digest}.npy"
    if cached.exists():
        try:
            z = np.load(cached)
            if z.shape[0] == len(dataset.images):
                return z
        except (OSError, ValueError):
            pass  # damaged: embedded again below
    method, _ = load_method(path)
    if not isinstance(method, EmbeddingMethod):
        raise ConfigError(
            f"{run_dir} holds a {method.name} run, not an embedding: pass the run directory of "
            "`metalab train acai | bigan | simclr`"
        )
    if device is not None:
        method.to(device)
    z = method.embed(dataset, device)
    atomic_write(cached, lambda f: np.save(f, z))
    return z

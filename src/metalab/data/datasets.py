"""Datasets by name, as the CLI and the trainer ask for them: ``(data, split, part) -> FewShotDataset``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metalab.data.fewshot import FewShotDataset
from metalab.data.root import data_root
from metalab.errors import ConfigError

DATASETS = ("omniglot", "mnist", "miniimagenet", "cub", "omni-art-multi")


def load_dataset(
    data: str, split: str, part: str, size: int = 28, root: Path | str | None = None
) -> FewShotDataset:
    """A class split of a dataset.

    Args:
        data: ``omniglot`` (splits ``vinyals`` and ``lake``), ``mnist`` (split ``standard``: parts
            ``train`` = the 60k training images, ``test`` = the 10k test images), ``miniimagenet``
            (split ``ravi``) or ``cub`` (split ``reed``: image features and class attributes for
            zero-shot learning, an :class:`~metalab.data.cub.AttributeDataset`) or
            ``omni-art-multi`` (split ``art4``: our substitute for ARML's Art-Multi, 4 Omniglot
            alphabet groups x 3 filters = 12 sub-datasets; :mod:`metalab.data.artmulti`).
        split: the class split.
        part: ``train``, ``val``, ``trainval`` or ``test``.
        size: image side (not used by ``cub``, whose examples are feature vectors).
        root: data root override (``--data-root``).
    """
    root = data_root(root)
    if data == "omniglot":
        from metalab.data.omniglot import omniglot

        return omniglot(split, part, root, size)
    if data == "mnist":
        from metalab.data.mnist import load_mnist

        if part not in ("train", "test"):
            raise ConfigError(f"MNIST has parts train and test, not {part!r}")
        images, labels = load_mnist(root, train=part == "train")
        if size != 28:
            images = _resize(images, size)
        return FewShotDataset(
            _as_tensor(images[:, None]),
            labels.astype(np.int64),
            [str(d) for d in range(10)],
            name=f"mnist/{part}",
        )
    if data == "miniimagenet":
        from metalab.data.miniimagenet import load_miniimagenet

        images, labels, names = load_miniimagenet(root, part, size)
        return FewShotDataset(_as_tensor(images), labels, names, name=f"miniimagenet/ravi/{part}")
    if data == "cub":
        from metalab.data.cub import load_cub

        return load_cub(root, split, part)
    if data == "omni-art-multi":
        from metalab.data.artmulti import omni_art_multi

        return omni_art_multi(split, part, root, size)
    raise ConfigError(f"unknown dataset {data!r}: use one of {', '.join(DATASETS)}")


def _as_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS))
            for im in images
        ]
    )

"""MNIST from the four standard idx ``.gz`` files under ``<root>/mnist/``."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from metalab.data.download import mirror_urls, require, resource
from metalab.errors import DataError

_IMAGES_MAGIC = 0x803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x801  # unsigned bytes, 1 dimension


def load_mnist(root: Path, train: bool, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST training (60000) or test (10000) set.

    Args:
        root: The data root; files are read from ``root/mnist/``.
        train: The training set if True, else the test set.
        download: Download missing files from the public mirrors.

    Returns:
        ``(images, labels)``: uint8 ``(n, 28, 28)`` and int64 ``(n,)`` with values 0..9.

    Raises:
        DataError: A file is missing and not downloadable, or corrupt or truncated.
    """
    prefix = "train" if train else "t10k"
    images = _read_idx(Path(root), f"mnist/{prefix}-images-idx3-ubyte.gz", _IMAGES_MAGIC, download)
    labels = _read_idx(Path(root), f"mnist/{prefix}-labels-idx1-ubyte.gz", _LABELS_MAGIC, download)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(
            f"MNIST {prefix} files disagree: images {images.shape}, labels {labels.shape}; "
            f"delete {Path(root) / 'mnist'}/{prefix}-* so they are downloaded again"
        )
    if labels.size and labels.max() > 9:
        raise _corrupt(Path(root), f"mnist/{prefix}-labels-idx1-ubyte.gz", "label above 9")
    return images, labels.astype(np.int64)


def _read_idx(root: Path, rel: str, magic: int, download: bool) -> np.ndarray:
    """Parse one gzipped idx file of unsigned bytes, checking its header against its size."""
    path = require(resource(rel), root, download=download)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise _corrupt(root, rel, f"not a complete gzip file: {err}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise _corrupt(root, rel, f"not an idx file with magic {magic:#x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise _corrupt(root, rel, f"{len(data) - header} data bytes for shape {shape}")
    # Copy: frombuffer over bytes is read-only, and callers may normalise in place.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _corrupt(root: Path, rel: str, what: str) -> DataError:
    res = resource(rel)
    return DataError(
        f"corrupt {root / rel} ({what}); delete it so it is downloaded again, "
        f"or get it from {mirror_urls(res)[0]} and put it in {(root / rel).parent}/"
    )

"""MNIST: the real files (counts from shared/data/MANIFEST.md) and corrupt or truncated copies."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from metalab.data.mnist import load_mnist
from metalab.errors import DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.realdata
def test_real_train_set(mnist_root):
    images, labels = load_mnist(mnist_root, train=True, download=False)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == TRAIN_COUNTS
    assert images.mean() / 255 == pytest.approx(0.1307, abs=5e-5)


@pytest.mark.realdata
def test_real_test_set(mnist_root):
    images, labels = load_mnist(mnist_root, train=False, download=False)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == TEST_COUNTS
    assert images.mean() / 255 == pytest.approx(0.1325, abs=5e-5)


def _write_idx(path, magic: int, shape: tuple[int, ...], data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{len(shape)}I", magic, *shape) + data)


@pytest.fixture
def tiny_root(tmp_path):
    """A valid 5-image test set in the real file format."""
    rng = np.random.default_rng(0)
    _write_idx(
        tmp_path / "mnist/t10k-images-idx3-ubyte.gz",
        0x803,
        (5, 28, 28),
        rng.integers(0, 256, 5 * 28 * 28, dtype=np.uint8).tobytes(),
    )
    _write_idx(tmp_path / "mnist/t10k-labels-idx1-ubyte.gz", 0x801, (5,), bytes([3, 1, 4, 1, 5]))
    return tmp_path


def test_tiny_valid_files(tiny_root):
    images, labels = load_mnist(tiny_root, train=False, download=False)
    assert images.shape == (5, 28, 28) and labels.tolist() == [3, 1, 4, 1, 5]
    images[0, 0, 0] = 7  # writable, so callers may normalise in place


def test_truncated_gzip_is_a_data_error(tiny_root):
    path = tiny_root / "mnist/t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*delete it"):
        load_mnist(tiny_root, train=False, download=False)


def test_idx_shorter_than_its_header_says(tiny_root):
    _write_idx(tiny_root / "mnist/t10k-labels-idx1-ubyte.gz", 0x801, (6,), bytes([3, 1, 4, 1, 5]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_mnist(tiny_root, train=False, download=False)


def test_wrong_magic(tiny_root):
    _write_idx(tiny_root / "mnist/t10k-labels-idx1-ubyte.gz", 0x803, (5,), bytes(5))
    with pytest.raises(DataError, match="magic 0x801"):
        load_mnist(tiny_root, train=False, download=False)


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DataError, match="missing mnist/t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, train=False, download=False)

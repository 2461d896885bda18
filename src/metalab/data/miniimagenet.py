"""miniImageNet in the Ravi & Larochelle layout, decoded once and cached as arrays.

Layout under the data root::

    miniimagenet/train.csv, val.csv, test.csv   header "filename,label"
    miniimagenet/images/<filename>              e.g. n0153282900000005.jpg

There is no download: the images come from ImageNet, under ImageNet's terms of use.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track

from metalab.data.root import cache_dir
from metalab.errors import ConfigError, DataError
from metalab.io import atomic_file

SPLITS = ("train", "val", "test")
_CSV_HEADER = ["filename", "label"]
# Bump when the decoding changes, so old caches are not reused.
_CACHE_VERSION = 1
_HOW_TO = (
    "put the Ravi & Larochelle split CSVs (train.csv, val.csv, test.csv from "
    "github.com/jakesnell/prototypical-networks, data/miniImagenet/splits/ravi/) and the images "
    "(from ImageNet, under its terms; metalab cannot download them) at "
    "{folder}/{{images/,train.csv,val.csv,test.csv}}"
)


def load_miniimagenet(
    root: Path, split: str, size: int = 84
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One miniImageNet split as arrays, resized to ``size`` x ``size``.

    The first call decodes every image (slow) and caches the arrays in ``cache_dir()``; later
    calls with the same split, size, CSV and image files load the cache.

    Args:
        root: The data root; files are read from ``root/miniimagenet/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: Side of the square RGB images.

    Returns:
        ``(images, labels, class_names)``: uint8 ``(n, 3, size, size)``, int64 ``(n,)`` indexing
        ``class_names`` (the CSV's labels, e.g. WordNet ids, sorted).

    Raises:
        ConfigError: Unknown split or a non-positive size.
        DataError: The folder, CSV or an image it names is missing or unreadable.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown miniImageNet split {split!r}; use one of {', '.join(SPLITS)}")
    if size < 1:
        raise ConfigError(f"miniImageNet image size must be positive, got {size}")
    folder = Path(root) / "miniimagenet"
    csv_path = folder / f"{split}.csv"
    if not csv_path.is_file():
        missing = folder if not folder.is_dir() else csv_path
        raise DataError(f"missing {missing}: " + _HOW_TO.format(folder=folder))
    csv_bytes = csv_path.read_bytes()
    filenames, labels_text = _parse_csv(csv_path, csv_bytes)
    image_paths = [folder / "images" / name for name in filenames]

    key = _cache_key(split, size, csv_bytes, image_paths, folder)
    cached = cache_dir() / f"miniimagenet-{split}-{size}-{key}.npz"
    if cached.is_file():
        with np.load(cached) as arrays:
            return arrays["images"], arrays["labels"], arrays["class_names"].tolist()

    class_names = sorted(set(labels_text))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[label] for label in labels_text], dtype=np.int64)
    images = _decode_all(image_paths, size)
    _save(cached, images=images, labels=labels, class_names=np.array(class_names))
    return images, labels, class_names


def _parse_csv(path: Path, data: bytes) -> tuple[list[str], list[str]]:
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    if not rows or [cell.strip() for cell in rows[0]] != _CSV_HEADER:
        raise DataError(f"{path} must start with the header 'filename,label'; is it a split CSV?")
    body = [row for row in rows[1:] if row]
    for number, row in enumerate(body, start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path} line {number}: expected 'filename,label', got {row!r}")
    if not body:
        raise DataError(f"{path} lists no images; replace it with the Ravi & Larochelle split CSV")
    return [row[0].strip() for row in body], [row[1].strip() for row in body]


def _cache_key(
    split: str, size: int, csv_bytes: bytes, image_paths: list[Path], folder: Path
) -> str:
    """Hash of everything the arrays depend on; stat-ing the images also finds missing ones."""
    digest = hashlib.sha256(f"v{_CACHE_VERSION}|{split}|{size}|".encode())
    digest.update(csv_bytes)
    for path in image_paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(
                f"missing image {path} (listed in {folder / split}.csv); "
                f"copy it from ImageNet into {path.parent}/"
            ) from None
        digest.update(f"|{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _decode_all(paths: list[Path], size: int) -> np.ndarray:
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    steps = track(
        paths,
        description=f"decoding {len(paths)} miniImageNet images",
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    for i, path in enumerate(steps):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as err:  # includes UnidentifiedImageError and truncated files
            raise DataError(f"unreadable image {path} ({err}); replace it from ImageNet") from None
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.LANCZOS)
        images[i] = np.asarray(rgb).transpose(2, 0, 1)
    return images


def _save(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically, then drop caches of the same split and size made from other files."""
    with atomic_file(path) as f:
        np.savez(f, **arrays)
    stem = path.name.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{stem}-*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)

"""CUB-200-2011 for zero-shot learning: image features, class attributes and Reed et al.'s split.

Snell et al. 2017 (§3.3) classify bird images from classes never seen in training by comparing
them to prototypes computed from each class's 312 continuous attributes. CUB is not redistributable
and metalab cannot download it; the loader reads these files under the data root::

    cub/CUB_200_2011/classes.txt            "<class_id> <class_name>", ids 1..200,
                                            e.g. "1 001.Black_footed_Albatross"
    cub/CUB_200_2011/images.txt             "<image_id> <relative path>", 11,788 lines
    cub/CUB_200_2011/image_class_labels.txt "<image_id> <class_id>", one line per image
    cub/CUB_200_2011/attributes/class_attribute_labels_continuous.txt
                                            200 rows (class id order) x 312 space-separated
                                            values in [0, 100] (% of images showing the attribute)
    cub/splits/reed/trainclasses.txt        Reed et al. 2016's class split, one class name per
    cub/splits/reed/valclasses.txt          line as in classes.txt (100 / 50 / 50 classes; the
    cub/splits/reed/testclasses.txt         test 50 are Akata et al.'s unseen classes)
    cub/features/googlenet-1024.npy         float32 image features, one row per line of
                                            images.txt in that order: (11788, D), or
                                            (11788, crops, D) with crop 0 the middle crop

``CUB_200_2011/`` is the official archive ``CUB_200_2011.tgz`` from
https://www.vision.caltech.edu/datasets/cub_200_2011/ extracted into ``cub/`` (``images/`` is not
read). The split files are ``trainclasses.txt``, ``valclasses.txt`` and ``testclasses.txt`` of the
CUB data ("birds") linked from https://github.com/reedscot/cvpr2016 (its ``trainvalclasses.txt`` is
not needed: ``trainval`` is train + val). Xian et al.'s xlsa17 package has files with the same names
for a different ("proposed") split: do not use those here.

Features. The paper used 1024-d GoogLeNet features of 10 crops of each image (the middle and four
corners, and their horizontal flips; Reed et al.'s ``images/*.t7``), training on all 10 and testing
on the middle crop. Any extractor works: run it over the images in ``images.txt`` order and save one
float32 ``.npy`` (e.g. torchvision's ImageNet GoogLeNet, the 1024-d output of global average pooling;
for crops, ``TenCrop`` with the centre crop moved to index 0). ``D`` is read from the file; a width
other than 1024 needs the method's ``feature_dim`` set to match. With crops, the ``train`` and
``trainval`` parts draw a random crop per query in training and every other part uses crop 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError, DataError

SPLITS = {"reed": ("train", "val", "trainval", "test")}
ATTRIBUTES = 312  # continuous attributes per class in the official file
CUB_DIR = "cub/CUB_200_2011"
CLASSES = f"{CUB_DIR}/classes.txt"
IMAGES = f"{CUB_DIR}/images.txt"
IMAGE_LABELS = f"{CUB_DIR}/image_class_labels.txt"
CLASS_ATTRIBUTES = f"{CUB_DIR}/attributes/class_attribute_labels_continuous.txt"
SPLIT_FILES = {part: f"cub/splits/reed/{part}classes.txt" for part in ("train", "val", "test")}
FEATURES = "cub/features/googlenet-1024.npy"
RANDOM_CROP_PARTS = ("train", "trainval")

_GET_CUB = (
    "CUB-200-2011 cannot be downloaded by metalab: get CUB_200_2011.tgz from "
    "https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it into {root}/cub/"
)
_GET_SPLIT = (
    "put Reed et al. 2016's trainclasses.txt, valclasses.txt and testclasses.txt (the CUB data "
    "linked from https://github.com/reedscot/cvpr2016) in {root}/cub/splits/reed/"
)
_GET_FEATURES = (
    "save float32 image features, one row per line of images.txt in its order, shape "
    "(images, D) or (images, crops, D) with the middle crop first, as {path} "
    "(see the metalab.data.cub docstring; the paper used 1024-d GoogLeNet features)"
)


@dataclass
class AttributeDataset(FewShotDataset):
    """Precomputed image features grouped by class, with an attribute vector per class.

    ``images`` holds float32 features ``(n, crops, D)``; an example index into ``gather`` is a view
    ``image * crops + crop`` (crop 0: the middle crop), so an episode's indices say which crop.

    Attributes:
        attributes: float32 ``(classes, A)`` class meta-data, row ``c`` for ``class_names[c]``.
        random_crop: whether training episodes draw a random crop per query (``train`` parts).
    """

    attributes: torch.Tensor
    random_crop: bool = False

    @property
    def features(self) -> torch.Tensor:
        """Float32 ``(n, crops, D)`` image features."""
        return self.images

    @property
    def crops(self) -> int:
        return self.images.shape[1]

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """Features ``(len(indices), D)`` of views ``image * crops + crop``, unchanged."""
        views = self.images.reshape(-1, self.images.shape[-1])
        if views.device.type == "cpu":  # NumPy indexing stays on this thread (see FewShotDataset)
            return torch.from_numpy(views.numpy()[indices])
        return views[torch.from_numpy(indices).to(views.device)]


def load_cub(root: Path | str, split: str = "reed", part: str = "train") -> AttributeDataset:
    """One part of Reed et al.'s zero-shot class split of CUB-200-2011.

    Args:
        root: the data root (files as in the module docstring).
        split: ``reed`` (100 train / 50 val / 50 test classes).
        part: ``train``, ``val``, ``trainval`` (train + val) or ``test``.

    Returns:
        An :class:`AttributeDataset` named ``cub/reed/<part>``: the part's classes in sorted name
        (= class id) order, labels ``0..classes-1``, features of their images and their attributes
        as in the file (0..100).

    Raises:
        ConfigError: unknown split or part.
        DataError: a file is missing, unreadable or inconsistent with the others.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown CUB split {split!r}: use one of {', '.join(SPLITS)}")
    if part not in SPLITS[split]:
        raise ConfigError(f"CUB {split} has parts {', '.join(SPLITS[split])}, not {part!r}")
    root = Path(root)
    class_names = _read_classes(root)
    image_labels = _read_image_labels(root, len(class_names))  # (images,) class index 0..199
    attributes = _read_attributes(root, len(class_names))
    parts = {name: _read_split(root, name, class_names) for name in SPLIT_FILES}
    _check_disjoint(root, parts)
    chosen = sorted(parts["train"] + parts["val"] if part == "trainval" else parts[part])

    features = _read_features(root, len(image_labels))
    relabel = np.full(len(class_names), -1, dtype=np.int64)
    relabel[chosen] = np.arange(len(chosen))
    rows = np.flatnonzero(relabel[image_labels] >= 0)
    picked = np.asarray(features[rows], dtype=np.float32)
    if not np.isfinite(picked).all():
        raise DataError(
            f"{root / FEATURES} holds NaN or infinite values: extract the features again"
        )
    if picked.ndim == 2:
        picked = picked[:, None]
    return AttributeDataset(
        torch.from_numpy(np.ascontiguousarray(picked)),
        relabel[image_labels[rows]],
        [class_names[c] for c in chosen],
        f"cub/{split}/{part}",
        attributes=torch.from_numpy(attributes[chosen]),
        random_crop=part in RANDOM_CROP_PARTS and picked.shape[1] > 1,
    )


def _require(root: Path, relative: str, how: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise DataError(f"missing {path}: {how.format(root=root, path=path)}")
    return path


def _rows(root: Path, relative: str, how: str) -> list[list[str]]:
    """The whitespace-separated fields of each non-blank line."""
    path = _require(root, relative, how)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"cannot read {path} ({type(err).__name__}): {how.format(root=root, path=path)}"
        ) from None
    return [line.split() for line in text.splitlines() if line.strip()]


def _id_table(root: Path, relative: str, kind: str) -> tuple[Path, list[str]]:
    """``"<id> <value>"`` lines with ids 1..n in order; returns the values."""
    path = root / relative
    rows = _rows(root, relative, _GET_CUB)
    for number, row in enumerate(rows, start=1):
        if len(row) != 2 or row[0] != str(number):
            raise DataError(
                f"{path} line {number}: expected '{number} <{kind}>', got {' '.join(row)!r}; "
                "replace it with the file from the official CUB_200_2011.tgz"
            )
    if not rows:
        raise DataError(f"{path} is empty; replace it with the file from the official archive")
    return path, [row[1] for row in rows]


def _read_classes(root: Path) -> list[str]:
    return _id_table(root, CLASSES, "class_name")[1]


def _read_image_labels(root: Path, n_classes: int) -> np.ndarray:
    """Class index (0-based) of every image, in ``images.txt`` order."""
    _, paths = _id_table(root, IMAGES, "image_path")
    labels_path, labels = _id_table(root, IMAGE_LABELS, "class_id")
    if len(labels) != len(paths):
        raise DataError(
            f"{labels_path} labels {len(labels)} images but {root / IMAGES} lists {len(paths)}; "
            "use both files from the same official CUB_200_2011.tgz"
        )
    ids = np.array([int(v) if v.isdigit() else 0 for v in labels], dtype=np.int64)
    bad = np.flatnonzero((ids < 1) | (ids > n_classes))
    if len(bad):
        raise DataError(
            f"{labels_path} line {bad[0] + 1}: class id {labels[bad[0]]!r} is not in "
            f"{root / CLASSES} (1..{n_classes})"
        )
    return ids - 1


def _read_attributes(root: Path, n_classes: int) -> np.ndarray:
    path = root / CLASS_ATTRIBUTES
    rows = _rows(root, CLASS_ATTRIBUTES, _GET_CUB)
    if len(rows) != n_classes:
        raise DataError(
            f"{path} has {len(rows)} rows, not one per class ({n_classes} in {root / CLASSES}); "
            "replace it with the file from the official CUB_200_2011.tgz"
        )
    for number, row in enumerate(rows, start=1):
        if len(row) != ATTRIBUTES:
            raise DataError(
                f"{path} row {number} has {len(row)} values, not {ATTRIBUTES}; "
                "replace it with the file from the official CUB_200_2011.tgz"
            )
    try:
        values = np.array(rows, dtype=np.float32)
    except ValueError:
        raise DataError(f"{path} holds values that are not numbers; replace it") from None
    if not np.isfinite(values).all():
        raise DataError(f"{path} holds NaN or infinite values; replace it with the official file")
    return values


def _read_split(root: Path, part: str, class_names: list[str]) -> list[int]:
    """Class indices listed in one Reed split file."""
    path = root / SPLIT_FILES[part]
    rows = _rows(root, SPLIT_FILES[part], _GET_SPLIT)
    for number, row in enumerate(rows, start=1):
        if len(row) != 1:
            raise DataError(
                f"{path} line {number}: expected one class name, got {' '.join(row)!r}; "
                + _GET_SPLIT.format(root=root)
            )
    names = [row[0] for row in rows]
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise DataError(
            f"{path} names class {unknown[0]!r}, which is not in {root / CLASSES}: use Reed et al.'s "
            "split files, whose lines are class names such as 001.Black_footed_Albatross"
        )
    if not names or len(set(names)) != len(names):
        raise DataError(f"{path} is empty or lists a class twice: {_GET_SPLIT.format(root=root)}")
    return [index[name] for name in names]


def _check_disjoint(root: Path, parts: dict[str, list[int]]) -> None:
    seen: dict[int, str] = {}
    for part, classes in parts.items():
        for c in classes:
            if c in seen:
                raise DataError(
                    f"{root / SPLIT_FILES[part]} shares classes with "
                    f"{root / SPLIT_FILES[seen[c]]}: zero-shot classes must be unseen; "
                    + _GET_SPLIT.format(root=root)
                )
            seen[c] = part


def _read_features(root: Path, n_images: int) -> np.ndarray:
    """The feature array, memory-mapped (the 10-crop file is ~480 MB; a part reads its rows)."""
    path = _require(root, FEATURES, _GET_FEATURES)
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(
            f"{path} is not a readable .npy array ({type(err).__name__}): "
            + _GET_FEATURES.format(path=path)
        ) from None
    if features.ndim not in (2, 3) or len(features) != n_images or features.shape[-1] < 1:
        raise DataError(
            f"{path} has shape {features.shape}, not ({n_images}, D) or ({n_images}, crops, D) "
            f"for the {n_images} images of {root / IMAGES}: " + _GET_FEATURES.format(path=path)
        )
    if not np.issubdtype(features.dtype, np.floating):
        raise DataError(f"{path} holds {features.dtype}, not floats: save float32 features")
    return features

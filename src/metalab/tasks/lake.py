"""Lake's 20 official one-shot classification runs (Lake, Salakhutdinov & Tenenbaum, Science 2015).

Each run is a 20-way within-alphabet task: ``runNN/training/classMM.png`` are the 20 classes (one
drawing each), ``runNN/test/itemKK.png`` the items to classify, and ``runNN/class_labels.txt`` maps
each test item to its class, one ``runNN/test/itemKK.png runNN/training/classMM.png`` per line.
The zip names no alphabet: :func:`run_alphabets` finds each run's by matching its drawings with
those of ``images_evaluation.zip`` (Lake's 20 runs are 10 evaluation alphabets x 2 runs).

:func:`load_runs` reads any zip in that layout in place, so other run sets can be scored the same
way; :mod:`metalab.evaluate.lake` scores them.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from metalab.data.omniglot import ARCHIVES, decode_png, load_archive
from metalab.errors import DataError

LABELS = "class_labels.txt"
SOURCE_URL = (
    "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
)


@dataclass
class LakeRun:
    """One one-shot run.

    Attributes:
        name: the run's folder, e.g. ``"run01"``.
        train: uint8 ``(classes, H, W)``, one drawing per class in sorted file order, ink = 255.
        test: uint8 ``(n_test, H, W)``, the items to classify in sorted file order, ink = 255.
        answers: int64 ``(n_test,)``, the index into ``train`` of each test item's class.
        train_files: archive paths of the training images, in the order of ``train``.
        test_files: archive paths of the test images, in the order of ``test``.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    answers: np.ndarray
    train_files: list[str]
    test_files: list[str]


def load_runs(path: Path, size: int | None = None) -> list[LakeRun]:
    """Read every run of a zip in Lake's ``all_runs.zip`` layout, sorted by run name.

    Args:
        path: the zip, e.g. ``<data root>/omniglot/all_runs.zip``.
        size: resize images to ``size x size`` (as :func:`decode_png`); ``None`` keeps 105x105.

    Raises:
        DataError: the zip is missing, unreadable, or not in the runs layout.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: download {SOURCE_URL} into {path.parent}")
    try:
        with zipfile.ZipFile(path) as archive:
            label_files = sorted(n for n in archive.namelist() if PurePosixPath(n).name == LABELS)
            if not label_files:
                raise DataError(
                    f"{path} holds no {LABELS}: it is not a set of one-shot runs in Lake's layout "
                    f"(runNN/{LABELS}, runNN/training/*.png, runNN/test/*.png)"
                )
            runs = [_read_run(archive, path, labels, size) for labels in label_files]
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(
            f"{path} is corrupt or truncated ({e}): delete it and download it again from {SOURCE_URL}"
        ) from e
    return sorted(runs, key=lambda run: run.name)


def _read_run(archive: zipfile.ZipFile, path: Path, labels: str, size: int | None) -> LakeRun:
    """One run from the folder holding ``labels``; paths in the label file are relative to the
    folder that holds the run folders, as in Lake's zip."""
    run_dir = PurePosixPath(labels).parent
    base = run_dir.parent
    members = set(archive.namelist())
    try:
        lines = archive.read(labels).decode().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {labels} is not a text file ({e})") from e
    pairs: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{path}: {labels} line {number} is not 'TEST_IMAGE TRAINING_IMAGE'")
        test, train = (str(base / name) for name in fields)
        for name in (test, train):
            if name not in members:
                raise DataError(
                    f"{path}: {labels} line {number} names {name}, which is not in the zip"
                )
        if test in pairs:
            raise DataError(f"{path}: {labels} lists {test} twice")
        pairs[test] = train
    training_dir = f"{run_dir}/training/"
    train_files = sorted(n for n in members if n.startswith(training_dir) and n.endswith(".png"))
    test_files = sorted(pairs)
    if not test_files:
        raise DataError(f"{path}: {labels} lists no test images")
    stray = sorted(set(pairs.values()) - set(train_files))
    if stray:
        raise DataError(
            f"{path}: {labels} names {stray[0]} as a class, which is not in {training_dir}"
        )
    index = {name: i for i, name in enumerate(train_files)}
    return LakeRun(
        name=run_dir.name,
        train=_decode_all(archive, path, train_files, size),
        test=_decode_all(archive, path, test_files, size),
        answers=np.array([index[pairs[name]] for name in test_files], dtype=np.int64),
        train_files=train_files,
        test_files=test_files,
    )


def _decode_all(
    archive: zipfile.ZipFile, path: Path, names: list[str], size: int | None
) -> np.ndarray:
    images = []
    for name in names:
        try:
            images.append(decode_png(archive.read(name), size))
        except OSError as e:  # PIL's UnidentifiedImageError and truncated-image errors
            raise DataError(f"{path}: {name} is not a readable PNG ({e})") from e
    if len({image.shape for image in images}) > 1:
        raise DataError(f"{path}: the images of {PurePosixPath(names[0]).parent} differ in size")
    return np.stack(images)


MATCH_SIZE = 28  # drawings are matched at this size (the cached size of the standard tables)


def run_alphabets(path: Path, root: Path) -> dict[str, str] | None:
    """The Omniglot alphabet of each run of the zip at ``path``, by run name.

    Found by content: every drawing of a run (training and test) must be a drawing of
    ``images_evaluation.zip`` under the data root ``root``, all of one alphabet.

    Returns:
        ``{"run01": "Atlantean", ...}``, or None when the evaluation archive is not under ``root``
        or some run's drawings are not all drawings of one of its alphabets (another run set).
    """
    if not (Path(root) / ARCHIVES["evaluation"]).is_file():
        return None
    images, characters = load_archive("evaluation", root, size=MATCH_SIZE, download=False)
    alphabets_of: dict[bytes, set[str]] = {}
    for drawings, character in zip(images, characters):
        for drawing in drawings:
            alphabets_of.setdefault(drawing.tobytes(), set()).add(character.split("/")[0])
    found = {}
    for run in load_runs(path, size=MATCH_SIZE):
        common = set.intersection(
            *(alphabets_of.get(image.tobytes(), set()) for image in (*run.train, *run.test))
        )
        if len(common) != 1:
            return None
        found[run.name] = common.pop()
    return found

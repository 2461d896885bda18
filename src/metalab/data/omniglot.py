"""Omniglot (Lake et al. 2015), read straight from the official zips.

Each archive (``images_background.zip``: 30 alphabets / 964 characters, ``images_evaluation.zip``:
20 / 659) is decoded once into a uint8 array ``(characters, 20, H, W)`` with ink = 255, and cached
on disk under a key made of the archive's sha256 and the image size, so later loads are a single
``np.load``. Local archives are validated by content (counts, every image decodes), so repacked copies
with other zip bytes are accepted; downloads are checked against the official checksums.

Two class splits are built on top:

* ``lake``: the background alphabets for learning, the evaluation alphabets for testing (Lake 2015).
  For validation, five background alphabets are held out (every sixth in sorted order); ``trainval``
  is all 30. Training parts use the four 90-degree rotations as new classes; ``test`` does not.
* ``vinyals``: the split files of Vinyals et al. 2016 (``splits/vinyals/{train,val,trainval,test}.txt``,
  1028 / 172 / 1200 / 423 characters), each line ``Alphabet/characterNN/rotDDD`` one class.
* ``cactus``: the characters of the Vinyals split without rotations, 1100 / 100 / 1200 / 423, as
  in unsupervised meta-learning (Hsu et al. 2019, CACTUs: 1100 / 100 / 423 characters, about 22k
  unlabelled meta-training images). Its ``val`` is every twelfth of the 1200 ``trainval``
  characters in sorted order (the paper's draw of the 100 is not published).
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from metalab.data.download import require, resource
from metalab.data.fewshot import FewShotDataset
from metalab.data.root import cache_dir, data_root
from metalab.errors import ConfigError, DataError, MetalabError
from metalab.io import atomic_file, file_checksums

ARCHIVES = {
    "background": "omniglot/images_background.zip",
    "evaluation": "omniglot/images_evaluation.zip",
}
# (alphabets, characters) of the official archives; every character has 20 drawings.
EXPECTED_COUNTS = {"background": (30, 964), "evaluation": (20, 659)}
DRAWINGS = 20
SPLITS = {
    "lake": ("train", "val", "trainval", "test"),
    "vinyals": ("train", "val", "trainval", "test"),
    "cactus": ("train", "val", "trainval", "test"),
}
_CACHE_VERSION = 1
_ENTRY = re.compile(r"^images_(background|evaluation)/([^/]+)/(character\d+)/(\d{4})_(\d{2})\.png$")


def decode_png(data: bytes, size: int | None = None) -> np.ndarray:
    """One Omniglot PNG -> uint8 ``(size, size)`` with ink = 255 (the source draws ink in black).

    Downscaling uses Lanczos so thin strokes keep their grey level instead of vanishing."""
    with Image.open(io.BytesIO(data)) as image:
        ink = 255 - np.asarray(image.convert("L"), dtype=np.uint8)
    if size is not None and ink.shape != (size, size):
        ink = np.asarray(
            Image.fromarray(ink).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8
        )
    return ink


def _decode_archive(path: Path, which: str, size: int) -> tuple[np.ndarray, list[str]]:
    """Decode every drawing of an archive, checking the official layout and counts on the way."""
    hint = f"delete it and run `metalab data fetch omniglot` (or download {resource(ARCHIVES[which]).urls[0]})"
    try:
        with zipfile.ZipFile(path) as archive:
            drawings: dict[str, list[str]] = {}
            for name in archive.namelist():
                match = _ENTRY.match(name)
                if match and match.group(1) == which:
                    drawings.setdefault(f"{match.group(2)}/{match.group(3)}", []).append(name)
            characters = sorted(drawings)
            alphabets = {c.split("/")[0] for c in characters}
            want_alphabets, want_characters = EXPECTED_COUNTS[which]
            if (len(alphabets), len(characters)) != (want_alphabets, want_characters):
                raise DataError(
                    f"{path} holds {len(alphabets)} alphabets / {len(characters)} characters, "
                    f"expected {want_alphabets} / {want_characters}: {hint}"
                )
            bad = [c for c in characters if len(drawings[c]) != DRAWINGS]
            if bad:
                raise DataError(
                    f"{path}: {bad[0]} has {len(drawings[bad[0]])} drawings, expected {DRAWINGS}: {hint}"
                )
            images = np.empty((len(characters), DRAWINGS, size, size), dtype=np.uint8)
            for i, character in enumerate(characters):
                for j, name in enumerate(sorted(drawings[character])):
                    images[i, j] = decode_png(archive.read(name), size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
        raise DataError(f"{path} is corrupt or truncated ({err}): {hint}") from None
    return images, characters


def load_archive(
    which: str, root: Path, size: int = 28, download: bool = True
) -> tuple[np.ndarray, list[str]]:
    """The drawings of one official archive.

    Args:
        which: ``"background"`` or ``"evaluation"``.
        root: the data root (the archive is ``<root>/omniglot/images_<which>.zip``).
        size: side of the square images (28 for the standard tables, 105 for the originals).
        download: fetch the archive when it is missing.

    Returns:
        ``images`` uint8 ``(characters, 20, size, size)`` with ink = 255, and the character names
        ``"Alphabet/characterNN"`` in sorted order.
    """
    if which not in ARCHIVES:
        raise ConfigError(f"unknown Omniglot archive {which!r}: use one of {sorted(ARCHIVES)}")
    path = require(resource(ARCHIVES[which]), root, download=download)
    (digest,) = file_checksums(path, ("sha256",))
    cached = cache_dir() / f"omniglot-{which}-{size}-{digest[:20]}-v{_CACHE_VERSION}.npz"
    if cached.exists():
        try:
            with np.load(cached) as stored:
                return stored["images"], [str(c) for c in stored["characters"]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            cached.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
    images, characters = _decode_archive(path, which, size)
    with atomic_file(cached) as f:
        np.savez(f, images=images, characters=np.array(characters))
    return images, characters


def _rotations(images: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each character at 0/90/180/270 degrees (counter-clockwise) as four classes, rotation-major
    within a character: ``(4 * characters, 20, H, W)``."""
    rotated = np.stack([np.rot90(images, k, axes=(-2, -1)) for k in range(4)], axis=1)
    rotated = rotated.reshape(-1, *images.shape[1:])
    return np.ascontiguousarray(rotated), [f"{n}/rot{90 * k:03d}" for n in names for k in range(4)]


def _lake_val_alphabets(characters: list[str]) -> set[str]:
    alphabets = sorted({c.split("/")[0] for c in characters})
    return set(alphabets[5::6])


def _read_split_file(root: Path, part: str, download: bool) -> list[str]:
    path = require(resource(f"omniglot/splits/vinyals/{part}.txt"), root, download=download)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [
        line for line in lines if not re.fullmatch(r"[^/]+/character\d+/rot(000|090|180|270)", line)
    ]
    if bad:
        raise DataError(
            f"{path}: line {bad[0]!r} is not 'Alphabet/characterNN/rotDDD': re-fetch it"
        )
    return lines


def _split_lines(root: Path, split: str, part: str, download: bool) -> list[str]:
    """The classes ``Alphabet/characterNN/rotDDD`` of a part of the ``vinyals`` or ``cactus`` split."""
    if split == "vinyals":
        return _read_split_file(root, part, download)
    source = "test" if part == "test" else "trainval"
    characters = sorted(
        {line.rsplit("/", 1)[0] for line in _read_split_file(root, source, download)}
    )
    if part in ("train", "val"):
        held_out = set(characters[11::12])  # 100 of the 1200
        characters = [c for c in characters if (c in held_out) == (part == "val")]
    return [f"{c}/rot000" for c in characters]


def omniglot(
    split: str = "vinyals",
    part: str = "train",
    root: Path | None = None,
    size: int = 28,
    download: bool = True,
) -> FewShotDataset:
    """An Omniglot class split as a :class:`FewShotDataset` (20 drawings per class).

    Args:
        split: ``"vinyals"`` (the standard N-way K-shot tables), ``"lake"`` (background/evaluation)
            or ``"cactus"`` (Vinyals's characters unrotated, 1100 / 100 / 423: unsupervised
            meta-learning).
        part: ``"train"``, ``"val"``, ``"trainval"`` or ``"test"``.
        root: the data root (see :func:`metalab.data.root.data_root`).
        size: image side in pixels.
        download: fetch missing files.
    """
    root = data_root(root)
    if split not in SPLITS:
        raise ConfigError(f"unknown Omniglot split {split!r}: use one of {sorted(SPLITS)}")
    if part not in SPLITS[split]:
        raise ConfigError(f"unknown part {part!r} of the {split} split: use one of {SPLITS[split]}")

    if split == "lake":
        which = "evaluation" if part == "test" else "background"
        images, names = load_archive(which, root, size, download)
        if part in ("train", "val"):
            held_out = _lake_val_alphabets(names)
            keep = [(n.split("/")[0] in held_out) == (part == "val") for n in names]
            images, names = images[np.array(keep)], [n for n, k in zip(names, keep) if k]
        if part != "test":
            images, names = _rotations(images, names)
    else:
        lines = _split_lines(root, split, part, download)
        index: dict[str, tuple[np.ndarray, int]] = {}
        for which in ARCHIVES:
            archive_images, archive_names = load_archive(which, root, size, download)
            index.update({n: (archive_images, i) for i, n in enumerate(archive_names)})
        missing = [line for line in lines if line.rsplit("/", 1)[0] not in index]
        if missing:
            raise DataError(f"split {split}/{part} names {missing[0]!r}, absent from the archives")
        images = np.empty((len(lines), DRAWINGS, size, size), dtype=np.uint8)
        for i, line in enumerate(lines):
            character, rotation = line.rsplit("/", 1)
            archive_images, j = index[character]
            images[i] = np.rot90(archive_images[j], int(rotation[3:]) // 90, axes=(-2, -1))
        names = lines

    return FewShotDataset.from_class_array(images, names, name=f"omniglot/{split}/{part}")


def content_report(root: Path) -> dict[str, str]:
    """For `metalab data check`: each Omniglot archive present under ``root``, by its path, with
    its counts of alphabets, characters and drawings (``ok: ...``) or why it is bad (``BAD: ...``)."""
    report = {}
    for which, path in ARCHIVES.items():
        if (root / path).exists():
            try:
                images, characters = load_archive(which, root, size=28, download=False)
                alphabets = len({c.split("/")[0] for c in characters})
                report[path] = (
                    f"ok: {alphabets} alphabets, {len(characters)} characters, "
                    f"{images.shape[1]} drawings each"
                )
            except MetalabError as err:
                report[path] = f"BAD: {err}"
    return report

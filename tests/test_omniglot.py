"""Omniglot from the official archives: counts, splits, rotations, the decode cache, bad archives."""

from __future__ import annotations

import shutil
import time
import zipfile

import numpy as np
import pytest

from metalab.data.omniglot import load_archive, omniglot
from metalab.errors import DataError


@pytest.mark.realdata
@pytest.mark.parametrize(
    "split,part,classes",
    [
        ("vinyals", "train", 1028 * 4),
        ("vinyals", "val", 172 * 4),
        ("vinyals", "trainval", 1200 * 4),
        ("vinyals", "test", 423 * 4),
        ("lake", "trainval", 964 * 4),
        ("lake", "test", 659),
    ],
)
def test_split_sizes(omniglot_root, split, part, classes):
    data = omniglot(split, part, omniglot_root)
    assert data.num_classes == classes
    assert data.images.shape == (classes * 20, 1, 28, 28)
    assert (data.counts == 20).all()


@pytest.mark.realdata
def test_splits_are_disjoint(omniglot_root):
    def characters(split, part):
        return {n.rsplit("/rot", 1)[0] for n in omniglot(split, part, omniglot_root).class_names}

    train, val, test = (characters("vinyals", p) for p in ("train", "val", "test"))
    assert not (train & test) and not (val & test) and not (train & val)
    assert characters("vinyals", "trainval") == train | val
    lake_train, lake_val = characters("lake", "train"), characters("lake", "val")
    assert not lake_train & lake_val and len(lake_train | lake_val) == 964
    alphabets = {c.split("/")[0] for c in lake_train | lake_val}
    assert not alphabets & {c.split("/")[0] for c in characters("lake", "test")}


@pytest.mark.realdata
def test_rotated_classes_are_rotations(omniglot_root):
    data = omniglot("vinyals", "test", omniglot_root)
    names = data.class_names
    base = names.index(next(n for n in names if n.endswith("/rot000")))
    stem = names[base].rsplit("/", 1)[0]
    upright = data.images[data.class_index[base]].numpy()
    for k, angle in enumerate(("090", "180", "270"), start=1):
        rotated = data.images[data.class_index[names.index(f"{stem}/rot{angle}")]].numpy()
        assert np.array_equal(rotated, np.rot90(upright, k, axes=(-2, -1)))
    # ink is high: a stroke image is mostly background (0) with some bright pixels
    assert upright.mean() < 60 and upright.max() > 200


@pytest.mark.realdata
def test_decode_cache(omniglot_root, tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    images, characters = load_archive("evaluation", omniglot_root, size=28)
    assert images.shape == (659, 20, 28, 28) and len(characters) == 659
    assert len(list(tmp_path.glob("omniglot-evaluation-28-*.npz"))) == 1
    start = time.perf_counter()
    again, characters_again = load_archive("evaluation", omniglot_root, size=28)
    assert time.perf_counter() - start < 1.0
    assert np.array_equal(images, again) and characters == characters_again


@pytest.mark.realdata
def test_truncated_archive(omniglot_root, tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "omniglot").mkdir()
    data = (omniglot_root / "omniglot/images_evaluation.zip").read_bytes()
    (tmp_path / "omniglot/images_evaluation.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=r"images_evaluation.zip is corrupt or truncated.*fetch omniglot"
    ):
        load_archive("evaluation", tmp_path, download=False)


@pytest.mark.realdata
def test_archive_with_missing_characters(omniglot_root, tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "omniglot").mkdir()
    with (
        zipfile.ZipFile(omniglot_root / "omniglot/images_evaluation.zip") as source,
        zipfile.ZipFile(tmp_path / "omniglot/images_evaluation.zip", "w") as partial,
    ):
        for name in source.namelist()[:300]:
            partial.writestr(name, source.read(name))
    with pytest.raises(DataError, match=r"alphabets / \d+ characters, expected 20 / 659"):
        load_archive("evaluation", tmp_path, download=False)


def test_missing_archive_offline(tmp_path, offline):
    with pytest.raises(DataError) as err:
        omniglot("lake", "test", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "images_evaluation.zip" in message and str(tmp_path / "omniglot") in message
    assert "http" in message


@pytest.mark.realdata
def test_split_files_are_read_from_the_data_root(omniglot_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(omniglot_root / "omniglot", root / "omniglot")
    (root / "omniglot/splits/vinyals/val.txt").write_text("Nope/character01/rot000\n")
    with pytest.raises(DataError, match="Nope/character01"):
        omniglot("vinyals", "val", root)
